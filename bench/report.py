"""The benchmark's verdict: ratios against the batching and cache targets, and a Markdown table."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from bench.ceiling import Ceiling
from bench.loadgen import LevelStats
from bench.scenarios import Sweep

COMPARE_AT = 32  # batched vs unbatched throughput is compared at this concurrency


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _target(value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "met": met}


def op_summary(ceiling: Ceiling, batched: Sweep, unbatched: Sweep | None) -> dict[str, Any]:
    """Saturation/ceiling, batched/unbatched, idle overhead, tail ratio and 5xx for one op."""
    saturation = max(batched.levels, key=lambda s: s.throughput_rps)
    at_one = batched.at(1)
    overhead_ms = at_one.p50_ms - ceiling.best_single_item_ms if at_one else math.nan
    tail = saturation.p99_ms / saturation.p50_ms
    sweeps = [batched] + ([unbatched] if unbatched else [])
    server_errors = sum(s.server_errors for sweep in sweeps for s in sweep.levels)
    rejected = sum(s.statuses.get("503", 0) for sweep in sweeps for s in sweep.levels)
    highest = batched.levels[-1]
    summary: dict[str, Any] = {
        "ceiling_items_per_s": round(ceiling.best_items_per_s, 3),
        "saturation": _level_view(saturation, ceiling),
        "highest_concurrency": _level_view(highest, ceiling),
        "saturation_over_ceiling": _target(
            round(saturation.throughput_rps / ceiling.best_items_per_s, 3),
            ">= 0.8",
            saturation.throughput_rps >= 0.8 * ceiling.best_items_per_s,
        ),
        "p50_c1_minus_in_process_ms": _target(
            _round(overhead_ms), "<= 5", None if math.isnan(overhead_ms) else overhead_ms <= 5
        ),
        "p99_over_p50_at_saturation": _target(_round(tail), "<= 3", tail <= 3),
        "server_errors_not_503": _target(server_errors, "== 0", server_errors == 0),
        "rejected_503": rejected,
    }
    if unbatched:
        summary["batched_over_unbatched"] = _batched_vs_unbatched(ceiling, batched, unbatched)
    return summary


def versus_peer(batched: Sweep, peer: Sweep) -> dict[str, Any]:
    """tokserve against the LitServe peer: p50 at concurrency 1 and the best throughput of the
    levels both measured; ``ahead`` when tokserve is faster at both."""
    ours_c1, theirs_c1 = batched.at(1), peer.at(1)
    ours_sat = max(batched.levels, key=lambda s: s.throughput_rps)
    theirs_sat = max(peer.levels, key=lambda s: s.throughput_rps) if peer.levels else None
    c1 = {
        "tokserve_p50_ms": _round(ours_c1.p50_ms) if ours_c1 else None,
        "litserve_p50_ms": _round(theirs_c1.p50_ms) if theirs_c1 else None,
    }
    saturation = {
        "tokserve_rps": round(ours_sat.throughput_rps, 3),
        "tokserve_concurrency": ours_sat.concurrency,
        "tokserve_p99_over_p50": _round(ours_sat.p99_ms / ours_sat.p50_ms),
        "litserve_rps": round(theirs_sat.throughput_rps, 3) if theirs_sat else None,
        "litserve_concurrency": theirs_sat.concurrency if theirs_sat else None,
        "litserve_p99_over_p50": _round(theirs_sat.p99_ms / theirs_sat.p50_ms)
        if theirs_sat
        else None,
    }
    faster_c1 = None
    if c1["tokserve_p50_ms"] is not None and c1["litserve_p50_ms"] is not None:
        faster_c1 = c1["tokserve_p50_ms"] < c1["litserve_p50_ms"]
    more_rps = None if theirs_sat is None else ours_sat.throughput_rps > theirs_sat.throughput_rps
    return {
        "c1": c1,
        "saturation": saturation,
        "ahead": None if None in (faster_c1, more_rps) else bool(faster_c1 and more_rps),
    }


def _level_view(level: LevelStats, ceiling: Ceiling) -> dict[str, Any]:
    """A level's throughput against the ceiling, and what the server did meanwhile."""
    return {
        "concurrency": level.concurrency,
        "throughput_rps": round(level.throughput_rps, 3),
        "over_ceiling": round(level.throughput_rps / ceiling.best_items_per_s, 3),
        "mean_batch_size": level.server["mean_batch_size"],
        "model_busy": level.server["model_busy"],
        "client_cpu_cores": round(level.client_cpu_cores, 3),
    }


