"""A circuit breaker: after repeated failures, stop calling for a while, then try one probe."""

from __future__ import annotations

import time


class CircuitBreaker:
    """Refuse calls for ``cooldown_s`` after ``failures`` failures in a row, then admit a probe."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._threshold = max(1, failures)
        self._cooldown_s = cooldown_s
        self._consecutive_failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused or a probe decides."""
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether a call may go out now; past the cool-down, admits exactly one probe."""
        if self._open_until is None:
            return True
        if self._probing or time.monotonic() < self._open_until:
            return False
        self._probing = True
        return True

    def record_success(self) -> bool:
        """Close the breaker; True when it was open."""
        was_open = self._open_until is not None
        self._consecutive_failures = 0
        self._open_until = None
        self._probing = False
        return was_open

    def record_failure(self) -> bool:
        """Count a failure; True when this one opened a closed breaker."""
        self._consecutive_failures += 1
        self._probing = False
        was_open = self._open_until is not None
        if was_open or self._consecutive_failures >= self._threshold:
            self._open_until = time.monotonic() + self._cooldown_s
        return not was_open and self._open_until is not None

    def abandon(self) -> None:
        """A call ended without an outcome (its caller was cancelled): free the probe slot."""
        self._probing = False
