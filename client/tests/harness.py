"""What the client's tests share: real tokserve servers of the shipped models, run by the
server's own python (TOKSERVE_SERVER_PYTHON, which `make test-client` sets to .venv's) while
these tests run in client/.venv, where torch is not installed; the server's metrics; transports
that watch the client's requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO_ROOT))  # bench.server: the launcher the server's own tests use

from bench.server import free_port, server_process  # noqa: E402

__all__ = ["free_port"]  # for the tests, from bench.server

SERVER_PYTHON = os.environ.get(
    "TOKSERVE_SERVER_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python")
)
MODELS = "image-fsq-256,audio-rvq-24k"
PHOTO = (REPO_ROOT / "examples" / "photo.jpg").read_bytes()
SPEECH = (REPO_ROOT / "examples" / "speech.ogg").read_bytes()
# MAX_ITEMS 3 so that short lists split; a body of two photos at most besides multipart's share
MAX_ITEMS = 3
MAX_BODY_BYTES = 64 * 1024 + 2 * len(PHOTO) + 1024
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def serve(**env: str) -> Iterator[str]:
    """A server of the shipped models with TOKSERVE_* ``env``; yields its base URL."""
    settings = {"TOKSERVE_MODELS": MODELS, "TOKSERVE_LOG_LEVEL": "WARNING", **env}
    with server_process(REPO_ROOT / "models", python=SERVER_PYTHON, **settings) as (_, url):
        yield url


def unique(blob: bytes, nonce: str) -> bytes:
    """``blob`` with ``nonce`` after its end: the same media, which decoders read alike, under
    another cache key."""
    return blob + nonce.encode()


def noise_png(seed: int, side: int = 64) -> bytes:
    """A ``side``-pixel square RGB PNG of noise: an image whose tokens no other seed shares."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side * 3), dtype=np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter 0 before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the server's ``name`` samples whose labels include ``labels``, from /metrics."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = SAMPLE.match(line)
        if (
            match
            and match[1] == name
            and labels.items() <= dict(LABEL.findall(match[2] or "")).items()
        ):
            total += float(match[3])
    return total


def encode_requests(url: str, route: str = "/v1/images/encode") -> float:
    """Requests the server has answered on ``route``, from its own metrics."""
    return metric(url, "tokserve_request_duration_seconds_count", route=route)


class Wave:
    """Counts the encode requests in flight through a transport. The first ``size`` wait for
    each other, up to ``wait_s``, before going on: a client that allows ``size`` at once has
    them all in flight together (``peak == size``), one that allows fewer is caught waiting
    alone (``peak < size``), and one that allows more starts the rest meanwhile
    (``peak > size``)."""

    def __init__(self, size: int, wait_s: float = 5.0) -> None:
        self.size = size
        self.wait_s = wait_s
        self.in_flight = self.started = self.peak = 0

    def enter(self, request: httpx.Request) -> bool:
        """Count ``request`` in; whether it must wait for the rest of the first wave."""
        self.in_flight += 1
        self.started += 1
        self.peak = max(self.peak, self.in_flight)
        return self.started <= self.size

    def full(self) -> bool:
        return self.started >= self.size


class GatedTransport(httpx.HTTPTransport):
    """A Wave over the sync client's POSTs (its GET of /v1/models passes uncounted)."""

    def __init__(self, wave: Wave) -> None:
        super().__init__()
        self.wave = wave
        self.changed = threading.Condition()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return super().handle_request(request)
        with self.changed:
            if self.wave.enter(request):
                self.changed.notify_all()
                self.changed.wait_for(self.wave.full, self.wave.wait_s)
        try:
            return super().handle_request(request)
        finally:
            with self.changed:
                self.wave.in_flight -= 1


class AsyncGatedTransport(httpx.AsyncHTTPTransport):
    """A Wave over the async client's POSTs (its GET of /v1/models passes uncounted)."""

    def __init__(self, wave: Wave) -> None:
        super().__init__()
        self.wave = wave
        self.changed = asyncio.Condition()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return await super().handle_async_request(request)
        async with self.changed:
            if self.wave.enter(request):
                self.changed.notify_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait_for(self.wave.full), self.wave.wait_s)
        try:
            return await super().handle_async_request(request)
        finally:
            self.wave.in_flight -= 1


@dataclass(frozen=True)
class Exchange:
    """One request the client sent: when (time.monotonic()), and the status and time of its
    answer."""

    sent: float
    status: int
    answered: float


class Log:
    """The client's POSTs as Exchanges; sets ``on_503`` at the first 503."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.on_503 = threading.Event()

    def note(self, request: httpx.Request, sent: float, response: httpx.Response) -> None:
        if request.method == "POST":
            self.exchanges.append(Exchange(sent, response.status_code, time.monotonic()))
            if response.status_code == 503:
                self.on_503.set()

    def statuses(self) -> list[int]:
        return [exchange.status for exchange in self.exchanges]


class RecordingTransport(httpx.HTTPTransport):
    """The sync client's requests, into ``log``."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = super().handle_request(request)
        self.log.note(request, sent, response)
        return response


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    """The async client's requests, into ``log``."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = await super().handle_async_request(request)
        self.log.note(request, sent, response)
        return response


def hold_the_only_slot(url: str, release: threading.Event) -> threading.Thread:
    """Occupy a TOKSERVE_MAX_IN_FLIGHT=1 server: an encode whose body stops halfway until
    ``release`` is set. Returns once the server counts it in flight (it admits a request before
    reading its body); join the thread after setting ``release``."""

    def body() -> Iterator[bytes]:
        yield PHOTO[:1000]
        release.wait(60)
        yield PHOTO[1000:]

    holder = threading.Thread(
        target=httpx.post,
        args=(f"{url}/v1/images/encode",),
        kwargs={"content": body(), "timeout": 60},
    )
    holder.start()
    deadline = time.monotonic() + 10
    while metric(url, "tokserve_requests_in_flight") < 1:
        assert time.monotonic() < deadline, "the holding request never reached the server"
        time.sleep(0.02)
    return holder
