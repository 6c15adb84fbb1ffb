"""The snac backend: SNAC's codebooks at three rates, served from a local folder.

A small SNAC is built from the package's own class with random weights and saved as the hub
ships it (config.json + pytorch_model.bin); its tokens through the API must be the package's
own encode of the same wave, whatever they are batched with.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tokserve_client import unpack_streams

from app.cli import main
from app.media import decode_audio
from tests.support import noisy_wav, served, settings_for

snac = pytest.importorskip("snac")

RATE = 16000
CONFIG = {
    "sampling_rate": RATE,
    "encoder_dim": 8,
    "encoder_rates": [2, 4],
    "decoder_dim": 32,
    "decoder_rates": [4, 2],
    "attn_window_size": None,
    "codebook_size": 64,
    "codebook_dim": 4,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}
HOP = 8 * 4  # the encoder's hop times the coarsest stride: one frame holds 1 + 2 + 4 tokens
PER_FRAME = [1, 2, 4]
CLIPS = (3200, 4000)  # 100 and 125 frames


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SNAC saved as its hub folder is: config.json and pytorch_model.bin."""
    folder = tmp_path_factory.mktemp("snac")
    torch.manual_seed(0)
    model = snac.SNAC(**CONFIG).eval()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def repo(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny-snac"
    folder.mkdir(parents=True)
    config = {"backend": "snac", "modality": "audio", "source": str(checkpoint)}
    (folder / "config.json").write_text(json.dumps(config))
    return tmp_path / "models"


def package_codes(checkpoint: Path, media: bytes) -> list[list[int]]:
    """The snac package's own encode of the wave tokserve prepares from ``media``."""
    model = snac.SNAC.from_pretrained(str(checkpoint)).eval()
    wave = decode_audio(media, RATE)[0]
    with torch.no_grad():
        return [code[0].tolist() for code in model.encode(wave[None])]


async def test_a_snac_model_describes_its_three_streams(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        model = (await client.get("/v1/models/tiny-snac")).json()
    assert (model["backend"], model["codebooks"], model["vocab_size"]) == ("snac", 3, 64)
    assert (model["hop_length"], model["frame_rate"]) == (HOP, RATE / HOP)
    assert model["tokens_per_frame"] == PER_FRAME
    assert [(s["rows"], s["rate"]) for s in model["streams"]] == [
        ([0], 500.0),
        ([1, 2], 1000.0),
        ([3, 4, 5, 6], 2000.0),
    ]


async def test_snac_tokens_are_the_packages_own_encode_alone_or_batched(
    repo: Path, checkpoint: Path
) -> None:
    clips = [noisy_wav(samples, seed, RATE) for seed, samples in enumerate(CLIPS)]
    async with served(settings_for(repo, cache_max_bytes=0)) as client:
        url = "/v1/audio/encode?model=tiny-snac"
        alone = [(await client.post(url, content=media)).json()["items"][0] for media in clips]
        together = await asyncio.gather(*(client.post(url, content=media) for media in clips))
    for item, media, samples in zip(alone, clips, CLIPS, strict=True):
        frames = math.ceil(samples / HOP)
        assert item["shape"] == [7, frames] and item["tokens_per_frame"] == PER_FRAME
        streams = unpack_streams(np.array(item["tokens"]), PER_FRAME)
        assert [s.tolist() for s in streams] == package_codes(checkpoint, media)
    assert [r.json()["items"][0]["tokens"] for r in together] == [i["tokens"] for i in alone]
    assert len(np.unique(alone[0]["tokens"])) > 4  # the tokens say something


async def test_snac_decodes_the_token_array_or_the_streams_to_the_same_audio(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        encoded = await client.post(
            "/v1/audio/encode?model=tiny-snac", content=noisy_wav(3200, 3, RATE)
        )
        tokens = encoded.json()["items"][0]["tokens"]
        streams = [s.tolist() for s in unpack_streams(np.array(tokens), PER_FRAME)]
        url = "/v1/audio/decode?model=tiny-snac"
        packed = await client.post(url, json={"tokens": tokens})
        again = await client.post(url, json={"tokens": [tokens, tokens[:7]]})
        from_streams = await client.post(url, json={"tokens": streams})
    assert packed.status_code == 200 and from_streams.status_code == 200
    assert sf.info(io.BytesIO(packed.content)).frames == 100 * HOP
    # the decoder's noise is drawn per item from one seed: the same audio alone or batched
    assert from_streams.content == packed.content
    assert [base64.b64decode(item["data"]) for item in again.json()["items"]] == [
        packed.content,
        packed.content,
    ]


async def test_snac_streams_of_the_wrong_lengths_are_refused_saying_what_fits(repo: Path) -> None:
    async with served(settings_for(repo)) as client:
        refused = await client.post(
            "/v1/audio/decode?model=tiny-snac", json={"tokens": [[1] * 10, [2] * 20, [3] * 30]}
        )
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "tokens holds streams of [10, 20, 30] tokens; model tiny-snac's codebooks take "
        "[1, 2, 4] tokens per frame, so F frames are ['1F', '2F', '4F'] tokens."
    )


def test_models_add_writes_a_snac_model_after_its_round_trip(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "snac-16k", "--backend", "snac", "--from", str(checkpoint)]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 codebooks of 64, [1, 2, 4] tokens per frame; round trip ok" in out
    assert json.loads((tmp_path / "snac-16k" / "config.json").read_text()) == {
        "name": "snac-16k",
        "backend": "snac",
        "modality": "audio",
        "source": str(checkpoint),
        "options": {},
    }
