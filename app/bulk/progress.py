"""A bulk job's progress: a bar redrawn in place on a terminal, plain lines every few seconds
otherwise (a log file, a Kubernetes pod), and a one-line summary at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 30
REDRAW_S = 0.2  # a terminal's bar
LINE_S = 10.0  # a log's lines


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Counts rows written and errors; the rate and ETA count only this run's items."""

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = self.errors = self.resumed = 0
        self.started = self.shown = time.monotonic()

    def start(self, done: int, errors: int) -> None:
        """Begin counting; ``done`` rows (``errors`` of them failed) came from a previous run."""
        self.done = self.resumed = done
        self.errors = errors
        self.started = self.shown = time.monotonic()
        if done:
            self._say(f"resuming after {done:,} of {self.total:,} items ({errors:,} errors)")

    def advance(self, rows: int, errors: int) -> None:
        self.done += rows
        self.errors += errors
        now = time.monotonic()
        if now - self.shown >= (REDRAW_S if self.tty else LINE_S):
            self.shown = now
            self._show(now)

    def rate(self, now: float | None = None) -> float:
        """Items per second in this run."""
        elapsed = (now or time.monotonic()) - self.started
        return (self.done - self.resumed) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        rate = self.rate(now)
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 else "?"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.done:,}/{self.total:,} ({percent:.0f}%) {rate:.1f} items/s "
            f"ETA {eta} errors {self.errors:,}"
        )

    def _show(self, now: float) -> None:
        if self.tty:
            filled = int(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.line(now)}\x1b[K")
        else:
            self.stream.write(f"tokserve bulk: {self.line(now)}\n")
        self.stream.flush()

    def _say(self, text: str) -> None:
        clear = "\r\x1b[K" if self.tty else ""
        self.stream.write(f"{clear}tokserve bulk: {text}\n")
        self.stream.flush()

    def finish(self, out: Path) -> None:
        """The one-line summary."""
        now = time.monotonic()
        self._say(
            f"{self.done:,} rows ({self.errors:,} errors) in {duration(now - self.started)}, "
            f"{self.rate(now):.1f} items/s -> {out}"
        )
