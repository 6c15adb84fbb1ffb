"""``python -m bench.soak``: the service under overload and hostile clients for minutes on end.

The run, in order: start the server (shipped models, embedded cache), or use ``--url``; encode
a few photos and clips through it for the decode requests' tokens; send the well-formed requests
one at a time (the unloaded latency); find the saturation rate of the well-formed mix in a short
closed-loop phase (or take ``--rate``); idle, and read the server's RSS, open file descriptors
and threads from /proc; then, for ``--duration-s``, send requests at twice the saturation rate,
open loop (Poisson arrivals that do not wait for answers): the well-formed mix with each HOSTILE
kind among it, about a third of the traffic. Meanwhile a separate process probes /healthz every
100 ms on a new connection (as a kubelet does), and the RSS is read every second. After the last
answer and the same idle, RSS, descriptors and threads again. One JSON object goes to stdout
(and ``--out``); progress to stderr.

Every request is counted by kind and outcome: the HTTP status, or ``client_closed`` (this client
hung up on purpose), ``connection_error``, ``timeout`` (no answer within ``--client-timeout-s``).
At most ``--max-in-flight`` requests are out at once; arrivals beyond that are counted as not
sent, so that a server that answers nothing cannot exhaust this process's descriptors.
Latencies run from the moment a request was due, so a client that falls behind shows in them.

    python -m bench.soak [--duration-s 600] [--rate R] [--url URL [--pid PID]] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import msgpack
import numpy as np
import soundfile as sf
from PIL import Image

from bench import machine
from bench.loadgen import CallFactory, LevelPlan, percentile, run_level, wait_idle
from bench.media import audio_clips, image_file, photos, unique_copy, wav_file
from bench.memory import CONFIGURATIONS, JEMALLOC
from bench.report import emit
from bench.server import REPO_ROOT, server_process
from bench.workloads import MSGPACK, unique_token_requests, unique_uploads

# the allocator docker/Dockerfile sets, so a started server keeps memory as a deployed one does
ALLOCATOR = CONFIGURATIONS["jemalloc"]

log = logging.getLogger("bench")

WELL_FORMED = ("image_encode", "image_decode", "audio_encode", "audio_decode")
HOSTILE = (
    "decode_100k_items",
    "tokens_32mb_binary",
    "tokens_32mb_list",
    "wav_1hz_600_frames",
    "png_6x40mp",
    "truncated_png",
    "truncated_wav",
    "one_bad_item",
    "slow_body",
    "disconnect_mid_upload",
    "disconnect_mid_response",
)
# arrivals per round of the mix: 4 x 5 well-formed, 11 x 1 hostile (35% of the traffic)
WEIGHTS = {**dict.fromkeys(WELL_FORMED, 5), **dict.fromkeys(HOSTILE, 1)}
TOKEN_BODY_BYTES = 32 * 2**20
MANY_ITEMS = 100_000
BIG_IMAGE = (8000, 5000)  # width, height: 40,000,000 pixels, TOKSERVE_MAX_IMAGE_PIXELS itself
BIG_IMAGES = 6
SLOW_PIECES, SLOW_PAUSE_S = 10, 0.3
HEALTHZ_INTERVAL_S = 0.1
RSS_INTERVAL_S = 1.0
GOAL_HEALTHZ_P99_MS = 50.0
GOAL_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Shot:
    """One request of the soak. ``mode``: ``normal`` (aiohttp), or by hand over a raw socket:
    ``slow`` (the body in pieces with pauses), ``cut_upload`` (headers and half the body, then
    close), ``cut_response`` (the whole request, then close after the status line)."""

    kind: str
    path: str
    body: bytes
    headers: dict[str, str]
    mode: str = "normal"


# --- the hostile bodies -------------------------------------------------------------------------


def many_items_body(count: int = MANY_ITEMS) -> bytes:
    """msgpack ``{"tokens": [[[0]], ...]}``: ``count`` items of one codebook and one frame."""
    return msgpack.packb({"tokens": [[[0]]] * count})


def binary_tokens_body(size: int = TOKEN_BODY_BYTES) -> bytes:
    """msgpack with one binary item of ``size`` bytes of int32 zeros, shape [1, size / 4]."""
    item = {"dtype": "<i4", "shape": [1, size // 4], "data": bytes(size)}
    return msgpack.packb({"tokens": item})


def list_tokens_body(size: int = TOKEN_BODY_BYTES) -> bytes:
    """msgpack ``{"tokens": [[0, 0, ...]]}`` of about ``size`` bytes: one row of that many ids
    (a 0 packs to one byte), written directly rather than through a list of 32M ints."""
    head = msgpack.packb("tokens")
    return b"\x81" + head + b"\x91\xdd" + struct.pack(">I", size) + bytes(size)


def one_hertz_wav() -> bytes:
    """A 644-byte WAV whose header declares 1 Hz and 600 frames: ten minutes of audio."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(600), 1, format="WAV", subtype="PCM_U8")
    return buffer.getvalue()


