"""Shared test set-up: tiny randomly initialised model repositories and a served app."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save_file

from app.config import Settings
from app.main import create_app
from app.registry import NATIVE_ARCHITECTURES

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

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


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_dir=[str(model_dir)], device="cpu", **overrides)


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, behind an in-process HTTP client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokserve") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(model_dir: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start `python -m app.cli serve` on a free port and wait until /readyz answers 200."""
    port = free_port()
    environment = {
        **os.environ,
        "TOKSERVE_MODEL_DIR": str(model_dir),
        "TOKSERVE_PORT": str(port),
        "TOKSERVE_DEVICE": "cpu",
        **env,
    }
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, url, log)
            yield process, url
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def wait_ready(process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    """Poll /readyz for up to 60 s; a process that dies fails with its log."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited {process.returncode}:\n{log.read().decode()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready in 60 s"
        time.sleep(0.1)
