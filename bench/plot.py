"""The PNG next to the JSON: throughput and p50/p99 latency against concurrency, per operation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

SERVICES = (("batched", "tab:blue"), ("unbatched", "tab:orange"))


def plot(results: dict[str, Any], path: Path) -> None:
    """Write the figure for ``results`` (the benchmark's JSON document) to ``path``."""
    ops = list(results["ops"].items())
    columns = 2 if len(ops) > 1 else 1
    rows = math.ceil(len(ops) / columns)
    # a bare Figure renders with Agg and leaves pyplot's global state alone
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat[len(ops) :]:
        axis.set_visible(False)
    for axis, (op, entry) in zip(axes.flat, ops, strict=False):
        _panel(axis, op, entry)
    title = f"tokserve {results['date']} on {results['host']}, device {results['device']}"
    if results["quick"]:
        title += " (quick run)"
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _panel(axis: Any, op: str, entry: dict[str, Any]) -> None:
    """Throughput (left axis, lines with dots) and p50/p99 latency (right axis, log scale)."""
    latency_axis = axis.twinx()
    for service, colour in SERVICES:
        levels = entry.get(service, {}).get("levels", [])
        if not levels:
            continue
        concurrency = [level["concurrency"] for level in levels]
        axis.plot(
            concurrency,
            [level["throughput_rps"] for level in levels],
            "o-",
            color=colour,
            label=f"{service} req/s",
        )
        for key, style in (("p50_ms", "--"), ("p99_ms", ":")):
            latency_axis.plot(
                concurrency,
                [level[key] for level in levels],
                style,
                color=colour,
                label=f"{service} {key[:3]}",
            )
    ceiling = entry["ceiling"]["items_per_s"]
    axis.axhline(ceiling, color="black", linewidth=1, label="in-process ceiling")
    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    axis.set_xlabel("concurrency (closed loop)")
    axis.set_ylabel("throughput, items/s")
    axis.set_ylim(bottom=0, top=max(ceiling, axis.get_ylim()[1]) * 1.25)
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("latency, ms")
    axis.set_title(f"{op} ({entry['model']})")
    handles, labels = axis.get_legend_handles_labels()
    more_handles, more_labels = latency_axis.get_legend_handles_labels()
    axis.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="upper left")
