"""Closed-loop HTTP load: N workers, each sending its next request as soon as the last one answers.

The workers use aiohttp: the load generator shares the machine's cores with the server, and
aiohttp spends 0.28 ms of CPU per request where httpx spends 1.25 ms (measured here on a 100 kB
POST), so it takes less from the server it measures. /metrics probes use httpx.

A level is bounded in time and in requests. Each worker's first request is warm-up (they all
arrive at once, so their latencies say nothing of the steady state); throughput is counted
between completions, from the moment every worker has finished its first request, so that a
batch completing all at once is counted whole or not at all.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

CLIENT_TIMEOUT_S = 120.0
SERVER_TOTAL = re.compile(r"(?:^|,)\s*total;dur=([0-9.]+)")
SERVER_METRICS = (
    "tokserve_queue_depth",
    "tokserve_batch_size_count",
    "tokserve_batch_size_sum",
    "tokserve_inference_duration_seconds_count",
    "tokserve_inference_duration_seconds_sum",
    "tokserve_queue_wait_seconds_count",
    "tokserve_queue_wait_seconds_sum",
)


@dataclass(frozen=True)
class Call:
    """One request of the load: POST ``path`` with ``body``."""

    path: str
    body: bytes
    headers: Mapping[str, str]


CallFactory = Callable[[], Call]  # the next request to send; it owns any cache-busting nonce
Check = Callable[[bytes], bool]  # True when a 2xx answer's body is what the scenario expects


@dataclass(frozen=True)
class LevelPlan:
    """How long a level may run and how many answers it needs."""

    duration_s: float  # run at least this long
    max_level_s: float  # never longer than this
    max_requests: int  # stop once this many answers are measured
    min_samples: int  # measured answers wanted before stopping after duration_s


@dataclass(frozen=True)
class _Answer:
    worker: int
    sent: float  # time.perf_counter() seconds
    answered: float
    status: int
    expected: bool
    server_ms: float  # the answer's Server-Timing total; NaN without one (the LitServe peer)


@dataclass
class LevelStats:
    """What one concurrency level measured; latencies in ms, throughput in answers (items) per s."""

    concurrency: int
    elapsed_s: float
    window_s: float
    requests: int  # measured 2xx answers (warm-up excluded)
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_p50_ms: float  # of the same answers, the time inside the server (Server-Timing total)
    mean_ms: float
    max_ms: float
    statuses: dict[str, int]  # every answer of the level, warm-up included
    transport_errors: int
    unexpected: int  # 2xx answers that failed the scenario's check
    client_cpu_cores: float  # CPU the load generator itself used, in cores (it shares the host)
    server: dict[str, float]  # the server's own view of the level, from /metrics
    complete: bool  # every worker got past warm-up and min_samples answers were measured

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, floats rounded."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}

    @property
    def server_errors(self) -> int:
        """5xx answers other than the deliberate 503 of a full queue."""
        return sum(n for code, n in self.statuses.items() if code[0] == "5" and code != "503")


def server_total_ms(header: str) -> float:
    """The ``total`` of a Server-Timing header in ms (app/timing.py); NaN if it has none."""
    found = SERVER_TOTAL.search(header)
    return float(found.group(1)) if found else math.nan


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list, q in [0, 100]."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class _Level:
    concurrency: int
    answers: list[_Answer] = field(default_factory=list)
    first: dict[int, float] = field(default_factory=dict)  # worker -> its first answer time
    measured: int = 0  # expected 2xx answers after each worker's first
    statuses: Counter[str] = field(default_factory=Counter)
    transport_errors: int = 0

    def record(self, answer: _Answer) -> None:
        """Keep one answer; the first of each worker is warm-up."""
        self.statuses[str(answer.status)] += 1
        if answer.worker in self.first:
            self.measured += answer.status < 300 and answer.expected
        else:
            self.first[answer.worker] = answer.answered
        self.answers.append(answer)


async def run_level(
    base_url: str,
    calls: CallFactory,
    concurrency: int,
    plan: LevelPlan,
    check: Check | None = None,
) -> LevelStats:
    """Keep ``concurrency`` requests in flight until the plan says stop; unanswered ones are
    cancelled (the client hangs up, so the server drops them from its queue)."""
    level = _Level(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as client,
        httpx.AsyncClient(base_url=base_url, timeout=10.0) as probe,
    ):

        async def worker(index: int) -> None:
            while True:
                call = calls()
                sent = time.perf_counter()
                try:
                    async with client.post(call.path, data=call.body, headers=call.headers) as got:
                        body = await got.read()
                except (aiohttp.ClientError, TimeoutError):
                    level.transport_errors += 1
                    await asyncio.sleep(0.01)
                    continue
                answered = time.perf_counter()
                ok = got.status < 300 and (check is None or check(body))
                server_ms = server_total_ms(got.headers.get("Server-Timing", ""))
                level.record(_Answer(index, sent, answered, got.status, ok, server_ms))

        server_before = await server_totals(probe)
        started = time.perf_counter()  # also when the server's "before" totals arrived
        client_cpu_started = time.process_time()
        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        while True:
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            if (
                now - started >= plan.max_level_s
                or level.measured >= plan.max_requests
                or (now - started >= plan.duration_s and level.measured >= plan.min_samples)
            ):
                break
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        elapsed_s = time.perf_counter() - started
        client_cpu_cores = (time.process_time() - client_cpu_started) / elapsed_s
        server_after = await server_totals(probe)
        # the server's totals span from "before" to "after" arriving, which on a busy server can
        # be well past the level's end: batches still running finish into them
        server = _server_view(server_before, server_after, time.perf_counter() - started)
    return _stats(level, elapsed_s, client_cpu_cores, server, plan)


async def server_totals(client: httpx.AsyncClient) -> dict[str, float]:
    """SERVER_METRICS from /metrics, each summed over its label sets (model, op); zeros from a
    server without them (the LitServe peer)."""
    totals = dict.fromkeys(SERVER_METRICS, 0.0)
    metrics = await client.get("/metrics")
    if metrics.status_code != 200:
        return totals
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def _server_view(
    before: dict[str, float], after: dict[str, float], elapsed_s: float
) -> dict[str, float]:
    """Batches, mean batch size, mean forward and queue wait (ms), and how many of the model's
    instances were in a forward pass on average over the level (at most the instances)."""
    change = {name: after[name] - before[name] for name in SERVER_METRICS}
    batches = change["tokserve_batch_size_count"]
    forwards = change["tokserve_inference_duration_seconds_count"]
    waits = change["tokserve_queue_wait_seconds_count"]
    forward_s = change["tokserve_inference_duration_seconds_sum"]
    return {
        "batches": batches,
        "mean_batch_size": round(change["tokserve_batch_size_sum"] / batches, 3)
        if batches
        else math.nan,
        "mean_forward_ms": round(1000 * forward_s / forwards, 3) if forwards else math.nan,
        "mean_queue_wait_ms": round(1000 * change["tokserve_queue_wait_seconds_sum"] / waits, 3)
        if waits
        else math.nan,
        "model_busy": round(forward_s / elapsed_s, 3),
    }


def _stats(
    level: _Level,
    elapsed_s: float,
    client_cpu_cores: float,
    server: dict[str, float],
    plan: LevelPlan,
) -> LevelStats:
    first = level.first
    warm = len(first) == level.concurrency
    # steady state starts when the slowest worker has its first answer
    steady_from = max(first.values()) if warm else math.inf
    good = [a for a in level.answers if a.status < 300]
    steady = [a for a in good if a.answered > first[a.worker] and a.expected]
    measured = sorted((a.answered - a.sent) * 1000 for a in steady)
    inside = sorted(a.server_ms for a in steady if not math.isnan(a.server_ms))
    after = sorted(a.answered for a in good if a.answered > steady_from)
    if len(after) >= 2:
        window_s = after[-1] - steady_from
        throughput = len(after) / window_s
    else:
        window_s = elapsed_s
        throughput = len(good) / elapsed_s if elapsed_s > 0 else 0.0
    return LevelStats(
        concurrency=level.concurrency,
        elapsed_s=elapsed_s,
        window_s=window_s,
        requests=len(measured),
        throughput_rps=throughput,
        p50_ms=percentile(measured, 50),
        p90_ms=percentile(measured, 90),
        p99_ms=percentile(measured, 99),
        server_p50_ms=percentile(inside, 50),
        mean_ms=sum(measured) / len(measured) if measured else math.nan,
        max_ms=measured[-1] if measured else math.nan,
        statuses=dict(sorted(level.statuses.items())),
        transport_errors=level.transport_errors,
        unexpected=sum(1 for a in good if not a.expected),
        client_cpu_cores=client_cpu_cores,
        server=server,
        complete=warm and len(after) >= 2 and len(measured) >= plan.min_samples,
    )


async def wait_idle(base_url: str, timeout_s: float = 120.0) -> None:
    """Return once the server's queues are empty and every launched batch has finished (read
    from /metrics: queue depth 0, as many finished forwards as launched batches), or after
    timeout_s."""
    deadline = time.perf_counter() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
        while time.perf_counter() < deadline:
            totals = await server_totals(client)
            launched = totals["tokserve_batch_size_count"]
            finished = totals["tokserve_inference_duration_seconds_count"]
            if totals["tokserve_queue_depth"] == 0 and launched == finished:
                return
            await asyncio.sleep(0.1)
