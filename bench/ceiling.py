"""The ceiling: a model's batch function called in-process on prepared inputs, no HTTP, no queue."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ceiling:
    """Items per second at the best batch size; single_item_ms is the median batch-of-1 call
    (the in-process counterpart of the service's p50 at concurrency 1)."""

    best_batch_size: int
    items_per_s: float
    single_item_ms: float
    items_per_s_by_batch_size: dict[int, float]

    @property
    def batch_gain(self) -> float:
        """How much faster per item the best batch is than one item at a time."""
        return self.items_per_s / self.items_per_s_by_batch_size[1]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "best_batch_size": self.best_batch_size,
            "items_per_s": round(self.items_per_s, 3),
            "single_item_ms": round(self.single_item_ms, 3),
            "batch_gain": round(self.batch_gain, 3),
            "items_per_s_by_batch_size": {
                str(size): round(rate, 3) for size, rate in self.items_per_s_by_batch_size.items()
            },
        }


def best_of(first: Ceiling, second: Ceiling) -> Ceiling:
    """The better of two measurements per batch size: other processes only ever slow one down."""
    rates = {
        size: max(rate, second.items_per_s_by_batch_size.get(size, 0.0))
        for size, rate in first.items_per_s_by_batch_size.items()
    }
    best = max(rates, key=lambda size: rates[size])
    return Ceiling(best, rates[best], min(first.single_item_ms, second.single_item_ms), rates)


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size."""
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def measure_ceiling(
    run_batch: Callable[[list[Any]], list[Any]],
    items: list[Any],
    sizes: list[int],
    min_time_s: float,
    min_single_calls: int = 5,
) -> Ceiling:
    """Time ``run_batch`` at each batch size (items cycled) for at least min_time_s each.

    One untimed call first, so that lazy initialisation is not counted.
    """
    run_batch(items[:1])
    call_s: dict[int, list[float]] = {}
    for size in sizes:
        batch = [items[i % len(items)] for i in range(size)]
        times: list[float] = []
        wanted_calls = min_single_calls if size == 1 else 1
        while sum(times) < min_time_s or len(times) < wanted_calls:
            started = time.perf_counter()
            run_batch(batch)
            times.append(time.perf_counter() - started)
        call_s[size] = times
    rates = {size: size / statistics.median(times) for size, times in call_s.items()}
    best = max(rates, key=lambda size: rates[size])
    return Ceiling(
        best_batch_size=best,
        items_per_s=rates[best],
        single_item_ms=statistics.median(call_s[1]) * 1000,
        items_per_s_by_batch_size=rates,
    )