def big_png(size: tuple[int, int] = BIG_IMAGE) -> bytes:
    """A horizontal gradient PNG of size (width, height): every row alike, so it compresses
    about 1000:1 (8000x5000: 127 kB) yet decodes to width x height x 3 bytes."""
    width, height = size
    row = np.linspace(0, 255, width).astype(np.uint8)
    pixels = np.ascontiguousarray(np.broadcast_to(row[None, :, None], (height, width, 3)))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(files: list[tuple[bytes, str]], boundary: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``files`` part per (bytes, media type), and its
    Content-Type."""
    parts = []
    for index, (blob, media_type) in enumerate(files):
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="item-{index}"\r\nContent-Type: {media_type}\r\n\r\n'
        )
        parts.append(head.encode() + blob + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def truncated(blob: bytes, nonce: int) -> bytes:
    """The first half of a PNG or WAV, with a nonce so that no two are alike (a truncated file
    that does decode would otherwise be answered from the cache)."""
    if blob[:4] == b"RIFF":  # the nonce chunk goes at the end, after the cut data chunk
        return unique_copy(blob[: len(blob) // 2], nonce)
    copy = unique_copy(blob, nonce)  # PNG: the nonce right after the header
    return copy[: len(copy) // 2]


# --- the traffic --------------------------------------------------------------------------------


@dataclass
class Media:
    """Inputs of the valid requests, in the served models' formats, and their tokens."""

    image_model: str
    audio_model: str
    jpegs: list[bytes]
    pngs: list[bytes]
    wavs: list[bytes]
    grids: list[np.ndarray]  # tokens of the JPEGs, [h, w]
    codes: list[np.ndarray]  # tokens of the WAVs, [K, F]
    image_vocab: int
    audio_vocab: int


class Traffic:
    """Builds the next request of each kind; encodes carry a nonce so the cache answers none."""

    def __init__(self, media: Media) -> None:
        self.media = media
        image_q, audio_q = f"?model={media.image_model}", f"?model={media.audio_model}"
        self.image_encode = f"/v1/images/encode{image_q}"
        self.image_decode = f"/v1/images/decode{image_q}"
        self.audio_encode = f"/v1/audio/encode{audio_q}"
        self.audio_decode = f"/v1/audio/decode{audio_q}"
        self.valid: dict[str, CallFactory] = {
            "image_encode": unique_uploads(self.image_encode, media.jpegs, "image/jpeg"),
            "image_decode": unique_token_requests(
                self.image_decode, media.image_model, media.grids, media.image_vocab
            ),
            "audio_encode": unique_uploads(self.audio_encode, media.wavs, "audio/wav"),
            "audio_decode": unique_token_requests(
                self.audio_decode, media.audio_model, media.codes, media.audio_vocab
            ),
        }
        self.nonces = itertools.count(10**9)  # apart from the valid factories' own
        self.many_items = many_items_body()
        self.binary_tokens = binary_tokens_body()
        self.list_tokens = list_tokens_body()
        self.one_hertz = one_hertz_wav()
        self.big_png = big_png()
        self.builders: dict[str, Callable[[], Shot]] = {
            **{kind: self._valid(kind) for kind in WELL_FORMED},
            "decode_100k_items": lambda: self._msgpack("decode_100k_items", self.many_items),
            "tokens_32mb_binary": lambda: self._msgpack(
                "tokens_32mb_binary", self.binary_tokens, self.image_decode
            ),
            "tokens_32mb_list": lambda: self._msgpack("tokens_32mb_list", self.list_tokens),
            "wav_1hz_600_frames": self._one_hertz,
            "png_6x40mp": self._big_pngs,
            "truncated_png": self._truncated_png,
            "truncated_wav": self._truncated_wav,
            "one_bad_item": self._one_bad_item,
            "slow_body": self._slow_body,
            "disconnect_mid_upload": self._cut_upload,
            "disconnect_mid_response": self._cut_response,
        }

    def next(self, kind: str) -> Shot:
        """The next request of ``kind``."""
        return self.builders[kind]()

    def well_formed(self) -> CallFactory:
        """The valid kinds in their soak proportions, as the closed-loop load generator's calls."""
        kinds = weighted_cycle({kind: WEIGHTS[kind] for kind in WELL_FORMED})
        return lambda: self.valid[next(kinds)]()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each kind's path, body size (a sample) and weight in the mix."""
        described = {}
        for kind in WEIGHTS:
            shot = self.next(kind)
            described[kind] = {
                "path": shot.path,
                "body_bytes": len(shot.body),
                "mode": shot.mode,
                "weight": WEIGHTS[kind],
            }
        return described

    def _valid(self, kind: str) -> Callable[[], Shot]:
        def build() -> Shot:
            call = self.valid[kind]()
            return Shot(kind, call.path, call.body, dict(call.headers))

        return build

    def _msgpack(self, kind: str, body: bytes, path: str = "") -> Shot:
        return Shot(kind, path or self.audio_decode, body, {"Content-Type": MSGPACK})

    def _one_hertz(self) -> Shot:
        body = unique_copy(self.one_hertz, next(self.nonces))
        return Shot("wav_1hz_600_frames", self.audio_encode, body, {"Content-Type": "audio/wav"})

    def _big_pngs(self) -> Shot:
        files = [
            (unique_copy(self.big_png, next(self.nonces)), "image/png") for _ in range(BIG_IMAGES)
        ]
        body, content_type = multipart(files, f"soak{next(self.nonces)}")
        return Shot("png_6x40mp", self.image_encode, body, {"Content-Type": content_type})

    def _truncated_png(self) -> Shot:
        png = self.media.pngs[0]
        body = truncated(png, next(self.nonces))
        return Shot("truncated_png", self.image_encode, body, {"Content-Type": "image/png"})

    def _truncated_wav(self) -> Shot:
        body = truncated(self.media.wavs[0], next(self.nonces))
        return Shot("truncated_wav", self.audio_encode, body, {"Content-Type": "audio/wav"})

    def _one_bad_item(self) -> Shot:
        good = [
            unique_copy(self.media.jpegs[i % len(self.media.jpegs)], next(self.nonces))
            for i in range(3)
        ]
        files = [(blob, "image/jpeg") for blob in good]
        files.insert(2, (b"this is not an image, it is text", "image/jpeg"))
        body, content_type = multipart(files, f"soak{next(self.nonces)}")
        return Shot("one_bad_item", self.image_encode, body, {"Content-Type": content_type})

    def _slow_body(self) -> Shot:
        call = self.valid["image_encode"]()
        return Shot("slow_body", call.path, call.body, dict(call.headers), "slow")

    def _cut_upload(self) -> Shot:
        call = self.valid["audio_encode"]()
        return Shot("disconnect_mid_upload", call.path, call.body, dict(call.headers), "cut_upload")

    def _cut_response(self) -> Shot:
        call = self.valid["audio_decode"]()
        return Shot(
            "disconnect_mid_response", call.path, call.body, dict(call.headers), "cut_response"
        )


def weighted_cycle(weights: dict[str, int]) -> Iterator[str]:
    """Kinds forever, each ``weight`` times per round, spread out (smooth weighted round robin):
    every kind comes within one round, so even a short run sends each of them."""
    current = dict.fromkeys(weights, 0)
    total = sum(weights.values())
    while True:
        for kind, weight in weights.items():
            current[kind] += weight
        chosen = max(current, key=lambda kind: current[kind])
        current[chosen] -= total
        yield chosen


# --- sending ------------------------------------------------------------------------------------


@dataclass
class Record:
    """One request's outcome: an HTTP status or a client-side word, and seconds since due."""

    kind: str
    due_s: float  # since the soak started
    outcome: str
    latency_s: float


async def send(session: aiohttp.ClientSession, url: str, shot: Shot) -> str:
    """Send one request; its outcome (HTTP status as text, or client_closed)."""
    if shot.mode == "normal":
        async with session.post(shot.path, data=shot.body, headers=shot.headers) as response:
            await response.read()
            return str(response.status)
    return await send_raw(url, shot)


async def send_raw(url: str, shot: Shot) -> str:
    """HTTP/1.1 written by hand, for what aiohttp will not do: pause mid-body, or hang up."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {shot.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in shot.headers.items())
    head += f"Content-Length: {len(shot.body)}\r\nConnection: close\r\n\r\n"
    try:
        writer.write(head.encode())
        body = shot.body
        if shot.mode == "cut_upload":
            writer.write(body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(0.1)  # the server is reading the body now
            return "client_closed"
        if shot.mode == "slow":
            step = math.ceil(len(body) / SLOW_PIECES)
            for start in range(0, len(body), step):
                writer.write(body[start : start + step])
                await writer.drain()
                await asyncio.sleep(SLOW_PAUSE_S)
        else:
            writer.write(body)
            await writer.drain()
        status = await _status(reader)
        if shot.mode != "cut_response":
            await reader.read()  # the rest, to the close that Connection: close asks for
        return status
    except ConnectionError:
        # the server may have answered and closed before the whole body was sent
        with suppress(ConnectionError, ValueError):
            return await _status(reader)
        raise
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


async def _status(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    match = re.match(rb"HTTP/1\.[01] (\d{3})", line)
    if not match:
        raise ConnectionError(f"no status line, got {line[:40]!r}")
    return match.group(1).decode()


async def timed(
    session: aiohttp.ClientSession, url: str, shot: Shot, timeout_s: float
) -> tuple[str, float]:
    """Send one request; its outcome and the seconds it took (the time-out, if it ran out)."""
    started = time.perf_counter()
    try:
        outcome = await asyncio.wait_for(send(session, url, shot), timeout_s)
    except TimeoutError:
        outcome = "timeout"
    except (aiohttp.ClientError, OSError, EOFError):
        outcome = "connection_error"
    except Exception as exc:  # counted, not lost in a task nobody awaits
        outcome = f"client_error_{type(exc).__name__}"
    return outcome, time.perf_counter() - started


def new_session(url: str, timeout_s: float) -> aiohttp.ClientSession:
    """An aiohttp session with no connection limit: open-loop arrivals must not queue here."""
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(
        url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def unloaded(url: str, traffic: Traffic, per_kind: int, timeout_s: float) -> list[Record]:
    """Each well-formed kind ``per_kind`` times, one request at a time."""
    records = []
    kinds = weighted_cycle(dict.fromkeys(WELL_FORMED, 1))
    async with new_session(url, timeout_s) as session:
        for _ in range(per_kind * len(WELL_FORMED)):
            shot = traffic.next(next(kinds))
            outcome, seconds = await timed(session, url, shot, timeout_s)
            records.append(Record(shot.kind, 0.0, outcome, seconds))
    return records


@dataclass
class Soak:
    """The open-loop phase's records and what the client itself did."""

    records: list[Record] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)  # over max_in_flight: never sent
    start_lag_s: list[float] = field(default_factory=list)  # how late each request went out
    peak_in_flight: int = 0
    started: float = 0.0  # time.monotonic() of the first arrival's clock
    wall_s: float = 0.0  # to the last answer
    client_cpu_s: float = 0.0


