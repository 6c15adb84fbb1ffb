"""The servers under test as child processes on free loopback ports: tokserve
(``python -m app.cli serve``) and its LitServe peer (``python -m bench.peer``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(
    model_dir: Path, ready_timeout_s: float = 120.0, python: str = sys.executable, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start the server over ``model_dir`` with TOKSERVE_* ``env``, run by ``python`` (the
    client's tests, in a venv without torch, name the server's); yield the process and its base
    URL once /readyz answers 200; on exit SIGTERM it (it drains) and wait."""
    port = free_port()
    environment = {
        **os.environ,
        "TOKSERVE_HOST": "127.0.0.1",
        "TOKSERVE_PORT": str(port),
        "TOKSERVE_MODEL_DIR": str(model_dir),
        **env,
    }
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [python, "-m", "app.cli", "serve"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, url, log, ready_timeout_s)
            yield process, url
        finally:
            if process.poll() is None:
                stop(process, signal.SIGTERM, 60)


def stop(process: subprocess.Popen[Any], sig: int, timeout_s: float) -> None:
    """Send ``sig`` and wait for the process to exit; kill it past ``timeout_s``."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def serving_process(
    model_dir: Path, device: str, models: list[str], ready_timeout_s: float = 300.0, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The benchmark's server: only ``models``, on ``device``, quiet logs; yields its process
    and base URL."""
    settings = {
        "TOKSERVE_MODELS": ",".join(models),
        "TOKSERVE_DEVICE": device,
        "TOKSERVE_LOG_LEVEL": "WARNING",
    }
    with server_process(model_dir, ready_timeout_s, **settings, **env) as served:
        yield served


@contextmanager
def serving(
    model_dir: Path, device: str, models: list[str], ready_timeout_s: float = 300.0, **env: str
) -> Iterator[str]:
    """The benchmark's server (serving_process); yields its base URL."""
    with serving_process(model_dir, device, models, ready_timeout_s, **env) as (_, url):
        yield url


@contextmanager
def litserve_serving(
    model_dir: Path, device: str, models: list[str], ready_timeout_s: float = 300.0
) -> Iterator[str]:
    """The LitServe peer (bench/peer.py) over ``models`` on ``device``; yields its base URL
    once its /health answers 200 (every worker has loaded its model). It runs in a process
    group of its own, which is stopped whole on exit: LitServe's API servers and inference
    workers are processes of their own that outlive a SIGTERM to the main one."""
    port = free_port()
    environment = {**os.environ, "TOKSERVE_DEVICE": device, "TOKSERVE_MODEL_DIR": str(model_dir)}
    command = [sys.executable, "-m", "bench.peer", "--port", str(port)]
    command += ["--model-dir", str(model_dir), "--models", ",".join(models)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, url, log, ready_timeout_s, "/health")
            yield url
        finally:
            stop_group(process, 10)


def stop_group(process: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM ``process``'s whole process group (it leads one), SIGKILL it past ``timeout_s``."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    log: IO[bytes],
    timeout_s: float = 120.0,
    path: str = "/readyz",
) -> None:
    """Poll ``path``; a server that exits or stays unready fails with its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    log.seek(0)
    output = log.read().decode(errors="replace")[-4000:]
    state = f"exited with {process.returncode}" if process.poll() is not None else "is not ready"
    raise RuntimeError(f"the server {state} after start:\n{output}")
