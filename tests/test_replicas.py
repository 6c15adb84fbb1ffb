"""Several tokserve processes sharing one real Redis, and behind the compose stack's nginx."""

from __future__ import annotations

import collections
import difflib
import http.client
import itertools
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.server import free_port, server_process
from tests.nginx_server import NGINX_CONF, adapt_config, nginx, nginx_binary
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


@dataclass
class Answer:
    at: float  # time.monotonic() on arrival
    status: int
    date: str  # the Date header
    body: bytes


class Repeater(threading.Thread):
    """Sends one request after another to ``url`` on a keep-alive connection and records each
    answer, until stopped. A refused or dropped connection is counted in ``errors`` and the
    connection reopened. Bounded in count and time, like every request loop of the tests."""

    def __init__(
        self,
        url: str,
        path: str,
        body: Callable[[int], bytes] | None = None,
        max_requests: int = 50_000,
        max_s: float = 120.0,
    ) -> None:
        super().__init__(daemon=True)
        self.address = url.removeprefix("http://")
        self.path, self.body = path, body
        self.max_requests, self.max_s = max_requests, max_s
        self.answers: list[Answer] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        connection: http.client.HTTPConnection | None = None
        for n in range(self.max_requests):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(self.address, timeout=60)
                if self.body is None:
                    connection.request("GET", self.path)
                else:
                    connection.request("POST", self.path, body=self.body(n))
                response = connection.getresponse()
                content = response.read()
                date = response.getheader("date", "")
                self.answers.append(Answer(time.monotonic(), response.status, date, content))
            except (OSError, http.client.HTTPException):
                self.errors += 1
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.01)
        if connection is not None:
            connection.close()


def next_date_change(probes: list[Repeater], timeout_s: float = 10.0) -> float:
    """When the probed server's Date header next changes (time.monotonic(), to about a ms)."""
    start = time.monotonic()
    while time.monotonic() < start + timeout_s:
        answers = sorted(
            (a for probe in probes for a in probe.answers if a.at >= start), key=lambda a: a.at
        )
        for previous, answer in itertools.pairwise(answers):
            if answer.date != previous.date:
                return answer.at
        time.sleep(0.01)
    raise AssertionError("the Date header did not change")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_nginx_loses_no_request_while_one_replica_drains_on_sigterm(
    repo: Path, tmp_path: Path
) -> None:
    """docker/nginx.conf, run by nginx, in front of two `tokserve serve` replicas; one gets
    SIGTERM while encode requests stream through nginx. Every request through nginx is answered
    200; the leaving replica's /readyz answers 503 from the signal until its listener closes,
    nginx retries that 503 and, once the replica has exited, its refusals on the other one; the
    replica exits 0.

    uvicorn closes its listener at the first of its 100 ms ticks after the signal: that is how
    long /readyz can answer 503. To give that window the same length every run, SIGTERM is sent
    30 ms after a tick, seen as a change of the Date header (refreshed on every tenth tick)."""
    nginx_binary()  # before the replicas start
    nginx_port = free_port()
    with (
        server_process(repo) as (leaving, leaving_url),
        server_process(repo) as (_, staying_url),
    ):
        upstreams = [url.removeprefix("http://") for url in (leaving_url, staying_url)]
        config = adapt_config(upstreams, nginx_port)
        diff = list(difflib.ndiff(NGINX_CONF.read_text().splitlines(), config.splitlines()))
        # the real file: only the upstream addresses and the listen port are adapted
        assert [line[2:] for line in diff if line.startswith("- ")] == [
            "        server tokserve:8000 resolve max_fails=3 fail_timeout=5s;",
            "        listen 80;",
        ]
        assert [line[2:] for line in diff if line.startswith("+ ")] == [
            f"        server {upstreams[0]} max_fails=3 fail_timeout=5s;",
            f"        server {upstreams[1]} max_fails=3 fail_timeout=5s;",
            f"        listen 127.0.0.1:{nginx_port};",
        ]
        with nginx(config, nginx_port, tmp_path / "nginx") as balancer:
            # Prometheus scrapes each replica itself; the balancer hides /metrics.
            assert httpx.get(f"{balancer.url}/metrics", timeout=5).status_code == 404
            assert httpx.get(f"{leaving_url}/metrics", timeout=5).status_code == 200

            streams = [
                Repeater(balancer.url, "/v1/images/encode", lambda n, s=s: png_bytes(seed=n + s))
                for s in (0, 100_000)
            ]
            through_nginx = [Repeater(balancer.url, "/readyz") for _ in range(2)]
            direct = [Repeater(leaving_url, "/readyz") for _ in range(2)]
            everything = [*streams, *through_nginx, *direct]
            for thread in everything:
                thread.start()
            try:
                wait_until(lambda: sum(len(s.answers) for s in streams) >= 30, "the stream")
                tick = next_date_change(direct)
                time.sleep(max(0.0, tick + 0.03 - time.monotonic()))
                signalled_at = time.monotonic()
                leaving.send_signal(signal.SIGTERM)
                exit_code = leaving.wait(timeout=60)
                for probe in [*direct, *through_nginx]:
                    probe.stop.set()

                def retried_after_exit() -> bool:
                    # the exited replica refuses; nginx sends the request to the other one
                    return any(
                        r["upstream"] == ", ".join(upstreams) and r["uri"] == "/v1/images/encode"
                        for r in balancer.requests()
                    )

                wait_until(retried_after_exit, "an encode request retried", timeout_s=30)
            finally:
                for thread in everything:
                    thread.stop.set()
                for thread in everything:
                    thread.join(timeout=120)
        logged = balancer.requests()

    assert exit_code == 0
    # each probe's connection: 200 until SIGTERM, then 503 until the listener closed
    draining = []
    for probe in direct:
        statuses = [a.status for a in probe.answers]
        ready = statuses.index(503) if 503 in statuses else len(statuses)
        assert set(statuses[:ready]) == {200} and set(statuses[ready:]) <= {503}, "flipped back"
        draining += probe.answers[ready:]
    assert draining, "/readyz never answered 503 between SIGTERM and the exit"
    assert all(a.at > signalled_at and b"draining" in a.body for a in draining)

    for thread in [*streams, *through_nginx]:
        assert thread.errors == 0, "a request through nginx got no answer"
        assert {a.status for a in thread.answers} == {200}, "every answer through nginx is 200"
    encodes = [r for r in logged if r["uri"] == "/v1/images/encode"]
    assert len(encodes) == sum(len(s.answers) for s in streams) > 30
    by_upstream = collections.Counter(r["upstream"] for r in encodes)
    # round robin over both replicas, and the leaving one's refusals retried on the other
    assert set(by_upstream) == {*upstreams, ", ".join(upstreams)}, by_upstream
    assert by_upstream[upstreams[0]] >= 5 and by_upstream[upstreams[1]] >= 5, by_upstream
    # the draining replica's 503 was retried on the other one
    retried_503 = [
        r for r in logged if r["uri"] == "/readyz" and r["upstream_status"] == "503, 200"
    ]
    assert retried_503, "no 503 from the draining replica was retried on the other replica"
