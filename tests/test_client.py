"""The Python client against a real server process."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from app.client import Client, TokserveError
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
    assert [g.shape for g in grids] == [(8, 8), (8, 8)]
    png = tok.decode_image(grids[0])
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_client_encodes_audio_with_fewer_codebooks_and_decodes_flac(tok: Client) -> None:
    (tokens,) = tok.encode_audio([wav_bytes(seconds=0.5)], codebooks=2)
    assert tokens.shape == (2, 25)
    flac = tok.decode_audio(tokens, fmt="flac")
    assert sf.info(io.BytesIO(flac)).frames == 25 * 320


def test_client_raises_the_problem_detail(tok: Client) -> None:
    with pytest.raises(TokserveError) as raised:
        tok.decode_image(np.full((8, 8), 10**6))
    assert raised.value.status == 422
    assert "0 to 999" in raised.value.detail
