"""The transformers backend: tiny random checkpoints of each public class, served over HTTP.

Each checkpoint is built from a small config, written with ``save_pretrained`` and served
offline through the real app; nothing reaches a hub.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from PIL import Image

from app.cli import main
from app.config import Settings
from app.media import decode_audio, decode_image
from app.model_folder import ModelLoadError
from app.registry import load_model
from tests.support import noisy_wav, png_bytes, served, settings_for, tiny_encodec

SAMPLE_RATE = 8000
HOP = 320  # 8 * 5 * 4 * 2 for every tiny codec below
CLIP_SAMPLES = (2500, 3000)  # one length bucket of the batcher, 8 and 10 frames
IMAGE_SIDE, GRID = 32, 16  # channel_multiplier [1, 2]: downsample 2
VOCAB = 64


@dataclass(frozen=True)
class Case:
    """One transformers class: how to build it tiny, and what the service must report."""

    class_name: str
    build: Callable[[], Any]
    codebooks: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    codebook_scale: float | None = None  # spread zero-initialised codebooks over the latents
    seed_codebook: Callable[[Any], None] | None = None  # or set them from latents


def _dac() -> Any:
    return transformers.DacModel(
        transformers.DacConfig(
            encoder_hidden_size=4,
            downsampling_ratios=[2, 4, 5, 8],
            decoder_hidden_size=16,
            n_codebooks=4,
            codebook_size=VOCAB,
            codebook_dim=4,
            sampling_rate=SAMPLE_RATE,
        )
    )


def _mimi() -> Any:
    return transformers.MimiModel(
        transformers.MimiConfig(
            sampling_rate=SAMPLE_RATE,
            hidden_size=16,
            num_filters=4,
            upsampling_ratios=[8, 5, 4],  # 160 samples, then the 2x downsampling: 320
            codebook_size=VOCAB,
            codebook_dim=16,
            num_quantizers=4,
            vector_quantization_hidden_dimension=16,
            upsample_groups=16,
            num_hidden_layers=1,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        )
    )


def _xcodec() -> Any:
    return transformers.XcodecModel(
        transformers.XcodecConfig(
            sample_rate=SAMPLE_RATE,
            codebook_size=VOCAB,
            target_bandwidths=[0.3, 0.6],
            acoustic_model_config={
                "encoder_hidden_size": 4,
                "downsampling_ratios": [8, 5, 4, 2],
                "upsampling_ratios": [8, 5, 4, 2],
                "decoder_hidden_size": 16,
                "hidden_size": 16,
                "codebook_size": VOCAB,
                "sampling_rate": SAMPLE_RATE,
            },
            semantic_model_config={
                "model_type": "hubert",
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "conv_dim": [8] * 7,
                "num_conv_pos_embeddings": 16,
                "num_conv_pos_embedding_groups": 2,
            },
        )
    )


def _wavtokenizer() -> Any:
    return transformers.WavTokenizerModel(
        transformers.WavTokenizerConfig(
            sampling_rate=SAMPLE_RATE,
            num_filters=4,
            upsampling_ratios=[8, 5, 4, 2],
            hidden_size=16,
            codebook_size=VOCAB,
            codebook_dim=16,
            decoder_hidden_size=16,
            decoder_intermediate_size=32,
            decoder_num_layers=1,
            decoder_attention_num_groups=4,
            num_lstm_layers=1,
        )
    )


def _codebook_from_latents(model: Any) -> None:
    """WavTokenizer's one codebook: the latents of random audio, so that tokens vary."""
    noise = torch.randn(1, 1, VOCAB * HOP) * 0.2
    latents = model.encoder_model.encoder(noise)[0].t()
    model.encoder_model.quantizer.codebook.embed.copy_(latents)


def _emu3() -> Any:
    return transformers.Emu3VQVAE(
        transformers.Emu3VQVAEConfig(
            codebook_size=VOCAB,
            embed_dim=4,
            latent_channels=4,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[],
            hidden_size=64,
        )
    )


def _janus() -> Any:
    return transformers.JanusVQVAE(
        transformers.JanusVQVAEConfig(
            embed_dim=4,
            num_embeddings=VOCAB,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            num_patches=GRID,
            image_token_embed_dim=16,
            projection_dim=16,
        )
    )


def _chameleon() -> Any:
    return transformers.ChameleonVQVAE(
        transformers.ChameleonVQVAEConfig(
            embed_dim=4,
            num_embeddings=VOCAB,
            latent_channels=4,
            resolution=IMAGE_SIDE,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[],
        )
    )


