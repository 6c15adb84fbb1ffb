"""The real server: `tokserve serve` as a process on a free port, spoken to over loopback HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import REPO_ROOT, free_port, png_bytes, wav_bytes


@contextmanager
def server_process(model_dir: Path, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start `python -m app.cli serve` and wait until /readyz answers 200."""
    port = free_port()
    environment = {
        **os.environ,
        "TOKSERVE_MODEL_DIR": str(model_dir),
        "TOKSERVE_PORT": str(port),
        "TOKSERVE_DEVICE": "cpu",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read().decode() if process.stderr else "")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready in 60 s"
            time.sleep(0.1)
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def encode_both(url: str) -> tuple[list[list[int]], list[list[int]]]:
    image = httpx.post(f"{url}/v1/images/encode", content=png_bytes(seed=11), timeout=30)
    audio = httpx.post(f"{url}/v1/audio/encode", content=wav_bytes(seconds=0.4), timeout=30)
    assert image.status_code == 200 and audio.status_code == 200
    return image.json()["items"][0]["tokens"], audio.json()["items"][0]["tokens"]


def test_two_fresh_processes_give_identical_tokens(repo: Path) -> None:
    with server_process(repo) as (_, first_url):
        first = encode_both(first_url)
    with server_process(repo) as (_, second_url):
        second = encode_both(second_url)
    assert first == second


def test_sigterm_exits_zero_after_answering_in_flight_requests(repo: Path) -> None:
    with server_process(repo) as (process, url):
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