async def open_loop(
    url: str,
    traffic: Traffic,
    rate_rps: float,
    duration_s: float,
    timeout_s: float,
    max_in_flight: int,
    seed: int,
) -> Soak:
    """Poisson arrivals at ``rate_rps`` for ``duration_s``, kinds in WEIGHTS' proportions; then
    wait for every answer (each is bounded by ``timeout_s``)."""
    soak = Soak()
    draw = random.Random(seed)
    kinds = weighted_cycle(WEIGHTS)
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    cpu_started = time.process_time()
    async with new_session(url, timeout_s) as session:

        async def fire(shot: Shot, due_s: float) -> None:
            outcome, _ = await timed(session, url, shot, timeout_s)
            latency_s = loop.time() - started - due_s
            soak.records.append(Record(shot.kind, due_s, outcome, latency_s))

        started = loop.time()
        soak.started = time.monotonic()
        due_s = 0.0
        while True:
            due_s += draw.expovariate(rate_rps)
            if due_s >= duration_s:
                break
            delay = started + due_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = next(kinds)
            if len(in_flight) >= max_in_flight:
                soak.refused[kind] += 1
                continue
            shot = traffic.next(kind)
            soak.start_lag_s.append(loop.time() - started - due_s)
            task = asyncio.create_task(fire(shot, due_s))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            soak.peak_in_flight = max(soak.peak_in_flight, len(in_flight))
        log.info("arrivals done; waiting for %d answers", len(in_flight))
        if in_flight:
            await asyncio.wait(set(in_flight))
    soak.wall_s = loop.time() - started
    soak.client_cpu_s = time.process_time() - cpu_started
    return soak


