"""``python -m bench.compare``: several servers of the same models side by side, in one run.

Per operation: the in-process single item and ceiling (batch 1 and the model's max batch),
then for each variant, started in turn, p50 at concurrency 1 and throughput and p99/p50 at
the saturation level. Variants: ``before`` (the server of another checkout, --baseline),
``after`` (this one), ``after`` with extra settings (--variant NAME:VAR=VALUE,...), and the
LitServe peer (bench/peer.py). Ratios between rows measured minutes apart on a busy machine
hold better than figures from separate runs; the load average is recorded with each row.

    python -m bench.compare --baseline /path/to/other/checkout --variant two:TOKSERVE_INSTANCES=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from app.compute import auto_instances, usable_cpus
from app.config import Settings
from app.registry import ModelRegistry
from bench import server as servers
from bench.ceiling import measure_ceiling
from bench.loadgen import LevelPlan, run_level, wait_idle
from bench.run import first_of
from bench.workloads import OPS, Workload, audio_workloads, image_workloads

REPO_ROOT = servers.REPO_ROOT
SINGLE_CALLS = 9  # batch-of-1 calls at least, however long min_s is


def in_process(workload: Workload, min_s: float) -> dict[str, Any]:
    """Median batch-of-1 call (ms) and items/s at the model's max batch size: the better of one
    instance with the process's torch threads and of the one-thread instances that
    TOKSERVE_INSTANCES=auto runs (both kept), measured as make bench measures its ceiling."""
    size = workload.model.serving.max_batch_size
    instances = auto_instances(workload.model.device.type, usable_cpus())
    ceiling = measure_ceiling(
        workload.run_batch, workload.items, [1, size], min_s, SINGLE_CALLS, instances
    )
    one = {
        "single_item_ms": round(ceiling.single_item_ms, 2),
        "ceiling_items_per_s": round(ceiling.items_per_s_by_batch_size[size], 2),
        "ceiling_batch": size,
    }
    if ceiling.instances < 2:
        return one
    return {
        "single_item_ms": round(ceiling.best_single_item_ms, 2),
        "ceiling_items_per_s": round(
            max(one["ceiling_items_per_s"], ceiling.instances_items_per_s), 2
        ),
        "ceiling_batch": size,
        "one_instance": one,
        "instances": {
            "count": ceiling.instances,
            "single_item_ms": round(ceiling.instances_single_item_ms, 2),
            "ceiling_items_per_s": round(ceiling.instances_items_per_s, 2),
        },
    }


@contextmanager
def tokserve_from(root: Path, model_dir: Path, models: list[str], **env: str) -> Iterator[str]:
    """tokserve's server as the checkout at ``root`` has it."""
    saved = servers.REPO_ROOT
    servers.REPO_ROOT = root
    try:
        with servers.serving(model_dir, "cpu", models, **env) as url:
            yield url
    finally:
        servers.REPO_ROOT = saved


def measure(
    url: str, workload: Workload, peer: bool, levels: tuple[int, int], duration_s: float
) -> dict[str, Any]:
    """p50 at the low level, throughput and p99/p50 at the high one."""
    calls = workload.peer_calls if peer else workload.calls
    row: dict[str, Any] = {"load_average": os.getloadavg()[0]}
    for concurrency in levels:
        plan = LevelPlan(duration_s, 3 * duration_s, 5000, max(20, 2 * concurrency))
        stats = asyncio.run(run_level(url, calls, concurrency, plan))
        asyncio.run(wait_idle(url))
        row[f"c{concurrency}"] = {
            "p50_ms": round(stats.p50_ms, 2),
            "server_p50_ms": round(stats.server_p50_ms, 2),
            "p99_ms": round(stats.p99_ms, 2),
            "throughput_rps": round(stats.throughput_rps, 2),
            "p99_over_p50": round(stats.p99_ms / stats.p50_ms, 2),
            "statuses": stats.statuses,
            "server": stats.server,
        }
    return row


def load_workloads(
    model_dir: Path, data_dir: Path
) -> tuple[list[str], dict[str, Workload], ThreadPoolExecutor]:
    """The first image and audio model's names, every op's workload from the media in
    ``data_dir``, and the one thread that prepared them and runs their in-process figures."""
    # one instance: the in-process figures choose their own threads (in_process)
    registry = ModelRegistry.load(Settings(model_dir=[str(model_dir)], device="cpu", instances=1))
    image, audio = first_of(registry, "image"), first_of(registry, "audio")
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model")
    workloads: dict[str, Workload] = {}
    workloads |= model_thread.submit(image_workloads, image, data_dir, 16).result()
    workloads |= model_thread.submit(audio_workloads, audio, data_dir, 8).result()
    return [image.name, audio.name], workloads, model_thread


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("--baseline", type=Path, help="another checkout: its server is 'before'")
    parser.add_argument("--variant", action="append", default=[], help="NAME:VAR=VALUE,...")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--levels", default="1,32", help="the low and the high concurrency")
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--reverse", action="store_true", help="start the variants in the reverse order"
    )
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every variant of every op; the results JSON on stdout."""
    args = parse_args(argv)
    ops = args.ops.split(",")
    low, high = (int(n) for n in args.levels.split(","))
    models, workloads, model_thread = load_workloads(args.model_dir, args.data_dir)
    variants: list[tuple[str, AbstractContextManager[str], bool]] = []
    if args.baseline:
        variants.append(("before", tokserve_from(args.baseline, args.model_dir, models), False))
    variants.append(("after", tokserve_from(REPO_ROOT, args.model_dir, models), False))
    for spec in args.variant:
        name, _, settings = spec.partition(":")
        env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
        variants.append((name, tokserve_from(REPO_ROOT, args.model_dir, models, **env), False))
    if not args.no_peer:
        variants.append(("litserve", servers.litserve_serving(args.model_dir, "cpu", models), True))
    if args.reverse:
        variants.reverse()
    results: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),
        "levels": [low, high],
        "duration_s": args.duration_s,
        "ops": {op: {} for op in ops},
    }
    for op in ops:
        results["ops"][op]["in_process"] = model_thread.submit(
            in_process, workloads[op], 2.0
        ).result()
    for name, server, peer in variants:
        with server as url:
            for op in ops:
                print(f"{name} {op}", file=sys.stderr)
                results["ops"][op][name] = measure(
                    url, workloads[op], peer, (low, high), args.duration_s
                )
    for op in ops:
        again = model_thread.submit(in_process, workloads[op], 2.0).result()
        first = results["ops"][op]["in_process"]
        results["ops"][op]["in_process"] = {
            "single_item_ms": min(first["single_item_ms"], again["single_item_ms"]),
            "ceiling_items_per_s": max(first["ceiling_items_per_s"], again["ceiling_items_per_s"]),
            "ceiling_batch": first["ceiling_batch"],
            "note": "best of a pass before and a pass after the servers",
            "passes": [first, again],
        }
    results["load_average_end"] = os.getloadavg()
    text = json.dumps(results, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
