"""What the benchmark runs against a live server: concurrency sweeps and the cache scenario."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack

from bench.loadgen import CallFactory, Check, LevelPlan, LevelStats, run_level, wait_idle

log = logging.getLogger("bench")

PlanFor = Callable[[int], LevelPlan]  # concurrency -> that level's plan
# A level needs a warm-up round, then about two rounds of measured answers.
ROUNDS_PER_LEVEL = 3


@dataclass
class Sweep:
    """Levels measured, and levels skipped with the numbers that ruled them out."""

    levels: list[LevelStats]
    skipped: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"levels": [s.to_json() for s in self.levels], "skipped": self.skipped}

    def at(self, concurrency: int) -> LevelStats | None:
        """The measured level at this concurrency, if any."""
        return next((s for s in self.levels if s.concurrency == concurrency), None)


def _skip_reason(last: LevelStats, concurrency: int, plan: LevelPlan, deadline_s: float) -> str:
    """Why the next level cannot be measured within bounds, or '' when it can."""
    if not last.complete:
        return (
            f"concurrency {last.concurrency} did not reach a steady state within "
            f"{plan.max_level_s:g} s (p50 {last.p50_ms / 1000:.1f} s)"
        )
    predicted_s = last.p50_ms / 1000 * concurrency / last.concurrency
    if predicted_s * ROUNDS_PER_LEVEL > plan.max_level_s:
        return (
            f"predicted p50 {predicted_s:.1f} s (p50 {last.p50_ms / 1000:.1f} s at concurrency "
            f"{last.concurrency}) needs ~{ROUNDS_PER_LEVEL * predicted_s:.0f} s per level, over "
            f"the {plan.max_level_s:g} s limit"
        )
    if predicted_s > deadline_s / 2:
        return (
            f"predicted p50 {predicted_s:.1f} s would approach the server's request deadline "
            f"({deadline_s:g} s) and measure 504s instead of throughput"
        )
    return ""


async def sweep(
    base_url: str, calls: CallFactory, levels: list[int], plan_for: PlanFor, deadline_s: float
) -> Sweep:
    """Run each concurrency level in turn, waiting for an idle server between levels; stop
    climbing once a level could not finish within its bounds."""
    result = Sweep([], [])
    for concurrency in levels:
        plan = plan_for(concurrency)
        if result.levels:
            last = result.levels[-1]
            reason = _skip_reason(last, concurrency, plan, deadline_s)
            if reason:
                log.info("  concurrency %d skipped: %s", concurrency, reason)
                result.skipped.append({"concurrency": concurrency, "reason": reason})
                continue
        stats = await run_level(base_url, calls, concurrency, plan)
        log.info(
            "  concurrency %d: %.2f req/s, p50 %.0f ms, p99 %.0f ms, %s in %.1f s",
            concurrency,
            stats.throughput_rps,
            stats.p50_ms,
            stats.p99_ms,
            stats.statuses,
            stats.elapsed_s,
        )
        result.levels.append(stats)
        await wait_idle(base_url)
    return result


def expect_cached(cached: bool) -> Check:
    """A check that the (msgpack) encode answer says cached: true or false for its one item."""

    def check(body: bytes) -> bool:
        return msgpack.unpackb(body)["items"][0]["cached"] is cached

    return check


async def prime(base_url: str, calls: CallFactory, count: int) -> None:
    """Send ``count`` requests until each is answered from the cache (write-behind landed)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as client:
        for _ in range(count):
            call = calls()
            for _attempt in range(100):
                response = await client.post(call.path, content=call.body, headers=call.headers)
                response.raise_for_status()
                if msgpack.unpackb(response.content)["items"][0]["cached"]:
                    break


async def cache_scenario(
    base_url: str,
    hits: CallFactory,
    misses: CallFactory,
    distinct: int,
    concurrency: int,
    plan: LevelPlan,
) -> dict[str, Any]:
    """Hit and miss latency at concurrency 1 and throughput at ``concurrency``, same server."""
    await prime(base_url, hits, distinct)
    measured: dict[str, LevelStats] = {}
    for name, calls, cached, level in (
        ("hit_c1", hits, True, 1),
        ("miss_c1", misses, False, 1),
        ("hit", hits, True, concurrency),
        ("miss", misses, False, concurrency),
    ):
        measured[name] = await run_level(base_url, calls, level, plan, expect_cached(cached))
        await wait_idle(base_url)
    hit, miss = measured["hit"], measured["miss"]
    return {
        "concurrency": concurrency,
        "distinct_hit_inputs": distinct,
        "hit_p50_ms": round(measured["hit_c1"].p50_ms, 3),
        "hit_p99_ms": round(measured["hit_c1"].p99_ms, 3),
        "hit_server_p50_ms": round(measured["hit_c1"].server_p50_ms, 3),
        "miss_p50_ms": round(measured["miss_c1"].p50_ms, 3),
        "miss_p99_ms": round(measured["miss_c1"].p99_ms, 3),
        "hit_throughput_rps": round(hit.throughput_rps, 3),
        "miss_throughput_rps": round(miss.throughput_rps, 3),
        "hit_over_miss_throughput": round(hit.throughput_rps / miss.throughput_rps, 3),
        "levels": {name: stats.to_json() for name, stats in measured.items()},
    }