# --- watching the server ------------------------------------------------------------------------


class ServerProcess:
    """The server's RSS (read every second on a thread), open descriptors and threads."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []  # (monotonic s, VmRSS kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def __enter__(self) -> ServerProcess:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.status_kb("VmRSS")
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._stop.wait(RSS_INTERVAL_S)

    def status_kb(self, field_name: str) -> int | None:
        """A kB figure of /proc/<pid>/status (VmRSS, VmHWM), None if it cannot be read."""
        if self.pid is None:
            return None
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def count(self, folder: str) -> int | None:
        """Entries of /proc/<pid>/<folder>: ``fd`` (open descriptors) or ``task`` (threads)."""
        if self.pid is None:
            return None
        try:
            return len(os.listdir(f"/proc/{self.pid}/{folder}"))
        except OSError:
            return None

    def alive(self) -> bool:
        """Whether the process still runs (a zombie, dead but not yet reaped, does not)."""
        if self.pid is None:
            return False
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        return re.search(r"^State:\s+[ZX]", text, re.MULTILINE) is None

    def snapshot(self) -> dict[str, int | None]:
        """RSS, open descriptors and threads right now."""
        return {
            "rss_kb": self.status_kb("VmRSS"),
            "fds": self.count("fd"),
            "threads": self.count("task"),
        }

    def peak_kb(self, since: float, until: float) -> int | None:
        """The highest RSS sampled between two time.monotonic() readings."""
        inside = [rss for t, rss in self.samples if since <= t <= until]
        return max(inside) if inside else None


def listening_pid(port: int) -> int | None:
    """The process listening on a local TCP port (through /proc), if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").glob("[0-9]*"):
        with suppress(OSError):
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
    return None


