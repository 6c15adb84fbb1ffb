"""``python -m bench.run``: ceiling, batched and unbatched service, cache, and the LitServe peer;
JSON + PNG + Markdown.

The run, in order: prepare inputs from real media; start the server (each model's own
batching) and, per operation, measure the in-process ceiling while the server idles, then sweep
the concurrency levels; run the cache scenario; start a second server with
TOKSERVE_MAX_BATCH_SIZE=1 and do the same again; then serve the same models with LitServe
(bench/peer.py: the project's loader, media code and runners, LitServe's batching at the same
max batch size and wait) and sweep the same levels with the same inputs. The results go to
<out-dir>/<date>-<host>.json (also printed on stdout), .png and .md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app.compute import auto_instances, usable_cpus
from app.config import Settings
from app.registry import LoadedModel, ModelRegistry
from app.tokenizers.base import ImageInfo
from bench import machine
from bench.ceiling import Ceiling, batch_sizes, best_of, measure_ceiling
from bench.loadgen import LevelPlan
from bench.plot import plot
from bench.report import cache_summary, markdown, op_summary, versus_peer
from bench.scenarios import PlanFor, Sweep, cache_scenario, sweep
from bench.server import REPO_ROOT, litserve_serving, serving
from bench.workloads import (
    OPS,
    Workload,
    audio_workloads,
    cache_uploads,
    image_workloads,
    repeated_uploads,
    unique_uploads,
)

log = logging.getLogger("bench")

SCENARIOS = (*OPS, "cache")
CLIENT = (
    "aiohttp.ClientSession on one asyncio loop in the benchmark process, closed loop, loopback; "
    "it shares this machine's cores with the server, so it takes CPU from the server under load"
)


@dataclass(frozen=True)
class Profile:
    """How much of everything a run does."""

    levels: list[int]
    duration_s: float
    min_samples: int  # per level at least this many measured answers, or 2 x concurrency
    images: int  # distinct photos
    clips: int  # distinct audio clips
    ceiling_min_s: float  # per batch size
    ceiling_max_batch: int | None  # None: up to the model's max_batch_size
    cache_distinct: int
    cache_concurrency: int
    cache_duration_s: float


FULL = Profile(
    levels=[1, 2, 4, 8, 16, 32, 64],
    duration_s=10.0,
    min_samples=8,
    images=32,
    clips=8,
    ceiling_min_s=2.0,
    ceiling_max_batch=None,
    cache_distinct=8,
    cache_concurrency=8,
    cache_duration_s=5.0,
)
QUICK = Profile(
    levels=[1, 2],
    duration_s=0.5,
    min_samples=3,
    images=4,
    clips=2,
    ceiling_min_s=0.05,
    ceiling_max_batch=2,
    cache_distinct=2,
    cache_concurrency=2,
    cache_duration_s=0.2,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --quick picks short levels and small input pools."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few levels, short durations")
    parser.add_argument(
        "--ops",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--levels", help="comma-separated concurrency levels (default 1,2,...,64)")
    parser.add_argument("--duration-s", type=float, help="seconds per level, at least")
    parser.add_argument("--device", default="auto", help="TOKSERVE_DEVICE: auto, cpu, cuda:N")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip the LitServe peer (bench/peer.py)"
    )
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = set(args.ops) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown --ops {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    profile = QUICK if args.quick else FULL
    args.levels = [int(n) for n in args.levels.split(",")] if args.levels else profile.levels
    args.duration_s = args.duration_s or profile.duration_s
    return args


def plan_for(duration_s: float, min_samples: int) -> PlanFor:
    """Per level: at least duration_s, at most 3x that, about two rounds of measured answers."""

    def plan(concurrency: int) -> LevelPlan:
        return LevelPlan(
            duration_s=duration_s,
            max_level_s=3 * duration_s,
            max_requests=5000,
            min_samples=max(min_samples, 2 * concurrency),
        )

    return plan


def first_of(registry: ModelRegistry, modality: str) -> LoadedModel:
    """The first model of a modality, or exit naming what is loaded."""
    for model in registry.models.values():
        if model.modality == modality:
            return model
    raise SystemExit(f"no {modality} model in the model directory; loaded: {registry.names()}")


async def served_versions(url: str) -> dict[str, str]:
    """What the server under test loaded: model name -> version."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        models = (await client.get("/v1/models")).json()["models"]
    return {model["name"]: model["version"] for model in models}


