"""Several tokserve processes behind a (client-side) load balancer, sharing one real Redis."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from bench.server import server_process
from tests.redis_server import RedisServer
from tests.support import png_bytes


def encode(client: httpx.Client, url: str, image: bytes) -> httpx.Response:
    return client.post(f"{url}/v1/images/encode", content=image, timeout=30)


def test_an_item_encoded_on_one_replica_is_a_hit_on_the_other(
    repo: Path, redis_server: RedisServer
) -> None:
    env = {"TOKSERVE_REDIS_URL": redis_server.url}
    image = png_bytes(seed=21)
    with (
        server_process(repo, **env) as (_, first),
        server_process(repo, **env) as (_, second),
        httpx.Client() as client,
    ):
        computed = encode(client, first, image).json()["items"][0]
        assert computed["cached"] is False
        deadline = time.monotonic() + 5
        while True:  # the cache write happens after the response
            answered = encode(client, second, image).json()["items"][0]
            if answered["cached"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert answered["cached"] is True
    assert answered["tokens"] == computed["tokens"]


def test_sigterm_to_one_replica_while_requests_stream_loses_none(
    repo: Path, redis_server: RedisServer
) -> None:
    env = {"TOKSERVE_REDIS_URL": redis_server.url}
    with (
        server_process(repo, **env) as (leaving, first),
        server_process(repo, **env) as (_, second),
    ):
        statuses: list[int] = []
        retries = 0
        stop = threading.Event()

        def stream() -> None:
            # What nginx does: round robin; on a connection error or 503 retry the request on
            # the next upstream and take the failed one out of rotation.
            nonlocal retries
            upstreams = [first, second]
            with httpx.Client() as client:
                for n in range(10_000):
                    if stop.is_set():
                        break
                    image = png_bytes(seed=1000 + n)
                    primary = upstreams[n % len(upstreams)]
                    try:
                        response = encode(client, primary, image)
                        if response.status_code == 503:
                            raise httpx.ConnectError("draining")
                    except httpx.TransportError:
                        retries += 1
                        upstreams.remove(primary)
                        response = encode(client, upstreams[0], image)
                    statuses.append(response.status_code)

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(1.5)
        leaving.send_signal(signal.SIGTERM)
        exit_code = leaving.wait(timeout=30)
        time.sleep(1.0)
        stop.set()
        worker.join(timeout=60)
    assert exit_code == 0
    assert len(statuses) > 10
    assert set(statuses) == {200}
    assert retries == 1  # the leaving replica's first refusal takes it out of rotation