def _batched_vs_unbatched(ceiling: Ceiling, batched: Sweep, unbatched: Sweep) -> dict[str, Any]:
    """Throughput ratio at concurrency 32, or at the highest level both measured below it."""
    pairs = [
        (s, other)
        for s in batched.levels
        if s.concurrency <= COMPARE_AT
        and (other := unbatched.at(s.concurrency)) is not None
        and other.throughput_rps > 0
    ]
    if not pairs:
        note = "no concurrency level answered requests in both runs"
        return _target(None, ">= 1.5", None) | {"note": note}
    with_batching, without = max(pairs, key=lambda pair: pair[0].concurrency)
    concurrency = with_batching.concurrency
    ratio = with_batching.throughput_rps / without.throughput_rps
    result = _target(round(ratio, 3), ">= 1.5", ratio >= 1.5) | {
        "concurrency": concurrency,
        "batched_rps": round(with_batching.throughput_rps, 3),
        "unbatched_rps": round(without.throughput_rps, 3),
        "ceiling_batch_gain": round(ceiling.batch_gain, 3),
    }
    notes = []
    if concurrency != COMPARE_AT:
        notes.append(
            f"compared at concurrency {concurrency}: {COMPARE_AT} was not measured in both"
        )
    if ratio < 1.5:
        notes.append(_why_below_target(ceiling, ratio))
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _why_below_target(ceiling: Ceiling, ratio: float) -> str:
    """Why batched/unbatched stayed under 1.5x: the model's own gain, or what diluted it."""
    if ceiling.best_batch_size == 1:
        return (
            "in-process, no batch size beats batch 1 on this device "
            f"({_rates(ceiling)}), so batching cannot raise throughput here"
        )
    if ceiling.batch_gain < 1.5:
        return (
            f"in-process, batch {ceiling.best_batch_size} gives only {ceiling.batch_gain:.2f}x the "
            f"items/s of batch 1 on this device ({_rates(ceiling)}): the model itself gains less "
            "than 1.5x from batching here"
        )
    return (
        f"in-process, batch {ceiling.best_batch_size} gives {ceiling.batch_gain:.2f}x the "
        f"items/s of batch 1 ({_rates(ceiling)}) and the service shows "
        f"{ratio / ceiling.batch_gain:.0%} of that gain: each request's HTTP and media work "
        "costs the same CPU batched or not, which dilutes what the model gains"
    )


def _rates(ceiling: Ceiling) -> str:
    """Items/s by batch size, e.g. "batch 1: 24.1/s, 2: 42.0/s"."""
    rates = [f"{size}: {rate:.1f}/s" for size, rate in ceiling.items_per_s_by_batch_size.items()]
    return "batch " + ", ".join(rates)


