"""X-Request-Timeout: a request's deadline, in seconds in (0, 3600], counted from its arrival;
without the header, TOKSERVE_REQUEST_TIMEOUT_S from its arrival."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import held_body, problem_detail, served, settings_for

DECODE = "/v1/images/decode"
BODY = b'{"tokens": ' + str([[1] * 8] * 8).encode() + b"}"
JSON = {"Content-Type": "application/json"}
LATE = "The request's deadline passed before tiny-image got it."


@pytest.fixture
async def quick(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app, not warmed up (it starts in a tenth of a second), and a default deadline of a
    tenth of a second."""
    async with served(settings_for(repo, warmup=False, request_timeout_s=0.1)) as client:
        yield client


def _held(body: bytes, seconds: float) -> AsyncIterator[bytes]:
    """``body`` whose last byte comes ``seconds`` after the rest."""
    release = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, release.set)
    return held_body(body, release)


@pytest.mark.parametrize("value", ["0", "-1", "3600.5", "abc", "", "nan", "inf"])
async def test_a_timeout_outside_0_to_3600_seconds_answers_400_naming_the_range(
    quick: httpx.AsyncClient, value: str
) -> None:
    response = await quick.post(DECODE, content=BODY, headers={**JSON, "X-Request-Timeout": value})
    assert problem_detail(response, 400) == (
        f"X-Request-Timeout must be a number of seconds in (0, 3600], not {value!r}."
    )


@pytest.mark.parametrize("value", ["1", "3600"])
async def test_a_timeout_at_the_ends_of_its_range_is_taken(
    quick: httpx.AsyncClient, value: str
) -> None:
    response = await quick.post(DECODE, content=BODY, headers={**JSON, "X-Request-Timeout": value})
    assert response.status_code == 200, response.text


async def test_without_the_header_the_default_deadline_counts_from_arrival(
    quick: httpx.AsyncClient,
) -> None:
    response = await quick.post(DECODE, content=_held(BODY, 0.5), headers=JSON)
    assert problem_detail(response, 504) == LATE


async def test_the_header_replaces_the_default_deadline(quick: httpx.AsyncClient) -> None:
    held = _held(BODY, 0.5)
    response = await quick.post(DECODE, content=held, headers={**JSON, "X-Request-Timeout": "60"})
    assert response.status_code == 200, response.text
