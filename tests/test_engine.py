"""The engine without HTTP: the same models, queues, cache and answers as the routes, in-process."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from app.endpoints import Media, Tokens
from app.engine import Engine, SyncEngine
from app.errors import NotFound, PayloadTooLarge, ProblemError, Unprocessable, UnsupportedMedia
from tests.support import png_bytes, served, settings_for, wav_bytes

GRID = 8


@pytest.fixture
async def engine(repo: Path) -> AsyncIterator[Engine]:
    engine = Engine.build(settings_for(repo))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def test_engine_encodes_images_to_grids_of_the_models_version(engine: Engine) -> None:
    answer = await engine.encode_images([png_bytes(seed=1), png_bytes(seed=2)])
    model = engine.registry.get("tiny-image", "image")
    assert (answer.model, answer.version) == ("tiny-image", model.version)
    first, second = answer.items
    assert isinstance(first, Tokens) and isinstance(second, Tokens)
    assert first.tokens.shape == (GRID, GRID) and first.tokens.dtype == np.uint16
    assert first.cached is False
    # a 96x80 source, cropped to a centred 80x80 box that fills the model's whole 64x64 image
    assert first.figures == {
        "shape": [GRID, GRID],
        "source_size": [96, 80],
        "crop_box": [8.0, 0.0, 88.0, 80.0],
        "content_box": [0, 0, 64, 64],
        "resize_filter": "bicubic",
    }
    assert second.tokens.shape == (GRID, GRID)


async def test_engine_answers_a_cached_item_in_the_same_dtype(engine: Engine) -> None:
    image = png_bytes(seed=3)
    (computed,) = (await engine.encode_images([image])).items
    await engine.pipeline.flush()
    (cached,) = (await engine.encode_images([image])).items
    assert isinstance(computed, Tokens) and isinstance(cached, Tokens)
    assert cached.cached is True and cached.tokens.dtype == computed.tokens.dtype == np.uint16
    np.testing.assert_array_equal(cached.tokens, computed.tokens)


async def test_engine_gives_a_bad_item_its_problem_and_the_others_their_results(
    engine: Engine,
) -> None:
    answer = await engine.encode_audio([wav_bytes(seconds=0.5), b"not audio"], codebooks=2)
    good, bad = answer.items
    assert isinstance(good, Tokens) and good.tokens.shape == (2, 25)
    assert good.figures["frames"] == 25 and good.figures["duration_s"] == 0.5
    assert isinstance(bad, UnsupportedMedia)


async def test_engine_decodes_arrays_lists_and_refuses_bad_ones_item_by_item(
    engine: Engine,
) -> None:
    grid = np.arange(GRID * GRID).reshape(GRID, GRID)
    answer = await engine.decode_images([grid, grid.tolist(), np.zeros((2, 2), int)], fmt="png")
    as_array, as_list, wrong = answer.items
    assert isinstance(as_array, Media) and isinstance(as_list, Media)
    assert as_array.data == as_list.data and as_array.media_type == "image/png"
    assert Image.open(io.BytesIO(as_array.data)).size == (64, 64)
    assert isinstance(wrong, Unprocessable) and "tokens[2]" in wrong.detail


async def test_engine_decodes_audio_to_the_asked_format(engine: Engine) -> None:
    (clip,) = (await engine.encode_audio([wav_bytes(seconds=0.5)])).items
    assert isinstance(clip, Tokens)
    (flac,) = (await engine.decode_audio([clip.tokens], fmt="flac")).items
    assert isinstance(flac, Media) and flac.figures["duration_s"] == 0.5
    assert sf.info(io.BytesIO(flac.data)).frames == 25 * 320


async def test_engine_refuses_unknown_models_and_whole_calls_over_a_limit(
    engine: Engine, repo: Path
) -> None:
    with pytest.raises(NotFound):
        await engine.encode_images([png_bytes()], model="no-such-model")
    long_codes = np.zeros((4, 30), int)  # 0.6 s each
    limited = Engine.build(settings_for(repo, max_request_audio_seconds=1.0))
    await limited.start()
    try:
        with pytest.raises(PayloadTooLarge):
            await limited.decode_audio([long_codes, long_codes])
    finally:
        await limited.stop()


async def test_engine_and_http_route_give_the_same_tokens(repo: Path, engine: Engine) -> None:
    image = png_bytes(seed=9)
    (direct,) = (await engine.encode_images([image], resize="pad")).items
    assert isinstance(direct, Tokens)
    async with served(settings_for(repo)) as client:
        response = await client.post("/v1/images/encode?resize=pad", content=image)
    assert isinstance(client, httpx.AsyncClient)
    assert response.json()["items"][0]["tokens"] == direct.tokens.tolist()


def test_sync_engine_serves_code_that_is_not_async(repo: Path) -> None:
    with SyncEngine(settings_for(repo)) as engine:
        (grid,) = engine.encode_images([png_bytes(seed=4)]).items
        assert isinstance(grid, Tokens)
        (png,) = engine.decode_images([grid.tokens]).items
    assert isinstance(png, Media) and png.data.startswith(b"\x89PNG")
    assert not isinstance(grid, ProblemError)


def test_each_models_queues_take_its_serving_options_unless_the_environment_overrides(
    repo: Path,
) -> None:
    """tiny-image's config.json: max_batch_size 8, max_wait_ms 5, max_queue 64."""
    own = Engine.build(settings_for(repo))
    overridden = Engine.build(settings_for(repo, max_batch_size=3, max_queue=7))
    for queue in (own.image().encoder, own.image().decoder):
        assert (queue.max_batch_size, queue.max_wait_s, queue.max_queue) == (8, 0.005, 64)
    for queue in (overridden.audio().encoder, overridden.image().decoder):
        assert (queue.max_batch_size, queue.max_wait_s, queue.max_queue) == (3, 0.005, 7)
