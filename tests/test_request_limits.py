"""What a request may take before any of it is parsed: TOKSERVE_MAX_BODY_BYTES of body, by
Content-Length at once or while the body streams in, and a place among TOKSERVE_MAX_IN_FLIGHT
API requests served at once (the 503 past it: tests/test_hostile.py). The middleware that
enforces them passes what is not an HTTP request (the ASGI lifespan) through untouched."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY

from app.main import create_app
from tests.support import held_body, in_chunks, png_bytes, problem_detail, served, settings_for

ENCODE = "/v1/images/encode"
IMAGE = png_bytes(seed=51)
TOO_LARGE = (
    "The request body is larger than the limit of {} bytes (TOKSERVE_MAX_BODY_BYTES); "
    "send fewer or smaller items per request."
)


async def test_a_body_declared_over_the_limit_answers_413_and_closes_the_connection(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_body_bytes=10_000, warmup=False)) as client:
        response = await client.post(ENCODE, content=b"x" * 10_001)
        assert problem_detail(response, 413) == TOO_LARGE.format(10_000)
        assert response.headers["connection"] == "close"  # the body is not read


async def test_a_body_streamed_past_the_limit_answers_413(repo: Path) -> None:
    async with served(settings_for(repo, max_body_bytes=10_000, warmup=False)) as client:
        response = await client.post(ENCODE, content=in_chunks(b"x" * 10_001))
        assert problem_detail(response, 413) == TOO_LARGE.format(10_000)


async def test_a_body_of_exactly_the_limit_is_served_declared_or_streamed(repo: Path) -> None:
    async with served(settings_for(repo, max_body_bytes=len(IMAGE), warmup=False)) as client:
        declared = await client.post(ENCODE, content=IMAGE)
        assert declared.status_code == 200, declared.text
        streamed = await client.post(ENCODE, content=in_chunks(IMAGE))
        assert streamed.status_code == 200, streamed.text


def _in_flight() -> float:
    return REGISTRY.get_sample_value("tokserve_requests_in_flight") or 0.0


def _refused_in_flight() -> float:
    return REGISTRY.get_sample_value("tokserve_rejected_total", {"reason": "in_flight"}) or 0.0


async def test_max_in_flight_requests_are_served_together_and_the_next_one_refused(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_in_flight=2, warmup=False)) as client:
        gauge, refused = _in_flight(), _refused_in_flight()
        release = asyncio.Event()
        held = [
            asyncio.ensure_future(client.post(ENCODE, content=held_body(IMAGE, release)))
            for _ in range(2)
        ]
        async with asyncio.timeout(10):
            while _in_flight() < gauge + 2:
                await asyncio.sleep(0.01)
        turned_away = await client.post(ENCODE, content=IMAGE)
        assert problem_detail(turned_away, 503) == (
            "The server is serving 2 requests (TOKSERVE_MAX_IN_FLIGHT); retry after a second, "
            "or on another replica."
        )
        assert _refused_in_flight() == refused + 1
        assert _in_flight() == gauge + 2
        release.set()
        assert [(await request).status_code for request in held] == [200, 200]
        assert _in_flight() == gauge


async def test_a_finished_request_frees_its_place(repo: Path) -> None:
    async with served(settings_for(repo, max_in_flight=1, warmup=False)) as client:
        assert (await client.post(ENCODE, content=IMAGE)).status_code == 200
        assert (await client.post(ENCODE, content=b"no image")).status_code == 415
        release = asyncio.Event()
        held = asyncio.ensure_future(client.post(ENCODE, content=held_body(IMAGE, release)))
        async with asyncio.timeout(10):
            while not _in_flight():
                await asyncio.sleep(0.01)
        assert (await client.post(ENCODE, content=IMAGE)).status_code == 503
        release.set()
        assert (await held).status_code == 200


async def test_the_app_starts_and_stops_through_the_asgi_lifespan_as_a_server_runs_it(
    repo: Path,
) -> None:
    """uvicorn sends the lifespan through every middleware (tests/support.served does not)."""
    app = create_app(settings_for(repo, warmup=False))
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await events.put({"type": "lifespan.startup"})
    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, events.get, send)
    )
    async with asyncio.timeout(30):
        while not sent and not lifespan.done():
            await asyncio.sleep(0.01)
    assert sent == [{"type": "lifespan.startup.complete"}]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tokserve") as client:
        assert (await client.post(ENCODE, content=IMAGE)).status_code == 200
    await events.put({"type": "lifespan.shutdown"})
    async with asyncio.timeout(30):
        await lifespan
    assert sent[1:] == [{"type": "lifespan.shutdown.complete"}]
