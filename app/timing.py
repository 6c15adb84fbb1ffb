"""Where one request's time went, answered in its ``Server-Timing`` header.

Each HTTP request gets a ``Timings`` (app.middleware.MetricsMiddleware); the request path adds
the seconds of its stages to it: ``cache`` (lookup), ``media`` (reading uploads and writing
files in the media pool), ``queue`` (waiting for a batch to start) and ``forward`` (the batch's
forward pass). A request of several items adds each item's share, so a stage may exceed the
request's ``total``: the time from the request reaching the application to its answer's
headers. Browsers' developer tools and ``curl -v`` show it; the benchmarks read ``total`` to
measure latency inside the server, without the client's or the network's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

SERVER_TIMING_HEADER = "Server-Timing"
STAGES = ("cache", "media", "queue", "forward")


class Timings:
    """Seconds per stage of one request, and when it reached the application."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` more of ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def header(self) -> str:
        """``cache;dur=0.012, ..., total;dur=41.3``: the stages met, in milliseconds."""
        total = time.perf_counter() - self.started
        parts = [(stage, self.seconds[stage]) for stage in STAGES if stage in self.seconds]
        return ", ".join(f"{name};dur={1000 * s:.3f}" for name, s in [*parts, ("total", total)])


# the timings of the request being handled; None outside one (streams, warm-up, tests)
TIMINGS: ContextVar[Timings | None] = ContextVar("tokserve_timings", default=None)


def current_timings() -> Timings | None:
    """The timings of the request being handled, if any."""
    return TIMINGS.get()


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the time spent in the block to ``stage`` of the current request, if there is one."""
    timings = TIMINGS.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings.add(stage, time.perf_counter() - started)
