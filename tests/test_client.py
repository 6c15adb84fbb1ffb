"""The Python client against a real server process."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.client import Client, Encoded, ItemError, ItemsFailed, TokserveError
from bench.server import server_process
from tests.support import png_bytes, tiny_repo, wav_bytes


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    repo = tiny_repo(tmp_path_factory.mktemp("client-models"))
    with server_process(repo) as (_, url), Client(url) as client:
        yield client


def test_client_lists_models(tok: Client) -> None:
    assert {m["name"] for m in tok.models()} == {"tiny-image", "tiny-audio"}


def test_client_encodes_images_to_grids_and_decodes_to_png(tok: Client) -> None:
    grids = tok.encode_images([png_bytes(seed=1), png_bytes(seed=2)])
    assert [g.tokens.shape for g in grids] == [(8, 8), (8, 8)]
    png = tok.decode_image(grids[0])
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_client_returns_each_items_model_version_and_figures(tok: Client) -> None:
    (models,) = [m for m in tok.models() if m["name"] == "tiny-audio"]
    (clip,) = tok.encode_audio([wav_bytes(seconds=0.5, freq=330.0)])
    assert (clip.model, clip.version, clip.cached) == ("tiny-audio", models["version"], False)
    assert clip.figures["frames"] == 25 and clip.figures["frame_rate"] == 50.0
    assert clip.figures["duration_s"] == 0.5 and clip.figures["shape"] == [4, 25]


def test_client_encodes_audio_with_fewer_codebooks_and_decodes_flac(tok: Client) -> None:
    (clip,) = tok.encode_audio([wav_bytes(seconds=0.5)], codebooks=2)
    assert clip.tokens.shape == (2, 25)
    flac = tok.decode_audio(clip, fmt="flac")
    assert sf.info(io.BytesIO(flac)).frames == 25 * 320


def test_client_raises_for_a_failed_item_and_keeps_the_others_results(tok: Client) -> None:
    good, truncated = png_bytes(seed=3), png_bytes(seed=4)[:-200]
    with pytest.raises(ItemsFailed) as raised:
        tok.encode_images([good, truncated, good])
    first, bad, third = raised.value.results
    assert isinstance(first, Encoded) and isinstance(third, Encoded)
    np.testing.assert_array_equal(first.tokens, third.tokens)
    assert isinstance(bad, ItemError) and (bad.index, bad.status) == (1, 415)
    assert "truncated" in bad.detail and "1 of 3 items failed" in str(raised.value)


def test_client_raises_when_every_item_failed(tok: Client) -> None:
    with pytest.raises(ItemsFailed) as raised:
        tok.encode_images([b"not an image", b"nor this"])
    assert [(e.index, e.status) for e in raised.value.errors] == [(0, 415), (1, 415)]


def test_client_splits_lists_longer_than_max_items_into_several_requests(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    repo = tiny_repo(tmp_path_factory.mktemp("client-split"))
    images = [png_bytes(seed=20 + i) for i in range(7)]
    with server_process(repo, TOKSERVE_MAX_ITEMS="3") as (_, url), Client(url) as client:
        assert client.limits()["max_items"] == 3
        grids = client.encode_images(images)
        requests = _image_encode_requests(client)
        alone = [client.encode_images([image])[0] for image in images]
    assert requests == 3  # 3 + 3 + 1
    for grid, single in zip(grids, alone, strict=True):
        np.testing.assert_array_equal(grid.tokens, single.tokens)


def _image_encode_requests(client: Client) -> float:
    """Requests the server has answered on /v1/images/encode, from its own metrics."""
    metrics = client.http.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "tokserve_request_duration_seconds_count"
        and sample.labels.get("route") == "/v1/images/encode"
    )


def test_client_raises_the_problem_detail(tok: Client) -> None:
    with pytest.raises(TokserveError) as raised:
        tok.decode_image(np.full((8, 8), 10**6))
    assert raised.value.status == 422
    assert "0 to 999" in raised.value.detail