def measure_ops(
    url: str,
    model_thread: ThreadPoolExecutor,
    workloads: dict[str, Workload],
    ceilings: dict[str, Ceiling],
    levels: list[int],
    plan: PlanFor,
    profile: Profile,
) -> dict[str, Sweep]:
    """Per operation: its in-process ceiling while the server idles (kept in ``ceilings``, the
    best of every pass), then its sweep against the server."""
    deadline_s = Settings().request_timeout_s
    sweeps = {}
    for op, workload in workloads.items():
        log.info("ceiling: %s", op)
        sizes = batch_sizes(profile.ceiling_max_batch or workload.model.serving.max_batch_size)
        # the server's instances (TOKSERVE_INSTANCES=auto), each with one torch thread
        cpu_instances = auto_instances(workload.model.device.type, usable_cpus())
        ceiling = model_thread.submit(
            measure_ceiling,
            workload.run_batch,
            workload.items,
            sizes,
            profile.ceiling_min_s,
            profile.min_samples,
            cpu_instances,
        ).result()
        ceilings[op] = best_of(ceilings[op], ceiling) if op in ceilings else ceiling
        log.info("%s: sweeping %s", url, op)
        sweeps[op] = asyncio.run(sweep(url, workload.calls, levels, plan, deadline_s))
    return sweeps


def measure_cache(url: str, model: LoadedModel, data_dir: Path, profile: Profile) -> dict[str, Any]:
    """The cache scenario on 256x256 (the model's size) PNG photos."""
    log.info("%s: cache scenario", url)
    pngs = cache_uploads(model, data_dir, profile.cache_distinct)
    path = f"/v1/images/encode?model={model.name}"
    duration_s = profile.cache_duration_s
    plan = LevelPlan(duration_s, 3 * duration_s, 20000, profile.min_samples)
    hits = repeated_uploads(path, pngs, "image/png")
    misses = unique_uploads(path, pngs, "image/png")
    cache = asyncio.run(
        cache_scenario(url, hits, misses, len(pngs), profile.cache_concurrency, plan)
    )
    info = model.info
    assert isinstance(info, ImageInfo)
    height, width = info.image_size
    cache["input"] = f"{width}x{height} PNG photos, {model.name}, embedded memory cache"
    cache["summary"] = cache_summary(cache)
    return cache


@dataclass
class Measurements:
    """Everything one run measured, before it is summarised."""

    workloads: dict[str, Workload]
    ceilings: dict[str, Ceiling]
    batched: dict[str, Sweep]
    unbatched: dict[str, Sweep]
    cache: dict[str, Any] | None
    versions: dict[str, str]
    peer: dict[str, Sweep]