# A separate process, so that the load generator's busy event loop does not delay the probes;
# a new connection each time, as a kubelet's liveness probe opens one. Stops when stdin closes.
HEALTHZ_PROBE = r"""
import http.client, json, select, sys, time
host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
probes, tick = [], time.monotonic()
while not select.select([sys.stdin], [], [], max(0.0, tick - time.monotonic()))[0]:
    sent = time.monotonic()
    status = 0
    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        pass
    finally:
        connection.close()
    probes.append([round(sent, 3), round(1000 * (time.monotonic() - sent), 3), status])
    tick = max(tick + interval, time.monotonic())
json.dump(probes, sys.stdout)
"""


class HealthzProbe:
    """/healthz every HEALTHZ_INTERVAL_S from a child process while the context is open."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.args = [parts.hostname or "127.0.0.1", str(parts.port or 80), str(HEALTHZ_INTERVAL_S)]
        self.probes: list[tuple[float, float, int]] = []  # (monotonic s, ms, status; 0: failed)

    def __enter__(self) -> HealthzProbe:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HEALTHZ_PROBE, *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.process.communicate(timeout=30)  # closes stdin: the probe stops
        self.probes = [(sent, ms, status) for sent, ms, status in json.loads(out or b"[]")]

    def summary(self) -> dict[str, Any]:
        """How many probes, how many failed, their p50/p99/max in ms, and the p99 goal."""
        times = sorted(ms for _, ms, _ in self.probes)
        failed = sum(1 for *_, status in self.probes if status != 200)
        p99 = percentile(times, 99)
        return {
            "interval_s": HEALTHZ_INTERVAL_S,
            "probes": len(times),
            "not_200": failed,
            "p50_ms": _ms(percentile(times, 50)),
            "p99_ms": _ms(p99),
            "max_ms": _ms(times[-1]) if times else None,
            "over_50_ms": sum(1 for ms in times if ms >= GOAL_HEALTHZ_P99_MS),
        }


# --- the run ------------------------------------------------------------------------------------


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 2)


def latency_summary(records: list[Record]) -> dict[str, Any]:
    """p50/p99 (ms) of the 2xx answers among ``records``, overall and per kind."""

    def figures(chosen: list[Record]) -> dict[str, Any]:
        times = sorted(1000 * r.latency_s for r in chosen if r.outcome.startswith("2"))
        return {
            "requests": len(chosen),
            "answered_2xx": len(times),
            "p50_ms": _ms(percentile(times, 50)),
            "p99_ms": _ms(percentile(times, 99)),
        }

    kinds = sorted({r.kind for r in records}, key=list(WEIGHTS).index)
    return {
        **figures(records),
        "by_kind": {kind: figures([r for r in records if r.kind == kind]) for kind in kinds},
    }


def kind_counts(soak: Soak) -> dict[str, Any]:
    """Per kind: requests sent, outcomes, and p50/p99 ms of all its answered requests."""
    counts: dict[str, Any] = {}
    for kind in WEIGHTS:
        mine = [r for r in soak.records if r.kind == kind]
        times = sorted(1000 * r.latency_s for r in mine)
        counts[kind] = {
            "sent": len(mine),
            "statuses": dict(sorted(Counter(r.outcome for r in mine).items())),
            "p50_ms": _ms(percentile(times, 50)),
            "p99_ms": _ms(percentile(times, 99)),
        }
        if soak.refused[kind]:
            counts[kind]["not_sent_client_limit"] = soak.refused[kind]
    return counts


def timeline(
    soak: Soak,
    duration_s: float,
    windows: int,
    server: ServerProcess,
    probes: list[tuple[float, float, int]],
    started: float,
) -> list[dict[str, Any]]:
    """The arrival phase in ``windows`` slices: requests due then, their 2xx and 5xx answers, the
    well-formed ones' p99, the /healthz p99 and the server's peak RSS meanwhile."""
    width = duration_s / windows
    slices = []
    for index in range(windows):
        begin, end = index * width, (index + 1) * width
        mine = [r for r in soak.records if begin <= r.due_s < end]
        valid = sorted(
            1000 * r.latency_s for r in mine if r.kind in WELL_FORMED and r.outcome.startswith("2")
        )
        health = sorted(ms for sent, ms, _ in probes if begin <= sent - started < end)
        rss = server.peak_kb(started + begin, started + end)
        slices.append(
            {
                "from_s": round(begin, 1),
                "requests": len(mine),
                "2xx": sum(1 for r in mine if r.outcome.startswith("2")),
                "5xx": sum(1 for r in mine if r.outcome.startswith("5")),
                "well_formed_p99_ms": _ms(percentile(valid, 99)),
                "healthz_p99_ms": _ms(percentile(health, 99)),
                "rss_peak_mb": round(rss / 1024, 1) if rss else None,
            }
        )
    return slices


def goal(value: Any, target: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "met": met}


async def encode_tokens(url: str, path: str, blob: bytes, media_type: str) -> np.ndarray:
    """The token array of one upload, through the server (msgpack answer)."""
    async with new_session(url, 600.0) as session:
        headers = {"Content-Type": media_type, "Accept": MSGPACK}
        async with session.post(path, data=blob, headers=headers) as response:
            response.raise_for_status()
            (item,) = msgpack.unpackb(await response.read())["items"]
    return np.frombuffer(item["tokens"], item["dtype"]).reshape(item["shape"])


async def prepare(url: str, data_dir: Path, images: int, clips: int) -> Media:
    """Photos and clips at the default (first listed) image and audio models' sizes, and their
    tokens from the server."""
    async with (
        new_session(url, 30.0) as session,
        session.get("/v1/models") as response,
    ):
        models = (await response.json())["models"]
    image = next(m for m in models if m["modality"] == "image")
    audio = next(m for m in models if m["modality"] == "audio")
    height, width = image["image_size"]
    pictures = photos(data_dir, (height, width), images)
    jpegs = [image_file(p, "jpeg") for p in pictures]
    pngs = [image_file(p, "png") for p in pictures[:1]]
    rate, channels = audio["sample_rate"], audio["channels"]
    wavs = [wav_file(c, rate) for c in audio_clips(data_dir, rate, channels, 5.0, clips)]
    image_path = f"/v1/images/encode?model={image['name']}"
    audio_path = f"/v1/audio/encode?model={audio['name']}"
    grids = [await encode_tokens(url, image_path, jpeg, "image/jpeg") for jpeg in jpegs[:4]]
    codes = [await encode_tokens(url, audio_path, wav, "audio/wav") for wav in wavs]
    return Media(
        image["name"],
        audio["name"],
        jpegs,
        pngs,
        wavs,
        grids,
        codes,
        image["vocab_size"],
        audio["vocab_size"],
    )


@dataclass
class Measured:
    """What the phases measured, before it is summarised."""

    traffic: Traffic
    unloaded: list[Record]
    saturation: dict[str, Any]
    rate_rps: float
    soak: Soak
    healthz: dict[str, Any]
    timeline: list[dict[str, Any]]
    before: dict[str, int | None]  # after warm-up and the idle, just before the soak
    after: dict[str, int | None]  # after the last answer and the idle
    rss_peak_kb: int | None  # sampled during the soak
    rss_hwm_kb: int | None  # the kernel's high-water mark over the server's life
    server_alive: bool


def cache_bytes(url: str) -> int | None:
    """Bytes the server's in-process cache holds (tokserve_cache_bytes): tokens it keeps on
    purpose, which RSS growth over a soak should not be blamed on."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^tokserve_cache_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


