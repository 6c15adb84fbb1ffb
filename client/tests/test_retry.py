"""Retries on a real 503: a server that serves one request at a time (TOKSERVE_MAX_IN_FLIGHT=1)
answers the next one 503 with Retry-After: 1 while a slow upload holds its only place."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from harness import (
    AsyncRecordingTransport,
    Log,
    RecordingTransport,
    free_port,
    hold_the_only_slot,
    metric,
    noise_png,
    serve,
)
from tokserve_client import AsyncClient, Client, RetryPolicy, TokserveError

RETRY_AFTER_S = 1.0  # what the server's 503 says

# a body the server answers whole before it closes: a large one, refused with Connection: close
# before it is read, can meet a reset while it is still being sent on a loaded machine
SMALL = noise_png(1, side=16)


@pytest.fixture(scope="module")
def one_at_a_time() -> Iterator[str]:
    yield from serve(TOKSERVE_MAX_IN_FLIGHT="1")


@pytest.fixture
def held(one_at_a_time: str) -> Iterator[tuple[str, Log]]:
    """The server with its one place taken until the client under test is first answered 503
    (``log.on_503``); yields its URL and the Log for the client's transport."""
    log = Log()
    holder = hold_the_only_slot(one_at_a_time, log.on_503)
    try:
        yield one_at_a_time, log
    finally:
        log.on_503.set()
        holder.join(60)


def rejected(url: str) -> float:
    return metric(url, "tokserve_rejected_total", reason="in_flight")


def test_a_503_is_retried_after_the_servers_retry_after(held: tuple[str, Log]) -> None:
    url, log = held
    before = rejected(url)
    with Client(url, transport=RecordingTransport(log)) as tok:
        (grid,) = tok.encode_images([SMALL])
    assert grid.shape == (32, 32)
    assert log.statuses() == [503, 200] and rejected(url) - before == 1
    refused, retried = log.exchanges
    # the default backoff would have waited 0.25 s; the server asked for 1 s
    assert RETRY_AFTER_S <= retried.sent - refused.answered < RETRY_AFTER_S + 1.0


async def test_async_a_503_is_retried_after_the_servers_retry_after(
    held: tuple[str, Log],
) -> None:
    url, log = held
    async with AsyncClient(url, transport=AsyncRecordingTransport(log)) as tok:
        (grid,) = await tok.encode_images([SMALL])
    assert grid.shape == (32, 32) and log.statuses() == [503, 200]
    refused, retried = log.exchanges
    assert RETRY_AFTER_S <= retried.sent - refused.answered < RETRY_AFTER_S + 1.0


def test_a_retry_after_past_the_budget_fails_the_call_with_the_503_at_once(
    held: tuple[str, Log],
) -> None:
    url, log = held
    policy = RetryPolicy(budget_s=RETRY_AFTER_S / 2)
    tok = Client(url, retry=policy, transport=RecordingTransport(log))
    with tok, pytest.raises(TokserveError) as raised:
        tok.encode_images([SMALL])
    assert raised.value.status == 503 and "TOKSERVE_MAX_IN_FLIGHT" in raised.value.detail
    assert log.statuses() == [503]


def test_a_refused_connection_is_retried_until_the_attempts_run_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RetryPolicy(attempts=3, backoff_s=0.01)
    tok = Client(f"http://127.0.0.1:{free_port()}", retry=policy)
    with tok, pytest.raises(httpx.ConnectError):
        tok.models()
    retries = [r.getMessage() for r in caplog.records if r.name == "tokserve.client"]
    assert len(retries) == 2 and all("retrying in" in message for message in retries)


def test_an_answer_other_than_503_is_not_retried(url: str) -> None:
    log = Log()
    tok = Client(url, transport=RecordingTransport(log))
    with tok, pytest.raises(TokserveError) as raised:
        tok.decode_image(np.full((32, 32), 10**6))
    assert raised.value.status == 422 and log.statuses() == [422]