def cache_summary(cache: dict[str, Any]) -> dict[str, Any]:
    """Hit p50 (at the client, and inside the server) and hit/miss throughput against the
    cache's targets."""
    inside = cache["hit_server_p50_ms"]
    return {
        "hit_p50_ms": _target(cache["hit_p50_ms"], "< 3", cache["hit_p50_ms"] < 3),
        "hit_server_p50_ms": _target(inside, "< 1", inside < 1),
        "hit_over_miss_throughput": _target(
            cache["hit_over_miss_throughput"], ">= 5", cache["hit_over_miss_throughput"] >= 5
        ),
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables: one row per operation, then the cache scenario."""
    machine = results["machine"]
    lines = [
        f"Benchmark {results['date']} on {results['host']} ({machine['cpu']}, "
        f"{machine['cpu_count']} cores, device {results['device']}"
        f"{', QUICK run: not representative' if results['quick'] else ''}). "
        f"Other processes used {machine['other_cpu_cores_busy']:.2f} cores on average during the "
        f"run (load average {machine['load_average_start'][0]:.1f} at start); the load "
        "generator shares the cores with the server.",
        "",
        "| operation | ceiling items/s (batch) | saturation req/s (conc.) | sat./ceiling (>= 0.8) "
        "| batched/unbatched (>= 1.5) | p50 c=1 - in-process ms (<= 5) "
        "| p99/p50 at sat. (<= 3) | 5xx not 503 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op, entry in results["ops"].items():
        summary = entry["summary"]
        ceiling = entry["ceiling"]
        versus = summary.get("batched_over_unbatched", {})
        versus_text = "n/a"
        if versus.get("value") is not None:
            versus_text = f"{versus['value']:.2f} (c={versus['concurrency']})"
        lines.append(
            f"| {op} | {summary['ceiling_items_per_s']:.2f} ({_ceiling_config(ceiling)}) "
            f"| {summary['saturation']['throughput_rps']:.2f} "
            f"({summary['saturation']['concurrency']}) "
            f"| {summary['saturation_over_ceiling']['value']:.2f} | {versus_text} "
            f"| {_text(summary['p50_c1_minus_in_process_ms']['value'], '.1f')} "
            f"| {_text(summary['p99_over_p50_at_saturation']['value'], '.2f')} "
            f"| {summary['server_errors_not_503']['value']} |"
        )
    peers = {
        op: e["summary"]["versus_litserve"]
        for op, e in results["ops"].items()
        if "versus_litserve" in e["summary"]
    }
    if peers:
        lines += [
            "",
            "| operation | p50 c=1 ms: tokserve / LitServe | saturation req/s: tokserve / "
            "LitServe | p99/p50 at sat.: tokserve / LitServe | tokserve ahead at both |",
            "|---|---|---|---|---|",
        ]
        for op, peer in peers.items():
            c1, sat = peer["c1"], peer["saturation"]
            lines.append(
                f"| {op} | {_text(c1['tokserve_p50_ms'], '.1f')} / "
                f"{_text(c1['litserve_p50_ms'], '.1f')} "
                f"| {sat['tokserve_rps']:.2f} (c={sat['tokserve_concurrency']}) / "
                f"{_text(sat['litserve_rps'], '.2f')} (c={sat['litserve_concurrency']}) "
                f"| {_text(sat['tokserve_p99_over_p50'], '.2f')} / "
                f"{_text(sat['litserve_p99_over_p50'], '.2f')} | {peer['ahead']} |"
            )
    lines += ["", "Notes:"]
    for op, entry in results["ops"].items():
        saturation = entry["summary"]["saturation"]
        lines.append(
            f"- {op}: at saturation the server ran batches of {saturation['mean_batch_size']} "
            f"on average with {saturation['model_busy']:.2f} instances in a forward pass on "
            f"average; the ceiling's best batch is {entry['ceiling']['best_batch_size']}."
        )
        note = entry["summary"].get("batched_over_unbatched", {}).get("note")
        if note:
            lines.append(f"- {op}: {note}.")
        skipped = entry["batched"]["skipped"]
        if skipped:
            lines.append(
                f"- {op}: concurrency {', '.join(str(s['concurrency']) for s in skipped)} not "
                f"measured: {skipped[0]['reason']}."
            )
    cache = results.get("cache")
    if cache:
        lines += [
            "",
            f"Cache ({cache['input']}): hit p50 {cache['hit_p50_ms']:.2f} ms, "
            f"p99 {cache['hit_p99_ms']:.2f} ms (target p50 < 3 ms), inside the server (its "
            f"Server-Timing total) p50 {cache['hit_server_p50_ms']:.2f} ms (target < 1 ms); "
            f"miss p50 {cache['miss_p50_ms']:.1f} ms. At concurrency {cache['concurrency']}: hits "
            f"{cache['hit_throughput_rps']:.0f} req/s, misses {cache['miss_throughput_rps']:.1f} "
            f"req/s, ratio {cache['hit_over_miss_throughput']:.1f} (target >= 5).",
        ]
    return "\n".join(lines) + "\n"


def _ceiling_config(ceiling: dict[str, Any]) -> str:
    """How the ceiling was reached: one instance's best batch, or one-thread instances at once."""
    if ceiling["instances_items_per_s"] > ceiling["items_per_s"]:
        largest = max(int(size) for size in ceiling["items_per_s_by_batch_size"])
        return f"{ceiling['instances']} instances, batch {largest}"
    return f"batch {ceiling['best_batch_size']}"


def _text(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def emit(results: dict[str, Any], out: Path | None) -> None:
    """A benchmark's JSON on stdout, and in ``out`` when given."""
    text = json.dumps(results, indent=2) + "\n"
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        logging.getLogger("bench").info("wrote %s", out)
    sys.stdout.write(text)
