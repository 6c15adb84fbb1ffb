"""The server's resident memory before, during and after a peak of large requests, per allocator.

Each allocator setting starts a real server (only the fast image and audio models, the cache off
so that every request computes), warms it up and idles, then drives a peak: client threads at
once, each sending multi-item encodes of large photos and long recordings and decoding the
results. After the peak the server idles and its RSS is read again. Two peaks per server show
whether memory ratchets up from one to the next, and the server's CPU seconds what an allocator
costs. The images' allocator (jemalloc, docker/Dockerfile) was chosen from two runs: the peak
of large requests (the defaults) and ordinary requests, where the cost shows:

    python -m bench.memory [--idle-s 8] [--peaks 2] [--configurations NAME ...]
    python -m bench.memory --image-side 512 --images-per-request 1 --audio-seconds 10 \
        --clips-per-request 1 --requests-per-client 10 --idle-s 2

jemalloc needs Debian's libjemalloc2 on this machine; without it its configuration is skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image
from tokserve_client import Client, ItemsFailed

from bench.machine import PROC, describe, stat_cpu_s
from bench.media import image_file, unique_copy, wav_file
from bench.server import REPO_ROOT, server_process

EXAMPLES = REPO_ROOT / "examples"
MODELS = ["image-fsq-256", "audio-rvq-24k"]
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
SAMPLE_EVERY_S = 0.02
MB = 1024 * 1024

# glibc's allocator gives each thread that contends for memory its own arena (up to 8 per core),
# and a freed block inside an arena goes back to the kernel only when the arena's top is free.
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
    # Fixed thresholds turn off glibc's dynamic mmap threshold, which otherwise rises to the
    # largest block freed (up to 32 MiB) and moves later large buffers into the arenas.
    "128 KiB mmap/trim thresholds": {
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
    },
    "MALLOC_ARENA_MAX=2 + 128 KiB mmap/trim thresholds": {
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "MALLOC_TRIM_THRESHOLD_": "131072",
    },
    # jemalloc (Debian's libjemalloc2) returns dirty pages after dirty_decay_ms; its background
    # thread does so while the process is idle.
    "jemalloc": {
        "LD_PRELOAD": str(JEMALLOC),
        "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
    },
}


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler:
    """Samples a process's RSS every SAMPLE_EVERY_S in a thread; ``peak`` since the last reset."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            rss = rss_bytes(self._pid)
            with self._lock:
                self._peak = max(self._peak, rss)

    def take_peak(self) -> int:
        """The highest RSS seen since the previous call."""
        with self._lock:
            peak, self._peak = self._peak, rss_bytes(self._pid)
        return max(peak, self._peak)


def large_photo(side: int) -> bytes:
    """A JPEG of side x side pixels: examples/photo.jpg scaled up."""
    with Image.open(EXAMPLES / "photo.jpg") as photo:
        large = photo.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    return image_file(large, "jpeg")


def long_recording(seconds: float) -> bytes:
    """A WAV of ``seconds``: examples/speech.ogg repeated, 24 kHz mono."""
    speech, rate = sf.read(EXAMPLES / "speech.ogg", dtype="float32", always_2d=True)
    repeats = int(np.ceil(seconds * rate / len(speech)))
    return wav_file(np.tile(speech, (repeats, 1))[: int(seconds * rate)], rate)


class Nonces:
    """Distinct numbers for cache-busting copies, from any thread."""

    def __init__(self) -> None:
        self._next = itertools.count()
        self._lock = threading.Lock()

    def copies(self, blob: bytes, count: int) -> list[bytes]:
        """``count`` copies of ``blob`` that no earlier request sent: every item is computed
        (concurrent identical items would share one computation)."""
        with self._lock:
            return [unique_copy(blob, next(self._next)) for _ in range(count)]


def settle(seconds: float, sampler: RssSampler, pid: int) -> list[float]:
    """Idle ``seconds``; RSS in MB at each whole second."""
    timeline = []
    for _ in range(int(seconds)):
        time.sleep(1.0)
        timeline.append(round(rss_bytes(pid) / MB, 1))
    sampler.take_peak()
    return timeline


