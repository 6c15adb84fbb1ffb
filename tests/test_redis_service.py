"""The service with a real Redis that dies, restarts and hangs: the cache never costs an answer."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from app.config import Settings
from tests.redis_server import RedisServer
from tests.support import png_bytes, served, settings_for


async def encode(client: httpx.AsyncClient, seed: int) -> dict[str, object]:
    response = await client.post("/v1/images/encode", content=png_bytes(seed=seed))
    assert response.status_code == 200, response.text
    item: dict[str, object] = response.json()["items"][0]
    return item


def redis_settings(repo: Path, redis_server: RedisServer) -> Settings:
    return settings_for(
        repo, redis_url=redis_server.url, redis_timeout_ms=50, redis_breaker_cooldown_s=0.5
    )


async def test_hits_come_from_redis_and_match_the_computed_tokens(
    repo: Path, redis_server: RedisServer
) -> None:
    async with served(redis_settings(repo, redis_server)) as client:
        first = await encode(client, 1)
        await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
        again = await encode(client, 1)
    assert (first["cached"], again["cached"]) == (False, True)
    assert again["tokens"] == first["tokens"]
    assert any(key.startswith(b"tok:tiny-image:") for key in redis_server.client().scan_iter())


async def test_redis_killed_mid_stream_every_request_still_answered_correctly(
    repo: Path, redis_server: RedisServer
) -> None:
    async with served(redis_settings(repo, redis_server)) as client:
        expected = {seed: (await encode(client, seed))["tokens"] for seed in range(4)}
        redis_server.kill()
        for seed in list(range(4)) * 3:
            assert (await encode(client, seed))["tokens"] == expected[seed]


async def test_redis_restarted_hits_resume_within_5_s_without_restarting_tokserve(
    repo: Path, redis_server: RedisServer
) -> None:
    async with served(redis_settings(repo, redis_server)) as client:
        await encode(client, 7)
        redis_server.kill()
        await encode(client, 7)
        redis_server.start()
        restarted = time.monotonic()
        cached = False
        while not cached and time.monotonic() - restarted < 5:
            await encode(client, 7)  # a miss that writes back once Redis answers again
            await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
            cached = bool((await encode(client, 7))["cached"])
    assert cached


async def test_hung_redis_costs_at_most_the_cache_timeout(
    repo: Path, redis_server: RedisServer
) -> None:
    async with served(redis_settings(repo, redis_server)) as client:
        start = time.perf_counter()
        await encode(client, 30)
        normal_s = time.perf_counter() - start
        redis_server.pause()
        try:
            worst_s = 0.0
            for seed in range(31, 36):
                start = time.perf_counter()
                await encode(client, seed)
                worst_s = max(worst_s, time.perf_counter() - start)
        finally:
            redis_server.resume()
    # normal latency + one 50 ms lookup timeout, with room for a busy 2-core machine
    assert worst_s < normal_s + 0.05 + 0.5