def measure(args: argparse.Namespace, url: str, pid: int | None) -> Measured:
    """The phases against a running server: prepare, unloaded, saturation, soak, idle."""
    with ServerProcess(pid) as server:
        log.info("preparing media from %s and tokens through %s", args.data_dir, url)
        media = asyncio.run(prepare(url, args.data_dir, args.images, args.clips))
        traffic = Traffic(media)
        log.info("unloaded: %d of each well-formed kind, one at a time", args.unloaded_per_kind)
        quiet = asyncio.run(unloaded(url, traffic, args.unloaded_per_kind, args.client_timeout_s))
        saturation: dict[str, Any] = {"measured": False}
        rate = args.rate
        if rate is None:
            saturation = asyncio.run(find_saturation(url, traffic, args))
            rate = args.overload * saturation["throughput_rps"]
        asyncio.run(wait_idle(url))
        time.sleep(args.idle_s)  # as before the end figures: connections just closed are gone
        before = {**server.snapshot(), "cache_bytes": cache_bytes(url)}
        log.info("soak: %.1f req/s for %g s; server before: %s", rate, args.duration_s, before)
        with HealthzProbe(url) as probe:
            soak = asyncio.run(
                open_loop(
                    url,
                    traffic,
                    rate,
                    args.duration_s,
                    args.client_timeout_s,
                    args.max_in_flight,
                    args.seed,
                )
            )
        ended = time.monotonic()
        started = soak.started
        log.info("soak done after %.1f s; idle for %g s", soak.wall_s, args.idle_s)
        with suppress(httpx.HTTPError):  # a server that died answers no /metrics
            asyncio.run(wait_idle(url, timeout_s=60))
        time.sleep(args.idle_s)
        after = {**server.snapshot(), "cache_bytes": cache_bytes(url)}
        return Measured(
            traffic=traffic,
            unloaded=quiet,
            saturation=saturation,
            rate_rps=rate,
            soak=soak,
            healthz=probe.summary(),
            timeline=timeline(soak, args.duration_s, args.windows, server, probe.probes, started),
            before=before,
            after=after,
            rss_peak_kb=server.peak_kb(started, ended),
            rss_hwm_kb=server.status_kb("VmHWM"),
            server_alive=server.alive(),
        )


