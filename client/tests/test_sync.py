"""The blocking Client against a real server of the shipped models."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest
from harness import (
    MAX_ITEMS,
    PHOTO,
    SPEECH,
    GatedTransport,
    Wave,
    encode_requests,
    noise_png,
    unique,
)
from tokserve_client import Client, Encoded, ItemError, ItemsFailed, TokserveError


@pytest.fixture
def tok(url: str) -> Iterator[Client]:
    with Client(url) as client:
        yield client


def png_size(png: bytes) -> tuple[int, int]:
    """A PNG's width and height, from its IHDR chunk."""
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_models_lists_the_served_models_and_limits_the_servers_settings(tok: Client) -> None:
    assert {m["name"] for m in tok.models()} == {"image-fsq-256", "audio-rvq-24k"}
    assert tok.limits()["max_items"] == MAX_ITEMS


def test_encode_images_gives_32x32_grids_that_decode_to_a_256_pixel_png(tok: Client) -> None:
    grids = tok.encode_images([PHOTO, unique(PHOTO, "grid")])
    assert [g.shape for g in grids] == [(32, 32), (32, 32)]
    assert [g.tokens.shape for g in grids] == [(32, 32), (32, 32)]
    assert grids[0].tokens.dtype == np.uint16
    np.testing.assert_array_equal(grids[0].tokens, grids[1].tokens)
    assert png_size(tok.decode_image(grids[0])) == (256, 256)


def test_an_encoded_item_carries_its_model_version_cache_state_and_typed_figures(
    tok: Client,
) -> None:
    version = {m["name"]: m["version"] for m in tok.models()}["audio-rvq-24k"]
    clip = unique(SPEECH, "figures")
    (first,) = tok.encode_audio([clip], codebooks=4)
    (again,) = tok.encode_audio([clip], codebooks=4)
    assert isinstance(first, Encoded)
    assert (first.model, first.version, first.cached, again.cached) == (
        "audio-rvq-24k",
        version,
        False,
        True,
    )
    assert first.shape == first.tokens.shape == (4, first.figures["frames"])
    assert first.figures["codebooks"] == 4 and first.figures["frame_rate"] == 75.0
    assert first.figures["sample_rate"] == 24000
    assert first.figures["duration_s"] == pytest.approx(first.figures["frames"] / 75.0)
    assert isinstance(first.figures["frames"], int) and isinstance(
        first.figures["duration_s"], float
    )


def test_encode_audio_with_fewer_codebooks_decodes_to_flac_of_the_same_length(
    tok: Client,
) -> None:
    (full,) = tok.encode_audio([SPEECH])
    (coarse,) = tok.encode_audio([SPEECH], codebooks=2)
    assert full.shape == (8, full.figures["frames"]) and coarse.shape == (2, full.figures["frames"])
    np.testing.assert_array_equal(coarse.tokens, full.tokens[:2])
    assert tok.decode_audio(coarse, fmt="flac").startswith(b"fLaC")


def test_decode_audio_answers_a_wav_by_the_model_that_encoded_it(tok: Client) -> None:
    (clip,) = tok.encode_audio([SPEECH])
    wav = tok.decode_audio(clip)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"


def test_a_list_longer_than_max_items_goes_as_several_requests_in_order(
    url: str, tok: Client
) -> None:
    images = [noise_png(seed) for seed in range(MAX_ITEMS + 1)]
    alone = [tok.encode_images([image])[0].tokens for image in images]
    before = encode_requests(url)
    grids = tok.encode_images(images)
    assert encode_requests(url) - before == 2  # 3 + 1
    for grid, single in zip(grids, alone, strict=True):
        np.testing.assert_array_equal(grid.tokens, single)
    assert not np.array_equal(alone[0], alone[-1])  # so the order shows


def test_a_list_over_the_body_limit_goes_as_several_requests(url: str, tok: Client) -> None:
    photos = [unique(PHOTO, f"body-{i}") for i in range(3)]  # 3 <= MAX_ITEMS, but 2 fit a body
    before = encode_requests(url)
    assert len(tok.encode_images(photos)) == 3
    assert encode_requests(url) - before == 2


def test_at_most_max_concurrency_requests_of_a_call_are_in_flight(url: str) -> None:
    wave = Wave(2)
    photos = [unique(PHOTO, f"wave-{i}") for i in range(8)]  # 4 requests: 2 photos fill a body
    with Client(url, max_concurrency=2, transport=GatedTransport(wave)) as client:
        assert len(client.encode_images(photos)) == len(photos)
    assert wave.started == 4 and wave.peak == 2


def test_a_failed_item_raises_items_failed_that_keeps_the_others_results(tok: Client) -> None:
    photo, truncated = unique(PHOTO, "kept"), PHOTO[:-3000]
    with pytest.raises(ItemsFailed) as raised:
        tok.encode_images([photo, truncated, photo, photo])  # the last one in a second request
    first, bad, third, fourth = raised.value.results
    assert isinstance(first, Encoded) and isinstance(third, Encoded) and isinstance(fourth, Encoded)
    np.testing.assert_array_equal(first.tokens, fourth.tokens)
    assert isinstance(bad, ItemError) and (bad.index, bad.status) == (1, 415)
    assert "truncated" in bad.detail and "1 of 4 items failed" in str(raised.value)


def test_every_item_failing_raises_items_failed_with_each_items_problem(tok: Client) -> None:
    with pytest.raises(ItemsFailed) as raised:
        tok.encode_images([b"not an image", b"nor this"])
    assert [(e.index, e.status) for e in raised.value.errors] == [(0, 415), (1, 415)]


def test_a_lone_failed_item_raises_items_failed_too(tok: Client) -> None:
    with pytest.raises(ItemsFailed) as raised:
        tok.encode_audio([b"not audio"])
    assert [(e.index, e.status) for e in raised.value.errors] == [(0, 415)]


def test_a_request_that_fails_as_a_whole_raises_the_problem_detail(tok: Client) -> None:
    with pytest.raises(TokserveError) as raised:
        tok.decode_image(np.full((32, 32), 10**6))
    assert raised.value.status == 422
    assert "0 to 63999" in raised.value.detail


def test_an_unknown_model_raises_404_naming_the_loaded_ones(tok: Client) -> None:
    with pytest.raises(TokserveError) as raised:
        tok.encode_images([PHOTO], model="no-such-model")
    assert raised.value.status == 404 and not isinstance(raised.value, ItemsFailed)
    assert "image-fsq-256" in raised.value.detail


def test_encode_with_report_gives_each_items_quality_as_the_server_measured_it(
    tok: Client,
) -> None:
    (photo,) = tok.encode_images([PHOTO], report=True)
    (plain,) = tok.encode_images([PHOTO])
    (clip,) = tok.encode_audio([SPEECH], codebooks=4, report=True)
    assert set(photo.figures["quality"]) == {"psnr_db", "ssim"}
    assert photo.figures["quality"]["psnr_db"] > 20 and 0 < photo.figures["quality"]["ssim"] <= 1
    assert "quality" not in plain.figures
    assert set(clip.figures["quality"]) == {"snr_db", "mel_distance"}
