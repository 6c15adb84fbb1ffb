"""Graceful shutdown (app/drain.py): `tokserve serve` as a process getting real signals, and the
engine's drain clock in-process."""

from __future__ import annotations

import http.client
import json
import signal
import time
from pathlib import Path

import httpx
import uvicorn

from app.drain import GracefulServer
from bench.server import server_process
from tests.support import png_bytes, served, settings_for


def test_sigterm_exits_zero_after_answering_in_flight_requests(repo: Path) -> None:
    with server_process(repo) as (process, url):
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_sigterm_during_a_request_answers_it_then_exits_zero(repo: Path) -> None:
    """The request is mid-body when SIGTERM arrives: the server waits for the rest, answers,
    and only then exits."""
    image = png_bytes(seed=12)
    with server_process(repo) as (process, url):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.putrequest("POST", "/v1/images/encode")
        connection.putheader("Content-Length", str(len(image)))
        connection.endheaders(image[: len(image) // 2])
        time.sleep(0.3)  # the request is in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        connection.send(image[len(image) // 2 :])
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert len(json.loads(response.read())["items"][0]["tokens"]) == 8
        assert process.wait(timeout=30) == 0


async def test_sigterm_fails_readiness_at_once(repo: Path) -> None:
    """Draining starts in the signal handler, before uvicorn stops accepting connections."""
    async with served(settings_for(repo)) as client:
        app = client.app  # type: ignore[attr-defined]
        assert (await client.get("/readyz")).status_code == 200
        server = GracefulServer(uvicorn.Config(app), app)
        server.handle_exit(signal.SIGTERM, None)
        assert app.state.engine.drain.draining
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and "draining" in not_ready.json()["detail"]