def measure(
    args: argparse.Namespace, profile: Profile, model_thread: ThreadPoolExecutor
) -> Measurements:
    """Prepare inputs, then the batched server (ops, cache), then the unbatched server (ops)."""
    # one instance: the ceiling is measured with the process's threads, not a share of them
    registry = ModelRegistry.load(
        Settings(model_dir=[str(args.model_dir)], device=args.device, instances=1)
    )
    ops = [op for op in OPS if op in args.ops]
    image_wanted = {"image_encode", "image_decode", "cache"} & set(args.ops)
    image_model = first_of(registry, "image") if image_wanted else None
    audio_wanted = {"audio_encode", "audio_decode"} & set(ops)
    audio_model = first_of(registry, "audio") if audio_wanted else None
    log.info("preparing inputs from %s", args.data_dir)
    workloads: dict[str, Workload] = {}
    if image_model and {"image_encode", "image_decode"} & set(ops):
        workloads |= model_thread.submit(
            image_workloads, image_model, args.data_dir, profile.images
        ).result()
    if audio_model:
        workloads |= model_thread.submit(
            audio_workloads, audio_model, args.data_dir, profile.clips
        ).result()
    workloads = {op: workloads[op] for op in ops}
    served = [m.name for m in (image_model, audio_model) if m is not None]
    plan = plan_for(args.duration_s, profile.min_samples)
    result = Measurements(workloads, {}, {}, {}, None, {}, {})
    with serving(args.model_dir, args.device, served) as url:
        result.versions = asyncio.run(served_versions(url))
        result.batched = measure_ops(
            url, model_thread, workloads, result.ceilings, args.levels, plan, profile
        )
        if "cache" in args.ops and image_model is not None:
            result.cache = measure_cache(url, image_model, args.data_dir, profile)
    if workloads:
        with serving(args.model_dir, args.device, served, TOKSERVE_MAX_BATCH_SIZE="1") as url:
            result.unbatched = measure_ops(
                url, model_thread, workloads, result.ceilings, args.levels, plan, profile
            )
    if workloads and not args.no_peer:
        with litserve_serving(args.model_dir, args.device, served) as url:
            for op, workload in workloads.items():
                log.info("%s (LitServe): sweeping %s", url, op)
                result.peer[op] = asyncio.run(
                    sweep(url, workload.peer_calls, args.levels, plan, Settings().request_timeout_s)
                )
    return result


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected scenario and return the results document."""
    profile = QUICK if args.quick else FULL
    contention = machine.Contention()
    started = datetime.now().astimezone()
    # Model code runs on one dedicated thread, as the service's Batcher runs it: on this 2-core
    # machine the first thread that used torch's OpenMP pool ran the models up to 30x slower.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model") as model_thread:
        measured = measure(args, profile, model_thread)
    described = machine.describe(args.device)
    results: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "host": described["host"],
        "device": args.device,
        "quick": args.quick,
        "note": args.note,
        "machine": described | contention.report(),
        "client": CLIENT,
        "settings": {
            "levels": args.levels,
            "duration_s": args.duration_s,
            "max_level_s": 3 * args.duration_s,
            "min_samples": f"max({profile.min_samples}, 2 x concurrency)",
            "request_deadline_s": Settings().request_timeout_s,
            "warm_up": "each worker's first answer is not measured",
            "litserve": f"LitServe {litserve_version()} (bench/peer.py), the same models, "
            "inputs as base64 in JSON, answers in msgpack; None: not run",
            "ceiling": "in-process on a dedicated model thread (as the Batcher runs it), measured "
            "before each server's sweep of the op while that server idles; per batch size the "
            "better of the two passes",
        },
        "served_versions": measured.versions,
        "ops": {
            op: op_entry(
                workload,
                measured.ceilings[op],
                measured.batched[op],
                measured.unbatched[op],
                measured.peer.get(op),
            )
            for op, workload in measured.workloads.items()
        },
    }
    if measured.cache is not None:
        results["cache"] = measured.cache
    return results


def op_entry(
    workload: Workload, ceiling: Ceiling, batched: Sweep, unbatched: Sweep, peer: Sweep | None
) -> dict[str, Any]:
    """One operation's part of the results document."""
    model = workload.model
    entry = {
        "model": model.name,
        "input": workload.description,
        "serving": {
            "max_batch_size": model.serving.max_batch_size,
            "max_wait_ms": model.serving.max_wait_ms,
            "max_queue": model.serving.max_queue,
        },
        "ceiling": ceiling.to_json(),
        "batched": batched.to_json(),
        "unbatched": unbatched.to_json(),
        "summary": op_summary(ceiling, batched, unbatched),
    }
    if peer is not None:
        entry["litserve"] = peer.to_json()
        entry["summary"]["versus_litserve"] = versus_peer(batched, peer)
    return entry


def litserve_version() -> str | None:
    """The installed LitServe's version (the bench extra pins it), None without it."""
    try:
        return importlib.metadata.version("litserve")
    except importlib.metadata.PackageNotFoundError:
        return None


def _finite(value: Any) -> Any:
    """NaN (a level with no answers) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write(results: dict[str, Any], out_dir: Path) -> Path:
    """Write <date>-<host>[-quick].json, .png and .md into out_dir; return the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(results["date"]).strftime("%Y-%m-%dT%H%M")
    stem = f"{stamp}-{results['host']}{'-quick' if results['quick'] else ''}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    if results["ops"]:
        plot(results, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(markdown(results))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the results JSON on stdout, progress on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # one log line per request would cost the client CPU that the server needs
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    results = _finite(benchmark(args))
    path = write(results, args.out_dir)
    log.info("wrote %s", path)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
