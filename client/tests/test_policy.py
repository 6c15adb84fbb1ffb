"""The retry policy's arithmetic and the split of a call's items into requests, without a
server."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest
from tokserve_client import RetryPolicy
from tokserve_client.retry import retry_after_s
from tokserve_client.wire import MULTIPART_OVERHEAD, chunks

BUSY = httpx.Response(503)
REFUSED = httpx.ConnectError("refused")


def busy(retry_after: str) -> httpx.Response:
    return httpx.Response(503, headers={"Retry-After": retry_after})


def test_a_pause_waits_what_retry_after_asks() -> None:
    assert RetryPolicy().pause_s(1, 0.0, busy("2")) == 2.0


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= retry_after_s(busy(date)) <= 30.0  # the date has whole seconds


def test_retry_after_that_does_not_read_falls_back_to_the_backoff() -> None:
    assert RetryPolicy(backoff_s=0.5).pause_s(1, 0.0, busy("soon")) == 0.5


def test_without_retry_after_the_pause_doubles_from_try_to_try() -> None:
    policy = RetryPolicy(backoff_s=0.5, attempts=10)
    assert [policy.pause_s(n, 0.0, BUSY) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [policy.pause_s(n, 0.0, REFUSED) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_a_pause_is_capped_at_max_wait_s_whatever_retry_after_asks() -> None:
    assert RetryPolicy(max_wait_s=5.0).pause_s(1, 0.0, busy("3600")) == 5.0


def test_no_pause_would_pass_the_budget() -> None:
    policy = RetryPolicy(budget_s=10.0)
    assert policy.pause_s(2, 8.0, busy("2")) == 2.0
    assert policy.pause_s(2, 8.5, busy("2")) is None


def test_the_last_attempt_is_not_retried() -> None:
    policy = RetryPolicy(attempts=3)
    assert policy.pause_s(2, 0.0, BUSY) is not None and policy.pause_s(3, 0.0, BUSY) is None


@pytest.mark.parametrize("status", [200, 207, 400, 413, 415, 422, 500, 502, 504])
def test_only_the_policys_statuses_are_retried(status: int) -> None:
    assert RetryPolicy().pause_s(1, 0.0, httpx.Response(status)) is None
    assert RetryPolicy(statuses=(status,)).pause_s(1, 0.0, httpx.Response(status)) == 0.25


def limits(max_items: int, body_bytes: int) -> dict[str, int]:
    return {"max_items": max_items, "max_body_bytes": MULTIPART_OVERHEAD + body_bytes}


def test_chunks_hold_at_most_max_items_each_with_its_first_index() -> None:
    blobs = [bytes([i]) for i in range(7)]
    runs = chunks(blobs, limits(3, 1000))
    assert [(first, len(run)) for first, run in runs] == [(0, 3), (3, 3), (6, 1)]
    assert [blob for _, run in runs for blob in run] == blobs


def test_chunks_start_anew_before_a_blob_that_would_pass_the_body_limit() -> None:
    blobs = [b"a" * 40, b"b" * 40, b"c" * 30, b"d" * 90]
    runs = chunks(blobs, limits(64, 100))
    assert [(first, len(run)) for first, run in runs] == [(0, 2), (2, 1), (3, 1)]


def test_a_blob_over_the_body_limit_alone_gets_a_request_of_its_own() -> None:
    runs = chunks([b"a", b"b" * 500, b"c"], limits(64, 100))
    assert [(first, len(run)) for first, run in runs] == [(0, 1), (1, 1), (2, 1)]