def measure_configuration(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Start a server with ``env``; RSS after warm-up and, per peak, at the peak and after it."""
    photo = large_photo(args.image_side)
    recording = long_recording(args.audio_seconds)
    nonces = Nonces()
    settings = {
        "TOKSERVE_MODELS": ",".join(MODELS),
        "TOKSERVE_DEVICE": "cpu",
        "TOKSERVE_LOG_LEVEL": "WARNING",
        # Off: a cache would hold results and grow between readings, which is not the allocator.
        "TOKSERVE_CACHE_MAX_BYTES": "0",
        "TOKSERVE_REQUEST_TIMEOUT_S": "300",
        "TOKSERVE_INSTANCES": args.instances,
    }
    with server_process(REPO_ROOT / "models", 300.0, **settings, **env) as (process, url):
        pid = process.pid
        with Client(url, timeout_s=600.0) as client, RssSampler(pid) as sampler:
            # Warm-up: every route once at an ordinary size, then idle.
            grid = client.encode_images([(EXAMPLES / "photo.jpg").read_bytes()])[0]
            client.decode_image(grid)
            codes = client.encode_audio([(EXAMPLES / "speech.ogg").read_bytes()])[0]
            client.decode_audio(codes)
            settle(args.idle_s, sampler, pid)
            before = rss_bytes(pid)

            def peak_requests(_: int) -> int:
                """One client's requests; how many of its items were shed (503, queue full)."""
                shed = 0
                with Client(url, timeout_s=600.0) as worker:
                    for _ in range(args.requests_per_client):
                        try:
                            images = nonces.copies(photo, args.images_per_request)
                            worker.decode_image(worker.encode_images(images)[0])
                            clips = nonces.copies(recording, args.clips_per_request)
                            worker.decode_audio(worker.encode_audio(clips)[0])
                        except ItemsFailed as exc:
                            if any(error.status != 503 for error in exc.errors):
                                raise
                            shed += len(exc.errors)
                return shed

            peaks = []
            for _ in range(args.peaks):
                sampler.take_peak()
                started = time.perf_counter()
                user_s, system_s = stat_cpu_s(PROC / str(pid) / "stat")
                with ThreadPoolExecutor(args.clients) as pool:
                    shed = sum(pool.map(peak_requests, range(args.clients)))
                duration_s = time.perf_counter() - started
                user_end_s, system_end_s = stat_cpu_s(PROC / str(pid) / "stat")
                peak = sampler.take_peak()
                timeline = settle(args.idle_s, sampler, pid)
                peaks.append(
                    {
                        "peak_mb": round(peak / MB, 1),
                        "after_mb": timeline[-1],
                        "after_each_second_mb": timeline,
                        "peak_duration_s": round(duration_s, 1),
                        # The server's own CPU time for the peak: less sensitive than the
                        # duration to other processes, and system time shows page faults.
                        "peak_cpu_user_s": round(user_end_s - user_s, 1),
                        "peak_cpu_system_s": round(system_end_s - system_s, 1),
                        # items answered 503 at once because their queue was full: the load a
                        # server sheds rather than hold in memory (the request's rest is skipped)
                        "items_shed": shed,
                    }
                )
    return {
        "before_mb": round(before / MB, 1),
        "peak_mb": max(p["peak_mb"] for p in peaks),
        "after_mb": peaks[-1]["after_mb"],
        "peaks": peaks,
    }


def measure(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every chosen configuration, in order; skipped ones say why."""
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe("cpu"),
        "workload": {
            "models": MODELS,
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "peaks": args.peaks,
            "each_request": (
                f"encode {args.images_per_request} JPEGs of {args.image_side}x{args.image_side}"
                f" then decode one grid to PNG; encode {args.clips_per_request} WAVs of"
                f" {args.audio_seconds:g} s then decode one to WAV"
            ),
            "idle_s": args.idle_s,
            "instances": args.instances,
            "rss": "VmRSS of the server process; peak sampled every "
            f"{SAMPLE_EVERY_S * 1000:.0f} ms, after = at the end of the idle",
        },
        "configurations": {},
    }
    for name in args.configurations:
        env = CONFIGURATIONS[name]
        if "LD_PRELOAD" in env and not Path(env["LD_PRELOAD"]).is_file():
            results["configurations"][name] = {
                "env": env,
                "skipped": "apt-get install libjemalloc2",
            }
            continue
        progress(f"{name} ...")
        outcome = measure_configuration(env, args)
        results["configurations"][name] = {"env": env, **outcome}
        progress(f"{name}: {json.dumps(outcome['peaks'])}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument(
        "--configurations", nargs="+", choices=sorted(CONFIGURATIONS), default=list(CONFIGURATIONS)
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--peaks", type=int, default=2, help="peaks per server, each then idle")
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--image-side", type=int, default=2048, help="pixels")
    parser.add_argument("--clips-per-request", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=60.0)
    parser.add_argument("--idle-s", type=float, default=8.0, help="idle after warm-up and peaks")
    parser.add_argument(
        "--instances",
        default="auto",
        help="TOKSERVE_INSTANCES of the server: each instance may hold a forward's activations",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the results JSON on stdout; progress on stderr."""
    args = parse_args(argv)
    results = measure(args, lambda line: print(line, file=sys.stderr, flush=True))
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