AUDIO_CASES = [
    Case("EncodecModel", tiny_encodec, codebooks=4, codebook_scale=0.08),
    Case("DacModel", _dac, codebooks=3, options={"codebooks": 3}),
    Case("MimiModel", _mimi, codebooks=4, codebook_scale=3.0),
    Case("XcodecModel", _xcodec, codebooks=2, options={"bandwidth": 0.3}, codebook_scale=1.0),
    Case("WavTokenizerModel", _wavtokenizer, seed_codebook=_codebook_from_latents),
]
IMAGE_CASES = [
    Case("Emu3VQVAE", _emu3, options={"image_size": IMAGE_SIDE}),
    Case("JanusVQVAE", _janus),
]
CHAMELEON = Case("ChameleonVQVAE", _chameleon)  # encode-only


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE as in production, and any socket connection fails the test."""

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test of the transformers backend tried to open a connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's tiny random checkpoint, saved with save_pretrained, by class name."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for case in [*AUDIO_CASES, *IMAGE_CASES, CHAMELEON]:
        torch.manual_seed(0)
        model = case.build().eval()
        with torch.no_grad():
            if case.seed_codebook is not None:
                case.seed_codebook(model)
            for name, buffer in model.named_buffers():
                if case.codebook_scale is not None and name.endswith((".embed", ".embed_sum")):
                    buffer.normal_(0, case.codebook_scale)
        folders[case.class_name] = root / case.class_name
        model.save_pretrained(folders[case.class_name])
    return folders


def model_repo(root: Path, name: str, config: dict[str, Any]) -> Path:
    """A model repository holding one model folder with this config.json."""
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(json.dumps({"backend": "transformers", **config}))
    return root


def hf_repo(root: Path, case: Case, source: Path) -> Path:
    config = {"class": case.class_name, "source": str(source), "options": case.options}
    return model_repo(root, case.class_name.lower(), config)


def no_cache(repo: Path) -> Settings:
    """Every request computed (no cache hits), no warm-up: the tests time the models."""
    return settings_for(repo, warmup=False, cache_max_bytes=0)


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


@pytest.mark.parametrize("case", AUDIO_CASES, ids=lambda case: case.class_name)
async def test_audio_codec_reports_its_figures_and_batches_like_alone(
    case: Case, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    name, source = case.class_name.lower(), checkpoints[case.class_name]
    async with served(no_cache(hf_repo(tmp_path, case, source))) as client:
        model = (await client.get(f"/v1/models/{name}")).json()
        assert model["backend"] == "transformers" and model["class"] == case.class_name
        assert model["source"] == str(source)
        assert (model["sample_rate"], model["hop_length"]) == (SAMPLE_RATE, HOP)
        assert model["frame_rate"] == SAMPLE_RATE / HOP
        assert (model["codebooks"], model["vocab_size"]) == (case.codebooks, VOCAB)

        clips = [noisy_wav(n, seed, SAMPLE_RATE) for seed, n in enumerate(CLIP_SAMPLES)]
        url = f"/v1/audio/encode?model={name}"
        alone = [(await client.post(url, content=clip)).json()["items"][0] for clip in clips]
        for item, samples in zip(alone, CLIP_SAMPLES, strict=True):
            frames = math.ceil(samples / HOP)
            assert item["shape"] == [case.codebooks, frames] and item["frames"] == frames
            assert np.min(item["tokens"]) >= 0 and np.max(item["tokens"]) < VOCAB
        assert len(np.unique(alone[1]["tokens"])) > 2  # the tokens say something
        together = (await client.post(url, json={"audio": [b64(c) for c in clips]})).json()
        concurrent = await asyncio.gather(*(client.post(url, content=clip) for clip in clips))
        expected = [item["tokens"] for item in alone]
        assert [item["tokens"] for item in together["items"]] == expected
        assert [r.json()["items"][0]["tokens"] for r in concurrent] == expected

        # one forward over both lengths, through the runner the batcher calls
        runner = client.app.state.engine.endpoints[name].runner  # type: ignore[attr-defined]
        waves = [decode_audio(clip, SAMPLE_RATE)[0] for clip in clips]
        assert [t.tolist() for t in runner.encode_batch(waves)] == expected
        arrays = [np.array(tokens, dtype=np.int32) for tokens in expected]
        batched, first_alone = runner.decode_batch(arrays)[0], runner.decode_batch(arrays[:1])[0]
        assert torch.allclose(batched, first_alone, atol=1e-5)

        wav = await client.post(f"/v1/audio/decode?model={name}", json={"tokens": expected[1]})
        assert wav.headers["content-type"] == "audio/wav"
        assert sf.info(io.BytesIO(wav.content)).frames == math.ceil(CLIP_SAMPLES[1] / HOP) * HOP
        many = await client.post("/v1/audio/decode", json={"model": name, "tokens": expected})
        lengths = [
            sf.info(io.BytesIO(base64.b64decode(item["data"]))).frames
            for item in many.json()["items"]
        ]
        assert lengths == [math.ceil(n / HOP) * HOP for n in CLIP_SAMPLES]
        coarse = await client.post(
            f"/v1/audio/decode?model={name}", json={"tokens": expected[0][:1]}
        )
        assert sf.info(io.BytesIO(coarse.content)).frames == math.ceil(CLIP_SAMPLES[0] / HOP) * HOP


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda case: case.class_name)
async def test_image_vq_reports_its_grid_and_decodes_to_its_image_size(
    case: Case, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    name, source = case.class_name.lower(), checkpoints[case.class_name]
    async with served(no_cache(hf_repo(tmp_path, case, source))) as client:
        model = (await client.get(f"/v1/models/{name}")).json()
        assert model["backend"] == "transformers" and model["class"] == case.class_name
        assert model["source"] == str(source)
        assert model["image_size"] == [IMAGE_SIDE, IMAGE_SIDE] and model["grid"] == [GRID, GRID]
        assert (model["downsample"], model["vocab_size"], model["codebooks"]) == (2, VOCAB, 1)

        images = [png_bytes(IMAGE_SIDE, IMAGE_SIDE, seed=seed) for seed in (1, 2)]
        url = f"/v1/images/encode?model={name}"
        alone = [(await client.post(url, content=image)).json()["items"][0] for image in images]
        together = (await client.post(url, json={"images": [b64(i) for i in images]})).json()
        assert [item["tokens"] for item in together["items"]] == [i["tokens"] for i in alone]
        grid = np.array(alone[0]["tokens"])
        assert grid.shape == (GRID, GRID) and grid.min() >= 0 and grid.max() < VOCAB
        assert len(np.unique(grid)) > 1

        png = await client.post(f"/v1/images/decode?model={name}", json={"tokens": grid.tolist()})
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (IMAGE_SIDE, IMAGE_SIDE)


async def test_an_encode_only_model_gives_transformers_own_tokens_and_refuses_decodes(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = checkpoints["ChameleonVQVAE"]
    images = [png_bytes(IMAGE_SIDE, IMAGE_SIDE, seed=seed) for seed in (1, 2)]
    async with served(no_cache(hf_repo(tmp_path, CHAMELEON, source))) as client:
        model = (await client.get("/v1/models/chameleonvqvae")).json()
        url = "/v1/images/encode?model=chameleonvqvae"
        together = (await client.post(url, json={"images": [b64(i) for i in images]})).json()
        refused = await client.post(
            "/v1/images/decode", json={"model": "chameleonvqvae", "tokens": [[0] * GRID] * GRID}
        )
        unreported = await client.post(f"{url}&report=true", content=images[0])
    assert (model["encode_only"], model["grid"], model["vocab_size"]) == (True, [GRID, GRID], VOCAB)
    reference = transformers.ChameleonVQVAE.from_pretrained(str(source)).eval()
    pixels = torch.stack([decode_image(image, (IMAGE_SIDE, IMAGE_SIDE)) for image in images])
    with torch.no_grad():
        expected = reference.encode(pixels).image_tokens.view(2, GRID, GRID)
    assert [item["tokens"] for item in together["items"]] == expected.tolist()
    assert len(np.unique(expected)) > 1
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "Model chameleonvqvae is encode-only: it has no decoder, so its tokens cannot be turned "
        "back into images. Decode with a model that has one (GET /v1/models: encode_only false)."
    )
    assert unreported.status_code == 422
    assert unreported.json()["detail"] == (
        "Model chameleonvqvae is encode-only: it has no decoder, so report=true (the quality of "
        "the tokens' reconstruction) cannot be computed. Encode without report, or with a model "
        "that has a decoder (GET /v1/models: encode_only false)."
    )


def test_models_add_checks_an_encode_only_model_by_its_encode(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", "chameleon", "--from", str(checkpoints["ChameleonVQVAE"])]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "round trip encode-only (no decoder): token shape and ids ok" in capsys.readouterr().out
    assert json.loads((tmp_path / "chameleon" / "config.json").read_text())["class"] == (
        "ChameleonVQVAE"
    )


async def test_encodec_bandwidths_are_listed_with_their_codebook_counts(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    case = Case("EncodecModel", tiny_encodec, options={"bandwidth": 0.3})
    async with served(no_cache(hf_repo(tmp_path, case, checkpoints["EncodecModel"]))) as client:
        model = (await client.get("/v1/models/encodecmodel")).json()
    assert model["codebooks"] == 2
    assert model["extra"] == {
        "bandwidth_kbps": 0.3,
        "codebooks_per_bandwidth_kbps": {"0.3": 2, "0.6": 4},
    }


async def test_missing_transformers_is_a_startup_error_naming_the_model_and_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import` sees when absent
    repo = model_repo(tmp_path, "encodec-24k", {"class": "EncodecModel", "source": "/data/x"})
    with pytest.raises(ModelLoadError, match=r"encodec-24k: .*pip install 'tokserve\[hf\]'"):
        async with served(no_cache(repo)):
            pass


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"class": "WhisperModel", "source": "."}, "EncodecModel"),
        ({"class": "EncodecModel", "source": "facebook/encodec_24khz"}, "download it first"),
        ({"class": "EncodecModel"}, "source"),
    ],
    ids=["unsupported-class", "hub-id", "no-source"],
)
def test_unservable_configs_are_refused_saying_why(
    config: dict[str, Any], words: str, tmp_path: Path
) -> None:
    repo = model_repo(tmp_path, "m", config)
    with pytest.raises(ModelLoadError, match=words):
        load_model(repo / "m", Settings(device="cpu"))


def test_a_whole_multimodal_checkpoint_is_refused_with_the_recipe_to_cut_it(
    tmp_path: Path,
) -> None:
    source = tmp_path / "janus-pro"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "janus", "vq_config": {}}))
    repo = model_repo(tmp_path / "repo", "janus", {"class": "JanusVQVAE", "source": str(source)})
    with pytest.raises(ModelLoadError, match=r"model\.vqmodel\.save_pretrained"):
        load_model(repo / "janus", Settings(device="cpu"))


def test_an_option_the_class_does_not_take_is_refused_naming_its_options(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = {
        "class": "EncodecModel",
        "source": str(checkpoints["EncodecModel"]),
        "options": {"codebooks": 2},
    }
    repo = model_repo(tmp_path, "encodec", config)
    with pytest.raises(ModelLoadError, match="bandwidth"):
        load_model(repo / "encodec", Settings(device="cpu"))


def test_the_version_covers_the_source_weights(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "dac"
    source.mkdir()
    for path in checkpoints["DacModel"].iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    repo = model_repo(tmp_path / "repo", "dac", {"class": "DacModel", "source": str(source)})
    before = load_model(repo / "dac", Settings(device="cpu")).version
    torch.manual_seed(1)
    _dac().save_pretrained(source)
    assert load_model(repo / "dac", Settings(device="cpu")).version != before


def add_tiny_encodec(checkpoints: dict[str, Path], out: Path, *flags: str) -> int:
    """`tokserve models add tiny-encodec` for the tiny EnCodec checkpoint."""
    argv = ["models", "add", "tiny-encodec", "--from", str(checkpoints["EncodecModel"])]
    return main([*argv, "--out", str(out), *flags])


async def test_models_add_checks_a_round_trip_and_writes_a_config_naming_the_folder(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add_tiny_encodec(checkpoints, tmp_path, "--bandwidth", "0.3") == 0
    assert "round trip ok" in capsys.readouterr().out
    config = json.loads((tmp_path / "tiny-encodec" / "config.json").read_text())
    assert config["backend"] == "transformers" and config["class"] == "EncodecModel"
    assert config["source"] == str(checkpoints["EncodecModel"])
    assert config["options"] == {"bandwidth": 0.3} and config["modality"] == "audio"
    assert not (tmp_path / "tiny-encodec" / "model.safetensors").exists()
    card = (tmp_path / "tiny-encodec" / "README.md").read_text()
    assert "transformers (`EncodecModel`)" in card and config["source"] in card
    assert "| round trip on a synthetic input | ok, SNR" in card
    async with served(settings_for(tmp_path)) as client:
        models = (await client.get("/v1/models")).json()["models"]
    assert [(m["name"], m["codebooks"], m["source"]) for m in models] == [
        ("tiny-encodec", 2, config["source"])
    ]


def test_models_add_refuses_to_replace_a_model_without_force(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add_tiny_encodec(checkpoints, tmp_path) == 0
    assert add_tiny_encodec(checkpoints, tmp_path) == 2
    assert "--force" in capsys.readouterr().err
    assert add_tiny_encodec(checkpoints, tmp_path, "--force") == 0


def test_models_add_of_an_unsupported_checkpoint_names_the_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "whisper"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["WhisperModel"]}))
    assert main(["models", "add", "w", "--from", str(source), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "--class" in error and "MimiModel" in error
    assert not (tmp_path / "w").exists()
