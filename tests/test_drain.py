"""Graceful shutdown (app/drain.py): `tokserve serve` as a process getting real signals, and the
engine's drain clock in-process."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.cli import server_config
from app.drain import Drain, GracefulServer
from app.endpoints import Tokens
from app.engine import Engine
from app.errors import ProblemError
from app.main import create_app
from bench.server import server_process
from tests.support import png_bytes, sample, served, settings_for, wav_bytes


def test_sigterm_exits_zero_after_answering_in_flight_requests(repo: Path) -> None:
    with server_process(repo) as (process, url):
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def encode_across_signals(
    process: subprocess.Popen[bytes], url: str, signals: list[signal.Signals]
) -> tuple[int, dict[str, Any]]:
    """POST an image to encode whose body is half sent when ``signals`` reach the server, then
    send the rest: the request is in flight all through the signals. Its status and JSON."""
    image = png_bytes(seed=12)
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/images/encode")
    connection.putheader("Content-Length", str(len(image)))
    connection.endheaders(image[: len(image) // 2])
    time.sleep(0.3)  # the request is in flight
    for sig in signals:
        process.send_signal(sig)
        time.sleep(0.3)
    connection.send(image[len(image) // 2 :])
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_sigterm_during_a_request_answers_it_then_exits_zero(repo: Path) -> None:
    """The request is mid-body when SIGTERM arrives: the server waits for the rest, answers,
    and only then exits."""
    with server_process(repo) as (process, url):
        status, body = encode_across_signals(process, url, [signal.SIGTERM])
        assert status == 200, body
        assert len(body["items"][0]["tokens"]) == 8
        assert process.wait(timeout=30) == 0


def test_a_second_sigterm_does_not_cut_the_drain_short(repo: Path) -> None:
    """An impatient orchestrator signals twice: the request in flight is still answered and
    the exit is still clean."""
    with server_process(repo) as (process, url):
        status, body = encode_across_signals(process, url, [signal.SIGTERM, signal.SIGTERM])
        assert status == 200, body
        assert len(body["items"][0]["tokens"]) == 8
        assert process.wait(timeout=30) == 0


@contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Processes started meanwhile get SIGINT's default action, even where this one was started
    with SIGINT ignored (a background job of a non-interactive shell): Python keeps an ignored
    SIGINT ignored, and a server started so would shrug off the SIGINT it re-raises at exit."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_drains_like_sigterm_but_exits_as_interrupted(repo: Path) -> None:
    """Ctrl-C answers what is in flight too, but only SIGTERM, the orchestrator's request to
    stop, counts as a clean exit: SIGINT ends the process by that signal."""
    with sigint_not_ignored(), server_process(repo) as (process, url):
        status, body = encode_across_signals(process, url, [signal.SIGINT])
        assert status == 200, body
        assert process.wait(timeout=30) == -signal.SIGINT


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


def test_sigterm_before_the_engine_is_built_stops_the_server_all_the_same(repo: Path) -> None:
    """The lifespan builds the engine after uvicorn's signal handlers are in place: a SIGTERM
    in between has no engine to drain, and still stops the server."""
    app = create_app(settings_for(repo))
    server = GracefulServer(uvicorn.Config(app), app)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit


def test_drain_time_left_is_the_whole_timeout_right_after_drain_begins() -> None:
    drain = Drain(timeout_s=30.0)
    assert not drain.draining
    drain.begin()
    assert drain.draining
    assert 29.0 < drain.left_s() <= 30.0


def test_drain_time_counts_from_the_first_begin_and_runs_out() -> None:
    """A second signal does not restart the clock: what is left is counted from the first."""
    drain = Drain(timeout_s=0.2)
    drain.begin()
    time.sleep(0.25)
    drain.begin()
    assert drain.left_s() == 0.0


def shutdowns() -> float:
    """Items refused because the server shut down before computing them."""
    return sample("tokserve_rejected_total", reason="shutdown")


def audio_encoded(model: str) -> float:
    """Clips the audio model has taken into forward passes so far."""
    return sample("tokserve_batch_size_sum", model=model, op="encode")


async def encode_while_stopping(engine: Engine, count: int) -> list[Any]:
    """A minute-long clip keeps the audio model busy while ``count`` short clips, one call
    each, queue behind it; the engine stops once all of them wait. Each call's item (tokens or
    problem), the long clip's first."""
    endpoint = engine.audio()
    taken = audio_encoded(endpoint.model.name)
    long_call = asyncio.ensure_future(engine.encode_audio([wav_bytes(seconds=60.0)]))
    while audio_encoded(endpoint.model.name) == taken:  # until its forward has begun
        assert not long_call.done(), "the long clip was not computed"
        await asyncio.sleep(0.001)
    calls = [
        asyncio.ensure_future(engine.encode_audio([wav_bytes(seconds=0.2, freq=300.0 + n)]))
        for n in range(count)
    ]
    while endpoint.encoder.depth < count:
        assert audio_encoded(endpoint.model.name) <= taken + 1, "the short clips did not wait"
        await asyncio.sleep(0.001)
    await engine.stop()
    return [answer.items[0] for answer in await asyncio.gather(long_call, *calls)]


async def test_engine_stop_lets_queued_work_finish_within_the_drain_time(repo: Path) -> None:
    engine = Engine.build(settings_for(repo, drain_timeout_s=60.0, warmup=False))
    await engine.start()
    before = shutdowns()
    items = await encode_while_stopping(engine, 12)
    assert [type(item) for item in items] == [Tokens] * 13
    assert shutdowns() == before


async def test_engine_stop_fails_queued_work_with_503_once_the_drain_time_is_spent(
    repo: Path,
) -> None:
    """The drain time counts from the signal, not from the engine's stop: signalled longer
    than TOKSERVE_DRAIN_TIMEOUT_S ago, the queues get no time, and what waits is refused and
    counted (the running forward's call too)."""
    engine = Engine.build(settings_for(repo, drain_timeout_s=0.2, warmup=False))
    await engine.start()
    engine.drain.begin()
    await asyncio.sleep(0.3)
    before = shutdowns()
    long_clip, *queued = await encode_while_stopping(engine, 12)
    assert all(isinstance(item, ProblemError) for item in queued)
    # the long clip's forward may have ended before the stop: then only it has tokens
    refused = [item for item in [long_clip, *queued] if isinstance(item, ProblemError)]
    assert {(item.status, "shut down" in item.detail) for item in refused} == {(503, True)}
    assert shutdowns() == before + len(refused)


def test_in_flight_requests_get_the_whole_drain_time_fractions_included(repo: Path) -> None:
    settings = settings_for(repo, drain_timeout_s=0.9)
    assert server_config(create_app(settings), settings).timeout_graceful_shutdown == 0.9


async def test_a_call_still_reading_its_media_when_the_engine_stops_gets_a_503(repo: Path) -> None:
    engine = Engine.build(settings_for(repo, warmup=False), media_threads=2)
    await engine.start()
    release = threading.Event()
    holders = [asyncio.ensure_future(engine.off_loop(release.wait, 30)) for _ in range(2)]
    call = asyncio.ensure_future(engine.encode_audio([wav_bytes(seconds=0.2)]))
    await asyncio.sleep(0.05)  # its media decode waits behind the two held media threads
    before = shutdowns()
    stopping = asyncio.ensure_future(engine.stop())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(stopping, *holders)
    with pytest.raises(ProblemError) as refused:
        await call
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.detail == (
        "tokserve shut down while this request's media waited to be read; retry on another replica."
    )
    assert shutdowns() == before + 1
