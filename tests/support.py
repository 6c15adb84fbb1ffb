"""Shared test set-up: tiny randomly initialised model repositories and a served app.

Real server processes come from bench.server.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from prometheus_client import REGISTRY
from safetensors.torch import save_file

from app.cli import server_config
from app.config import Settings
from app.main import create_app
from app.registry import ModelRegistry
from app.tokenizers.base import AudioInfo
from app.tokenizers.native import NATIVE_ARCHITECTURES
from app.tokenizers.plugins import ENTRY_POINT_GROUP, find_backend
from bench.server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout; found from bench.mutate's copy of the tree (mutants/) too
SHARED_DATA = next(
    (root / "shared" / "data" for root in REPO_ROOT.parents if (root / "shared" / "data").is_dir()),
    REPO_ROOT.parent / "shared" / "data",
)

TINY_IMAGE = {
    "name": "tiny-image",
    "backend": "native",
    "modality": "image",
    "architecture": "fsq_image",
    "arch": {
        "image_size": 64,
        "channels": [16, 32],
        "res_blocks": 1,
        "patch": 4,
        "levels": [8, 5, 5, 5],
    },
    "serving": {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 64},
}
TINY_AUDIO = {
    "name": "tiny-audio",
    "backend": "native",
    "modality": "audio",
    "architecture": "rvq_audio",
    "arch": {
        "sample_rate": 16000,
        "channels": 1,
        "base": 4,
        "ratios": [2, 4, 5, 8],
        "latent_dim": 16,
        "codebooks": 4,
        "codebook_size": 64,
    },
    "serving": {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 64},
}


def write_model(root: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A model folder with random weights drawn from ``seed``."""
    folder = root / config["name"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = NATIVE_ARCHITECTURES[config["architecture"]](config["arch"])
    save_file(
        {k: v.contiguous() for k, v in module.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_repo(root: Path) -> Path:
    write_model(root, TINY_IMAGE)
    write_model(root, TINY_AUDIO)
    return root


@asynccontextmanager
async def listening(
    settings: Settings, app: FastAPI | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` (by default create_app(settings)) served by uvicorn as `tokserve serve` serves
    it, on a free loopback port, with a client of that address."""
    settings = settings.model_copy(update={"port": free_port()})
    server = uvicorn.Server(server_config(app or create_app(settings), settings))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as http:
            yield http
    finally:
        server.should_exit = True
        await serving


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    """CPU settings over ``model_dir``: one instance of each model, unless the test says how
    many, so that what a test sees does not depend on the host's cores (instances=auto)."""
    return Settings(model_dir=[str(model_dir)], device="cpu", **{"instances": 1, **overrides})


@asynccontextmanager
async def served(
    settings: Settings, app: FastAPI | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app (by default create_app(settings)) with its lifespan running, behind an
    in-process HTTP client."""
    app = app or create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokserve") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def sample(name: str, **labels: str) -> float:
    """A Prometheus sample's current value, 0 before its labels were first used."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def png_bytes(width: int = 96, height: int = 80, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(
    seconds: float = 0.5, sample_rate: int = 16000, freq: float = 440.0, fmt: str = "WAV"
) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format=fmt)
    return buffer.getvalue()


def noisy_wav(samples: int, seed: int, sample_rate: int) -> bytes:
    """A float WAV of noise under a rising envelope: every frame of a codec different."""
    rng = np.random.default_rng(seed)
    wave = rng.normal(0, 0.2, samples) * np.linspace(0.2, 1.0, samples)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def live_ogg_opus(samples: np.ndarray) -> bytes:
    """Mono 48 kHz samples [T] as Ogg Opus, encoded by FFmpeg (PyAV) 20 ms at a time as a live
    recorder does; its first audio page's granule position says the audio starts 312 samples
    (its pre-skip) in."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as out:
        track = out.add_stream("libopus", rate=48000, layout="mono")
        for start in range(0, len(samples), 960):
            chunk = np.ascontiguousarray(samples[None, start : start + 960], np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = 48000
            out.mux(track.encode(frame))
        out.mux(track.encode(None))
    return buffer.getvalue()


def ffmpeg_audio(
    samples: np.ndarray,
    sample_rate: int,
    container: str,
    codec: str,
    video: bool = False,
    options: dict[str, str] | None = None,
) -> bytes:
    """Samples [C, T] float32 encoded by FFmpeg (PyAV) into ``container`` ("ipod": M4A, "mp4",
    "webm", "matroska", ...) with ``codec``; ``video`` adds a 64x48 moving grey video track
    before it, as a phone's recording has; ``options`` go to the muxer ("live": no duration)."""
    layout = {1: "mono", 2: "stereo"}[samples.shape[0]]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, options=options or {}) as out:
        picture = out.add_stream("mpeg4", rate=25) if video else None
        track = out.add_stream(codec, rate=sample_rate, layout=layout)
        if picture is not None:
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
            for index in range(math.ceil(samples.shape[1] / sample_rate * 25)):
                grey = np.full((48, 64, 3), index * 7 % 256, np.uint8)
                image = av.VideoFrame.from_ndarray(grey, format="rgb24")
                image.pts = index
                out.mux(picture.encode(image))
            out.mux(picture.encode(None))
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, np.float32), format="fltp", layout=layout
        )
        frame.sample_rate, frame.pts = sample_rate, 0
        out.mux(track.encode(frame))
        out.mux(track.encode(None))
    return buffer.getvalue()


TEXT = 1000  # tiny_layout's text vocabulary: ids 0 .. 999


def tiny_layout(folder: Path, repo: Path) -> Path:
    """``folder`` holding a layout "tiny" for tiny_repo's models: text ids below TEXT, 4
    markers, the image grid's codes, the codec's."""
    registry = ModelRegistry.load(settings_for(repo))
    image, audio = (registry.models[name].info for name in ("tiny-image", "tiny-audio"))
    assert isinstance(audio, AudioInfo)
    audio_at = TEXT + 4 + image.vocab_size
    spec = {
        "name": "tiny",
        "vocab_size": audio_at + audio.rows() * audio.vocab_size,
        "text_vocab_size": TEXT,
        "markers": {"boi": TEXT, "eoi": TEXT + 1, "boa": TEXT + 2, "eoa": TEXT + 3},
        "models": {
            "tiny-image": {"begin": "boi", "end": "eoi", "offset": TEXT + 4},
            "tiny-audio": {"begin": "boa", "end": "eoa", "offset": audio_at},
        },
    }
    folder.mkdir(exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(spec))
    return folder


DOCKERIGNORE_WILDCARDS = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides; `!` re-includes."""
    excluded = False
    for rule in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        regex = "".join(
            DOCKERIGNORE_WILDCARDS.get(token)
            or (token if token.startswith("[") else re.escape(token))
            for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|[^*?\[]+", pattern)
        )
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


async def in_chunks(body: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    """``body`` in chunks of ``size`` bytes, sent without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def held_body(body: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose last byte waits for ``release``: its request stays in flight until then."""
    yield body[:-1]
    await release.wait()
    yield body[-1:]


def problem_detail(response: httpx.Response, status: int) -> str:
    """The detail of a problem+json answer, once its status (in the line and the body) is
    checked: what a user reads, for a test to compare whole."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status, problem
    detail: str = problem["detail"]
    return detail


def install(site: Path, module: str, source: str, entry_points: str) -> None:
    """Lay a package out in ``site`` as pip installs one: its module and its .dist-info."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


def on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, entry_point: str
) -> Path:
    """A site folder holding one installed package, on this process's sys.path."""
    folder = tmp_path / "site"
    folder.mkdir()
    install(folder, module, source, entry_point)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, module, raising=False)
    find_backend.cache_clear()
    return folder


# Real speech (/work/shared/data) for the live-stream tests; the long clip is 9 s: at 8 kHz,
# 452 positions of Mimi's transformer, far past the tiny Mimi's sliding window
SPEECH = Path("/work/shared/data/audio/speech")
LONG_CLIP = SPEECH / "fillets-ng-data-nl-airplane-nl-let-v-oko.ogg"
SHORT_CLIP = SPEECH / "fillets-ng-data-nl-airplane-nl-let-m-divna.ogg"
CAUSAL_RATE, CAUSAL_VOCAB = 8000, 64


def tiny_encodec() -> Any:
    """A tiny causal EnCodec at 8 kHz: 320 samples a frame, 4 codebooks at 0.6 kbps."""
    import transformers  # here: importing it costs every other test module seconds

    return transformers.EncodecModel(
        transformers.EncodecConfig(
            sampling_rate=CAUSAL_RATE,
            hidden_size=16,
            num_filters=4,
            upsampling_ratios=[8, 5, 4, 2],
            codebook_size=CAUSAL_VOCAB,
            target_bandwidths=[0.3, 0.6],
            num_lstm_layers=1,
        )
    )


def _mimi() -> Any:
    """A tiny Mimi at 8 kHz: 320 samples a frame, 4 codebooks, a 2-layer transformer."""
    import transformers

    return transformers.MimiModel(
        transformers.MimiConfig(
            sampling_rate=CAUSAL_RATE,
            hidden_size=16,
            num_filters=4,
            upsampling_ratios=[8, 5, 4],
            codebook_size=CAUSAL_VOCAB,
            codebook_dim=16,
            num_quantizers=4,
            vector_quantization_hidden_dimension=16,
            upsample_groups=16,
            num_hidden_layers=2,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            layer_scale_initial_scale=1.0,  # the transformer's share of the latents is not 1%
            sliding_window=24,  # 12 frames: a few seconds of speech go far past it
        )
    )


# codebooks spread over the latents, so that tokens vary from frame to frame
BUILDERS = {"encodec": (tiny_encodec, 0.08), "mimi": (_mimi, 3.0)}


def causal_repo(root: Path, checkpoints: Path) -> Path:
    """``root``: a repository with tiny EnCodec and Mimi checkpoints (transformers, saved under
    ``checkpoints``) and the tiny native codec, which is not causal."""
    tiny_repo(root)
    for name, (build, scale) in BUILDERS.items():
        torch.manual_seed(0)
        model = build().eval()
        with torch.no_grad():
            for buffer_name, buffer in model.named_buffers():
                if buffer_name.endswith((".embed", ".embed_sum")):
                    buffer.normal_(0, scale)
        model.save_pretrained(checkpoints / name)
        (root / name).mkdir()
        config = {"backend": "transformers", "class": type(model).__name__}
        config["source"] = str(checkpoints / name)
        (root / name / "config.json").write_text(json.dumps(config))
    return root
