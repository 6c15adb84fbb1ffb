"""``python -m bench.cpu_split``: where the CPU goes while the server is saturated.

Per operation, one server of this checkout at one concurrency: each server thread's CPU time
(``/proc/<pid>/task/*/stat``, named by ``py-spy dump``) and the load generator's, divided by
the requests answered, and the share of the machine's CPU left idle. On a host whose cores the
load generator shares, the in-process ceiling can be approached only as closely as the model's
share of the CPU per request and the CPU left idle allow (``bound``: the ceiling's CPU per item
over all the CPU a request costs, times the busy share), against ``ratio``, the throughput over
the ceiling measured in the same run:

    python -m bench.cpu_split [--ops image_decode,image_encode] [--concurrency 32] [--duration-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from app.compute import usable_cpus
from bench.compare import in_process, load_workloads
from bench.loadgen import LevelPlan, run_level
from bench.machine import PROC, describe, stat_cpu_s
from bench.server import REPO_ROOT, serving_process
from bench.workloads import OPS, Workload

PY_SPY = Path(sys.executable).with_name("py-spy")
THREAD = re.compile(r'Thread (\d+) \([^)]*\): "([^"]+)"')


def thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name (a pool's thread without its ``_N`` suffix)."""
    dump = subprocess.run(
        [str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True, text=True, check=True
    ).stdout
    return {int(tid): re.sub(r"_\d+$", "", name) for tid, name in THREAD.findall(dump)}


def thread_cpu_s(pid: int) -> dict[int, float]:
    """Native thread id -> user + system CPU seconds, for each thread of process ``pid``."""
    seconds = {}
    for task in (PROC / str(pid) / "task").iterdir():
        try:
            seconds[int(task.name)] = sum(stat_cpu_s(task / "stat"))
        except OSError:  # the thread ended
            continue
    return seconds


def idle_and_total() -> tuple[int, int]:
    """The machine's idle + iowait jiffies and all jiffies (/proc/stat)."""
    jiffies = [int(value) for value in (PROC / "stat").read_text().split("\n")[0].split()[1:]]
    return jiffies[3] + jiffies[4], sum(jiffies)


def split(
    pid: int, url: str, workload: Workload, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One level after a warm-up level: CPU ms per request by thread, and the idle share."""
    plan = LevelPlan(duration_s, 3 * duration_s, 100_000, max(20, 2 * concurrency))
    asyncio.run(run_level(url, workload.calls, concurrency, LevelPlan(3.0, 9.0, 5000, 20)))
    names = thread_names(pid)
    cpu_before, idle_before = thread_cpu_s(pid), idle_and_total()
    started, client_started = time.perf_counter(), time.process_time()
    stats = asyncio.run(run_level(url, workload.calls, concurrency, plan))
    elapsed_s, client_s = time.perf_counter() - started, time.process_time() - client_started
    cpu_after, idle_after = thread_cpu_s(pid), idle_and_total()
    by_thread: defaultdict[str, float] = defaultdict(float)
    for tid, seconds in cpu_after.items():
        by_thread[names.get(tid, "other")] += seconds - cpu_before.get(tid, 0.0)
    requests = stats.throughput_rps * elapsed_s
    per_request = {
        name: round(1000 * s / requests, 3)
        for name, s in sorted(by_thread.items(), key=lambda kv: -kv[1])
        if s
    }
    return {
        "throughput_rps": round(stats.throughput_rps, 2),
        "p50_ms": round(stats.p50_ms, 2),
        "cpu_ms_per_request": per_request,
        "server_cpu_ms_per_request": round(sum(per_request.values()), 3),
        # the load generator is this process: its CPU is the client's share of the machine
        "load_generator_cpu_ms_per_request": round(1000 * client_s / requests, 3),
        "machine_idle_share": round(
            (idle_after[0] - idle_before[0]) / (idle_after[1] - idle_before[1]), 3
        ),
        "server": stats.server,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_split", description=__doc__)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every op; the results JSON on stdout."""
    args = parse_args(argv)
    models, workloads, model_thread = load_workloads(args.model_dir, args.data_dir)
    results: dict[str, Any] = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": describe("cpu"),
        "concurrency": args.concurrency,
        "duration_s": args.duration_s,
        "load_average_start": os.getloadavg(),
        "ops": {},
    }
    ops = args.ops.split(",")
    for op in ops:
        results["ops"][op] = {
            "in_process": model_thread.submit(in_process, workloads[op], 2.0).result()
        }
    cpus = usable_cpus()
    with serving_process(args.model_dir, "cpu", models) as (process, url):
        for op in ops:
            print(op, file=sys.stderr)
            row = results["ops"][op]
            row |= split(process.pid, url, workloads[op], args.concurrency, args.duration_s)
            ceiling = row["in_process"]["ceiling_items_per_s"]
            request_ms = row["server_cpu_ms_per_request"] + row["load_generator_cpu_ms_per_request"]
            item_ms = 1000 * cpus / ceiling  # the ceiling keeps every usable CPU busy
            row["ratio"] = round(row["throughput_rps"] / ceiling, 3)
            row["bound"] = round(item_ms / request_ms * (1 - row["machine_idle_share"]), 3)
    results["load_average_end"] = os.getloadavg()
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
