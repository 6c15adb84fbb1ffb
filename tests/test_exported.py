"""The exported backend: the native tiny models exported to .pt2 and .jit pairs, served over HTTP.

Served side by side with the native models they came from, they must give the same tokens.
"""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch import nn
from torch.export import Dim

from app.cli import main
from app.config import Settings
from app.media import decode_audio
from app.registry import load_model
from app.tokenizers.native import NATIVE_ARCHITECTURES
from tests.support import TINY_AUDIO, TINY_IMAGE, png_bytes, served, settings_for, tiny_repo
from tests.support import wav_bytes as make_wav

SAMPLE_RATE = TINY_AUDIO["arch"]["sample_rate"]
HOP = 320
K = TINY_AUDIO["arch"]["codebooks"]
GRID = 8
VOCAB = 8 * 5 * 5 * 5
CLIP_SAMPLES = (4800, 5600)  # one length bucket of the batcher, 15 and 18 frames


class Method(nn.Module):
    """One method of a native model as a module's forward, for export."""

    def __init__(self, model: Any, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> Any:
        return getattr(self.model, self.method)(*inputs)


def native(config: dict[str, Any]) -> Any:
    """The native model tests.support writes for this config (seed 0)."""
    torch.manual_seed(0)
    return NATIVE_ARCHITECTURES[config["architecture"]](config["arch"]).eval()


def export_pair(
    model: Any,
    encoder_inputs: tuple[torch.Tensor, ...],
    decoder_inputs: tuple[torch.Tensor, ...],
    shapes: tuple[Any, Any],
    folder: Path,
) -> None:
    """encoder/decoder .pt2 (torch.export, dynamic batch and length) and .jit (traced)."""
    folder.mkdir(parents=True)
    for name, method, inputs, dynamic in (
        ("encoder", "encode", encoder_inputs, shapes[0]),
        ("decoder", "decode", decoder_inputs, shapes[1]),
    ):
        module = Method(model, method)
        program = torch.export.export(module, inputs, dynamic_shapes=(dynamic,))
        torch.export.save(program, str(folder / f"{name}.pt2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module, inputs, check_trace=False)
        traced.save(str(folder / f"{name}.jit"))


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """image/ and audio/ folders, each with encoder and decoder as .pt2 and as .jit."""
    root = tmp_path_factory.mktemp("programs")
    image = native(TINY_IMAGE)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = Dim.DYNAMIC
    export_pair(
        image,
        (pixels,),
        (image.encode(pixels),),
        (({0: batch},), ({0: batch},)),
        root / "image",
    )
    audio = native(TINY_AUDIO)
    wave, lengths = torch.randn(2, 1, 10 * HOP) * 0.1, torch.tensor([10 * HOP, 7 * HOP])
    with torch.no_grad():
        tokens, frames = audio.encode(wave, lengths)
    length = Dim.DYNAMIC
    export_pair(
        audio,
        (wave, lengths),
        (tokens, frames),
        (({0: batch, 2: length}, {0: batch}), ({0: batch, 2: length}, {0: batch})),
        root / "audio",
    )
    return root


def exported_config(modality: str, fmt: str, source: Path) -> dict[str, Any]:
    program: dict[str, Any] = {"encoder": f"encoder.{fmt}", "decoder": f"decoder.{fmt}"}
    if modality == "image":
        program.update(vocab_size=VOCAB, image_size=64, downsample=8)
    else:
        program.update(
            vocab_size=64, sample_rate=SAMPLE_RATE, hop_length=HOP, codebooks=K, lengths=True
        )
    return {"backend": "exported", "modality": modality, "source": str(source), "program": program}


@pytest.fixture(scope="module")
def repo(programs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native tiny models and their four exported twins."""
    root = tiny_repo(tmp_path_factory.mktemp("repo"))
    for modality in ("image", "audio"):
        for fmt in ("pt2", "jit"):
            folder = root / f"{modality}-{fmt}"
            folder.mkdir()
            config = exported_config(modality, fmt, programs / modality)
            (folder / "config.json").write_text(json.dumps(config))
    return root


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


async def test_exported_models_list_their_backend_source_and_figures(
    repo: Path, programs: Path
) -> None:
    async with served(settings_for(repo, warmup=False)) as client:
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    for fmt in ("pt2", "jit"):
        image, audio = models[f"image-{fmt}"], models[f"audio-{fmt}"]
        assert image["backend"] == audio["backend"] == "exported"
        assert image["source"] == str(programs / "image")
        assert image["grid"] == [GRID, GRID] and image["vocab_size"] == VOCAB
        assert image["image_size"] == [64, 64] and image["downsample"] == 8
        assert audio["codebooks"] == K and audio["frame_rate"] == SAMPLE_RATE / HOP
        assert (audio["sample_rate"], audio["hop_length"]) == (SAMPLE_RATE, HOP)


async def test_exported_image_pairs_give_the_native_tokens_and_pixels(repo: Path) -> None:
    images = [b64(png_bytes(seed=seed)) for seed in (1, 2)]
    async with served(settings_for(repo, warmup=False)) as client:

        async def encode(model: str) -> list[Any]:
            body = {"images": images}
            response = await client.post(f"/v1/images/encode?model={model}", json=body)
            return [item["tokens"] for item in response.json()["items"]]

        async def decode(model: str, grid: list[Any]) -> np.ndarray:
            body = {"model": model, "tokens": grid}
            response = await client.post("/v1/images/decode", json=body)
            assert response.headers["content-type"] == "image/png"
            return np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.int16)

        expected = await encode("tiny-image")
        pixels = await decode("tiny-image", expected[0])
        for fmt in ("pt2", "jit"):
            assert await encode(f"image-{fmt}") == expected
            decoded = await decode(f"image-{fmt}", expected[0])
            assert decoded.shape == (64, 64, 3) and np.abs(decoded - pixels).max() <= 1


async def test_exported_audio_pairs_give_the_native_tokens_for_mixed_lengths(
    repo: Path,
) -> None:
    clips = [make_wav(n / SAMPLE_RATE, SAMPLE_RATE, freq=300.0 + n / 20) for n in CLIP_SAMPLES]
    async with served(settings_for(repo, warmup=False, cache_max_bytes=0)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        waves = [decode_audio(clip, SAMPLE_RATE)[0] for clip in clips]
        expected = [t.tolist() for t in engine.endpoints["tiny-audio"].runner.encode_batch(waves)]
        assert [len(t[0]) for t in expected] == [math.ceil(n / HOP) for n in CLIP_SAMPLES]
        for fmt in ("pt2", "jit"):
            model = f"audio-{fmt}"
            response = await client.post(
                f"/v1/audio/encode?model={model}", json={"audio": [b64(c) for c in clips]}
            )
            assert [item["tokens"] for item in response.json()["items"]] == expected
            # one forward over both lengths, through the runner the batcher calls
            batched = engine.endpoints[model].runner.encode_batch(waves)
            assert [t.tolist() for t in batched] == expected
            wav = await client.post(f"/v1/audio/decode?model={model}", json={"tokens": expected[1]})
            info = sf.info(io.BytesIO(wav.content))
            assert (info.frames, info.samplerate) == (len(expected[1][0]) * HOP, SAMPLE_RATE)


async def test_exported_audio_decode_with_fewer_codebooks_answers_422(repo: Path) -> None:
    async with served(settings_for(repo, warmup=False)) as client:
        response = await client.post(
            "/v1/audio/decode?model=audio-jit", json={"tokens": [[1] * 5] * (K - 1)}
        )
    assert response.status_code == 422
    assert f"with {K} codebooks" in response.json()["detail"]


def test_version_changes_with_a_program_kept_in_a_subfolder(programs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "image-sub"
    (folder / "programs").mkdir(parents=True)
    for role in ("encoder", "decoder"):
        source = programs / "image" / f"{role}.jit"
        (folder / "programs" / source.name).write_bytes(source.read_bytes())
    config = exported_config("image", "jit", folder)
    del config["source"]
    config["program"].update(encoder="programs/encoder.jit", decoder="programs/decoder.jit")
    (folder / "config.json").write_text(json.dumps(config))
    before = load_model(folder, Settings(device="cpu")).version

    retrained = native(TINY_IMAGE)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.1)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    traced = torch.jit.trace(Method(retrained, "encode"), (pixels,), check_trace=False)
    traced.save(str(folder / "programs" / "encoder.jit"))
    assert load_model(folder, Settings(device="cpu")).version != before


def test_models_add_measures_an_exported_pair_and_writes_its_conventions(
    programs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "audio-jit", "--from", str(programs / "audio"), "--out", str(tmp_path)]
    flags = ["--encoder", "encoder.jit", "--decoder", "decoder.jit", "--modality", "audio"]
    flags += ["--vocab-size", "64", "--sample-rate", str(SAMPLE_RATE), "--hop-length", str(HOP)]
    assert main([*argv, *flags, "--lengths"]) == 0
    assert "round trip ok" in capsys.readouterr().out
    config = json.loads((tmp_path / "audio-jit" / "config.json").read_text())
    assert config["backend"] == "exported" and config["source"] == str(programs / "audio")
    assert config["program"]["codebooks"] == K and config["program"]["lengths"] is True
    card = (tmp_path / "audio-jit" / "README.md").read_text()
    assert "exported (`encoder.jit, decoder.jit`)" in card
    bits = K * math.log2(64) * SAMPLE_RATE / HOP / 1000
    assert f"| bit rate | {bits:g} kbit/s |" in card


def test_models_add_refuses_a_pair_whose_ids_exceed_the_declared_vocabulary(
    programs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "img", "--from", str(programs / "image"), "--out", str(tmp_path)]
    flags = ["--modality", "image", "--image-size", "64", "--vocab-size", "2"]
    assert main([*argv, *flags]) == 2
    assert "outside 0..2" in capsys.readouterr().err
    assert not (tmp_path / "img").exists()