async def find_saturation(url: str, traffic: Traffic, args: argparse.Namespace) -> dict[str, Any]:
    """The well-formed mix's throughput (2xx/s) at a fixed concurrency, closed loop."""
    concurrency, seconds = args.saturation_concurrency, args.saturation_s
    log.info("saturation: well-formed mix, closed loop, concurrency %d, %g s", concurrency, seconds)
    plan = LevelPlan(seconds, 2 * seconds, 10**9, 2 * concurrency)
    level = await run_level(url, traffic.well_formed(), concurrency, plan)
    await wait_idle(url)
    return {
        "measured": True,
        "concurrency": concurrency,
        "duration_s": round(level.elapsed_s, 1),
        "throughput_rps": round(level.throughput_rps, 3),
        "p50_ms": _ms(level.p50_ms),
        "p99_ms": _ms(level.p99_ms),
        "statuses": level.statuses,
    }


def document(
    args: argparse.Namespace, url: str, pid: int | None, measured: Measured
) -> dict[str, Any]:
    """The results: requests per kind and outcome, 5xx, latencies, /healthz, RSS, fds, threads."""
    soak = measured.soak
    records = soak.records
    server_errors = Counter(r.kind for r in records if r.outcome.startswith("5"))
    # 503 is load shedding (a full queue, MAX_IN_FLIGHT reached), always with Retry-After:
    # past saturation a server must shed or let every latency grow; any other 5xx is a failure
    failures = Counter(r.kind for r in records if r.outcome.startswith("5") and r.outcome != "503")
    shed = sum(1 for r in records if r.outcome == "503")
    errors_by_kind = {
        kind: dict(Counter(r.outcome for r in records if r.kind == kind and r.outcome[0] == "5"))
        for kind in server_errors
    }
    valid = [r for r in records if r.kind in WELL_FORMED]
    quiet = latency_summary(measured.unloaded)
    loaded = latency_summary(valid)
    before, after = measured.before, measured.after
    rss_before, rss_after = before["rss_kb"], after["rss_kb"]
    growth = rss_after / rss_before - 1 if rss_before and rss_after else None
    cached_kb = (
        (after["cache_bytes"] - before["cache_bytes"]) // 1024
        if (before["cache_bytes"] is not None and after["cache_bytes"] is not None)
        else None
    )
    growth_net = (
        (rss_after - cached_kb) / rss_before - 1
        if rss_before and rss_after and cached_kb is not None
        else None
    )
    hostile_share = sum(WEIGHTS[k] for k in HOSTILE) / sum(WEIGHTS.values())
    lag = sorted(soak.start_lag_s)
    healthz_p99 = measured.healthz["p99_ms"]

    def mb(kb: int | None) -> float | None:
        return round(kb / 1024, 1) if kb else None

    return {
        "benchmark": "soak",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "url": url,
        "server": "started by the soak" if args.url is None else "given by --url",
        "server_pid": pid,
        "settings": {
            "duration_s": args.duration_s,
            "rate_rps": round(measured.rate_rps, 3),
            "rate_from": "--rate" if args.rate is not None else f"{args.overload:g} x saturation",
            "arrivals": f"open loop, Poisson, seed {args.seed}",
            "hostile_share": round(hostile_share, 3),
            "client_timeout_s": args.client_timeout_s,
            "max_in_flight": args.max_in_flight,
            "idle_after_s": args.idle_s,
            "image_model": measured.traffic.media.image_model,
            "audio_model": measured.traffic.media.audio_model,
            "server_env": args.env,
            "allocator": "jemalloc"
            if args.url is None and args.allocator == "image" and JEMALLOC.is_file()
            else "glibc (or the given server's)",
            "kinds": measured.traffic.describe(),
        },
        "saturation": measured.saturation,
        "requests": {
            "total": len(records),
            "arrivals_per_s": round(len(records) / args.duration_s, 3),
            "last_answer_after_s": round(soak.wall_s, 1),
            "not_sent_client_limit": sum(soak.refused.values()),
            "by_kind": kind_counts(soak),
        },
        "5xx": sum(server_errors.values()),
        "5xx_by_kind": errors_by_kind,
        "503_shed": shed,
        "5xx_other_than_503": sum(failures.values()),
        "latency_well_formed": {
            "unloaded": quiet,
            "soak": loaded,
            "note": "2xx answers only; soak latency runs from when the request was due",
        },
        "healthz": measured.healthz,
        "memory": {
            "rss_after_warmup_mb": mb(rss_before),
            "rss_peak_mb": mb(measured.rss_peak_kb),
            "rss_end_mb": mb(rss_after),
            "rss_high_water_mb": mb(measured.rss_hwm_kb),
            "end_over_after_warmup": round(1 + growth, 3) if growth is not None else None,
            "cache_growth_mb": mb(cached_kb) if cached_kb is not None else None,
            "end_less_cache_growth_over_after_warmup": round(1 + growth_net, 3)
            if growth_net is not None
            else None,
        },
        "fds": {"start": before["fds"], "end": after["fds"]},
        "threads": {"start": before["threads"], "end": after["threads"]},
        "server_alive": measured.server_alive,
        "timeline": measured.timeline,
        "goals": {
            "5xx_other_than_503": goal(sum(failures.values()), "== 0", not failures),
            "healthz_p99_ms": goal(
                healthz_p99,
                f"< {GOAL_HEALTHZ_P99_MS:g}",
                None if healthz_p99 is None else healthz_p99 < GOAL_HEALTHZ_P99_MS,
            ),
            "rss_end_vs_after_warmup": goal(
                None if growth is None else round(growth, 3),
                f"within +-{GOAL_RSS_GROWTH:g}",
                None if growth is None else abs(growth) <= GOAL_RSS_GROWTH,
            ),
            "rss_end_less_cache_growth_vs_after_warmup": goal(
                None if growth_net is None else round(growth_net, 3),
                f"within +-{GOAL_RSS_GROWTH:g}",
                None if growth_net is None else abs(growth_net) <= GOAL_RSS_GROWTH,
            ),
            "fds_equal": goal(
                [before["fds"], after["fds"]],
                "start == end",
                None if before["fds"] is None else before["fds"] == after["fds"],
            ),
            "threads_equal": goal(
                [before["threads"], after["threads"]],
                "start == end",
                None if before["threads"] is None else before["threads"] == after["threads"],
            ),
        },
        "client": {
            "cpu_cores": round(soak.client_cpu_s / soak.wall_s, 3) if soak.wall_s else None,
            "peak_in_flight": soak.peak_in_flight,
            "start_lag_p99_ms": _ms(1000 * percentile(lag, 99)) if lag else None,
            "note": "one asyncio loop in this process, on the server's cores; /healthz is "
            "probed from a separate process",
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=600.0, help="open-loop phase length")
    parser.add_argument("--rate", type=float, help="arrivals per s (default: 2 x saturation)")
    parser.add_argument("--overload", type=float, default=2.0, help="rate over saturation")
    parser.add_argument("--saturation-s", type=float, default=20.0)
    parser.add_argument("--saturation-concurrency", type=int, default=16)
    parser.add_argument("--unloaded-per-kind", type=int, default=10)
    parser.add_argument("--url", help="a running server to soak instead of starting one")
    parser.add_argument("--pid", type=int, help="its process (default: whoever listens there)")
    parser.add_argument("--device", default="auto", help="TOKSERVE_DEVICE of a started server")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--models", help="TOKSERVE_MODELS of a started server (default: all)")
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="more server settings"
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=16, help="distinct photos")
    parser.add_argument("--clips", type=int, default=4, help="distinct 5 s audio clips")
    parser.add_argument("--client-timeout-s", type=float, default=120.0)
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument(
        "--idle-s", type=float, default=15.0, help="idle before the start and the end figures"
    )
    parser.add_argument("--windows", type=int, default=10, help="slices of the timeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator",
        choices=["image", "glibc"],
        default="image",
        help="a started server's malloc: the images' jemalloc (where installed) or glibc's",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    for setting in args.env:
        if "=" not in setting:
            parser.error(f"--env takes NAME=VALUE, not {setting!r}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server unless --url names one, measure, and build the results document."""
    contention = machine.Contention()
    with ExitStack() as stack:
        if args.url is None:
            env = {
                **(ALLOCATOR if args.allocator == "image" and JEMALLOC.is_file() else {}),
                "TOKSERVE_DEVICE": args.device,
                "TOKSERVE_LOG_LEVEL": "WARNING",
                **({"TOKSERVE_MODELS": args.models} if args.models else {}),
                **dict(setting.split("=", 1) for setting in args.env),
            }
            process, url = stack.enter_context(server_process(args.model_dir, 300.0, **env))
            pid: int | None = process.pid
        else:
            url = args.url.rstrip("/")
            pid = args.pid or listening_pid(urlsplit(url).port or 80)
        measured = measure(args, url, pid)
    results = document(args, url, pid, measured)
    results["machine"] = machine.describe(args.device) | contention.report()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the soak; print the results JSON on stdout (and write --out), progress on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    # every connection of the open loop is a descriptor here
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = run(args)
    emit(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
