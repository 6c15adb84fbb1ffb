"""The ceiling: a model's batch function called in-process on prepared inputs, no HTTP, no queue."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Ceiling:
    """Items per second at the best batch size; single_item_ms is the median batch-of-1 call
    (the in-process counterpart of the service's p50 at concurrency 1). Where the server runs
    several one-thread instances of the model (TOKSERVE_INSTANCES), the same figures for that
    many threads at once, one torch thread each: the ceiling is the better of the two."""

    best_batch_size: int
    items_per_s: float
    single_item_ms: float
    items_per_s_by_batch_size: dict[int, float]
    instances: int = 1
    instances_items_per_s: float = 0.0
    instances_single_item_ms: float = math.inf

    @property
    def best_items_per_s(self) -> float:
        """The ceiling: one instance at the best batch size, or the instances at once."""
        return max(self.items_per_s, self.instances_items_per_s)

    @property
    def best_single_item_ms(self) -> float:
        """The fastest batch-of-1 call, with the process's torch threads or with one."""
        return min(self.single_item_ms, self.instances_single_item_ms)

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
            "instances": self.instances,
            "instances_items_per_s": round(self.instances_items_per_s, 3),
            "instances_single_item_ms": None
            if math.isinf(self.instances_single_item_ms)
            else round(self.instances_single_item_ms, 3),
        }


def best_of(first: Ceiling, second: Ceiling) -> Ceiling:
    """The better of two measurements per batch size: other processes only ever slow one down."""
    rates = {
        size: max(rate, second.items_per_s_by_batch_size.get(size, 0.0))
        for size, rate in first.items_per_s_by_batch_size.items()
    }
    best = max(rates, key=lambda size: rates[size])
    return Ceiling(
        best,
        rates[best],
        min(first.single_item_ms, second.single_item_ms),
        rates,
        max(first.instances, second.instances),
        max(first.instances_items_per_s, second.instances_items_per_s),
        min(first.instances_single_item_ms, second.instances_single_item_ms),
    )


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
    instances: int = 1,
) -> Ceiling:
    """Time ``run_batch`` at each batch size (items cycled) for at least min_time_s each, and
    with ``instances`` > 1, that many one-thread callers at once at the largest size.

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
    ceiling = Ceiling(
        best_batch_size=best,
        items_per_s=rates[best],
        single_item_ms=statistics.median(call_s[1]) * 1000,
        items_per_s_by_batch_size=rates,
    )
    if instances < 2:
        return ceiling
    rate, single_s = measure_instances(run_batch, items, sizes[-1], instances, min_time_s)
    return replace(
        ceiling,
        instances=instances,
        instances_items_per_s=rate,
        instances_single_item_ms=single_s * 1000,
    )


def measure_instances(
    run_batch: Callable[[list[Any]], list[Any]],
    items: list[Any],
    size: int,
    instances: int,
    min_time_s: float,
) -> tuple[float, float]:
    """Items/s of ``instances`` threads calling ``run_batch`` at ``size`` at once, each with one
    torch thread, as the server's CPU instances run; and the median batch-of-1 call (s) on one
    thread. The caller's torch thread count is restored."""
    threads = torch.get_num_threads()
    batch = [items[i % len(items)] for i in range(size)]

    def calls(out: list[float]) -> None:
        torch.set_num_threads(1)
        run_batch(batch)
        started = time.perf_counter()
        done = 0
        while time.perf_counter() - started < min_time_s or done < 2:
            run_batch(batch)
            done += 1
        out.append(done * size / (time.perf_counter() - started))

    try:
        torch.set_num_threads(1)
        singles = []
        for index in range(5):
            begin = time.perf_counter()
            run_batch([items[index % len(items)]])
            singles.append(time.perf_counter() - begin)
        rates: list[float] = []
        workers = [threading.Thread(target=calls, args=(rates,)) for _ in range(instances)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)
    return sum(rates), statistics.median(singles)
