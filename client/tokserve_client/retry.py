"""When a request is tried again: on 503 (the server is full, draining or its model failed) and
on connection errors, after the server's ``Retry-After`` where it gives one.

Encoding and decoding are pure functions of their input, so a request that may have reached
the server is safe to send again.
"""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass

import httpx

# under tokserve's own logger, so `tokserve bulk` shows its retries with its other logs
log = logging.getLogger("tokserve.client")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one request is retried.

    ``attempts`` counts tries, the first included (1: never retry). A pause is the response's
    ``Retry-After`` when it has one, else ``backoff_s`` doubling from try to try; either way at
    most ``max_wait_s``. ``budget_s`` bounds one request's pauses in all: a pause that would
    pass it is not taken and the last answer stands, so a call fails in bounded time however
    busy the server stays."""

    attempts: int = 5
    backoff_s: float = 0.25
    max_wait_s: float = 10.0
    budget_s: float = 30.0
    statuses: tuple[int, ...] = (503,)

    def pause_s(
        self, attempt: int, waited_s: float, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before try ``attempt + 1`` after try ``attempt`` ended in
        ``outcome``, with ``waited_s`` already spent waiting; None when it stands."""
        if isinstance(outcome, httpx.Response) and outcome.status_code not in self.statuses:
            return None
        if attempt >= self.attempts:
            return None
        backoff = self.backoff_s * 2 ** (attempt - 1)
        asked = retry_after_s(outcome) if isinstance(outcome, httpx.Response) else None
        pause = min(self.max_wait_s, backoff if asked is None else asked)
        return None if waited_s + pause > self.budget_s else pause


class Tries:
    """One request's tries so far under ``policy``: the clients send, and ask this whether and
    how long to wait before sending again."""

    def __init__(self, policy: RetryPolicy, request: httpx.Request) -> None:
        self.policy = policy
        self.request = request
        self.attempt = 0
        self.waited_s = 0.0

    def pause_s(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """Seconds to wait before the next try after ``outcome``, logged; None when
        ``outcome`` stands."""
        self.attempt += 1
        pause = self.policy.pause_s(self.attempt, self.waited_s, outcome)
        if pause is not None:
            self.waited_s += pause
            reason = outcome.status_code if isinstance(outcome, httpx.Response) else outcome
            log.warning(
                "%s %s: %s; retrying in %.1f s",
                self.request.method,
                self.request.url.path,
                reason,
                pause,
            )
        return pause


def stands(outcome: httpx.Response | httpx.TransportError) -> httpx.Response:
    """The response a request ends with, or its connection error raised."""
    if isinstance(outcome, httpx.TransportError):
        raise outcome
    return outcome


def retry_after_s(response: httpx.Response) -> float | None:
    """The response's ``Retry-After`` in seconds from now (delay-seconds or an HTTP date), or
    None when it has none that reads."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
