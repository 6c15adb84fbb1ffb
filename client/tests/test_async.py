"""The AsyncClient against a real server of the shipped models: the same calls as Client,
awaited, its chunks as tasks under a semaphore."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness import (
    MAX_ITEMS,
    PHOTO,
    SPEECH,
    AsyncGatedTransport,
    Wave,
    encode_requests,
    noise_png,
    unique,
)
from tokserve_client import AsyncClient, Client, Encoded, ItemError, ItemsFailed, TokserveError


async def test_async_encode_images_gives_grids_that_decode_to_a_png(url: str) -> None:
    async with AsyncClient(url) as tok:
        (grid,) = await tok.encode_images([PHOTO])
        png = await tok.decode_image(grid)
    assert grid.shape == grid.tokens.shape == (32, 32) and grid.model == "image-fsq-256"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


async def test_async_encode_audio_gives_codebooks_that_decode_to_a_wav(url: str) -> None:
    async with AsyncClient(url) as tok:
        (clip,) = await tok.encode_audio([SPEECH], codebooks=4)
        wav = await tok.decode_audio(clip)
    assert clip.shape == (4, clip.figures["frames"]) and clip.figures["codebooks"] == 4
    assert wav[:4] == b"RIFF"


async def test_async_calls_answer_what_sync_calls_answer_for_the_same_items(url: str) -> None:
    images = [noise_png(seed) for seed in range(10, 10 + MAX_ITEMS + 1)]
    async with AsyncClient(url) as tok:
        before = encode_requests(url)
        grids = await tok.encode_images(images)
        after = encode_requests(url)
        alone = [(await tok.encode_images([image]))[0].tokens for image in images]
    assert after - before == 2  # 3 + 1
    for grid, single in zip(grids, alone, strict=True):
        np.testing.assert_array_equal(grid.tokens, single)
    assert not np.array_equal(alone[0], alone[-1])


async def test_async_at_most_max_concurrency_requests_of_a_call_are_in_flight(url: str) -> None:
    wave = Wave(3)
    photos = [unique(PHOTO, f"async-wave-{i}") for i in range(10)]  # 5 requests of 2
    async with AsyncClient(url, max_concurrency=3, transport=AsyncGatedTransport(wave)) as tok:
        assert len(await tok.encode_images(photos)) == len(photos)
    assert wave.started == 5 and wave.peak == 3


async def test_async_calls_share_the_pool_concurrently(url: str) -> None:
    async with AsyncClient(url) as tok:
        grids, clips = await asyncio.gather(tok.encode_images([PHOTO]), tok.encode_audio([SPEECH]))
    assert grids[0].shape == (32, 32) and clips[0].shape[0] == 8


async def test_async_failed_item_raises_items_failed_that_keeps_the_others_results(
    url: str,
) -> None:
    async with AsyncClient(url) as tok:
        with pytest.raises(ItemsFailed) as raised:
            await tok.encode_images([PHOTO, b"not an image", PHOTO, PHOTO])
    first, bad, *rest = raised.value.results
    assert isinstance(first, Encoded) and all(isinstance(r, Encoded) for r in rest)
    assert isinstance(bad, ItemError) and (bad.index, bad.status) == (1, 415)


async def test_async_request_that_fails_as_a_whole_raises_the_problem_detail(url: str) -> None:
    async with AsyncClient(url) as tok:
        with pytest.raises(TokserveError) as raised:
            await tok.decode_audio(np.full((8, 10), 5000))
    assert raised.value.status == 422 and "0 to 1023" in raised.value.detail


async def test_async_encode_with_report_gives_what_sync_gives(url: str) -> None:
    async with AsyncClient(url) as tok:
        (clip,) = await tok.encode_audio([SPEECH], codebooks=4, report=True)
    with Client(url) as sync:
        (again,) = sync.encode_audio([SPEECH], codebooks=4, report=True)
    assert clip.figures["quality"] == again.figures["quality"]
