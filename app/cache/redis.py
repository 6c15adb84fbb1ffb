"""The Redis cache shared by every replica: client construction from a URL, per-call deadlines
sized by the bytes moved, and a circuit breaker; Redis down, slow or garbled reads as a miss."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.cache.breaker import CircuitBreaker
from app.cache.counting import ERRORS, Fits, pack_items, unpack_counted
from app.metrics import CACHE_DURATION

log = logging.getLogger("tokserve.cache")

R = TypeVar("R")

# No single call waits longer than this, whatever its bytes (see RedisCache._guarded).
_SOCKET_TIMEOUT_S = 10.0


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` to a (host, port) pair."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = address.rpartition(":")
    return (host, int(port)) if sep else (address, default_port)


def _redis_client(url: str, timeout_s: float) -> tuple[Redis | RedisCluster, list[Redis]]:
    """Client for a redis[s]://, unix://, redis+sentinel://, redis+cluster:// URL (+ sentinels)."""
    options: dict[str, Any] = {
        # A backstop only: each call's own deadline (timeout plus its bytes' transfer) is shorter.
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": timeout_s,
        # One immediate retry on a dead pooled socket (Redis restarted); timeouts are not retried.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        # No CLIENT SETINFO round trips on each new connection.
        "driver_info": None,
    }
    scheme, _, rest = url.partition("://")
    base_scheme, _, topology = scheme.partition("+")
    if topology == "cluster":
        return RedisCluster.from_url(f"{base_scheme}://{rest}", **options), []
    if topology == "sentinel":
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        path = [segment for segment in parts.path.split("/") if segment]
        if not path:
            raise ValueError("a sentinel URL names its service: redis+sentinel://host:26379/name")
        sentinel = Sentinel(
            [_host_port(address, 26379) for address in hosts.split(",")],
            sentinel_kwargs={
                "socket_timeout": timeout_s,
                "socket_connect_timeout": timeout_s,
                "driver_info": None,
            },
            **options,
        )
        client = sentinel.master_for(
            path[0],
            username=unquote(username) or None,
            password=unquote(password) or None,
            db=int(path[1]) if len(path) > 1 else 0,
            ssl=base_scheme == "rediss",
        )
        return client, list(sentinel.sentinels)
    return Redis.from_url(url, **options), []


class RedisCache:
    """Cache shared by every replica; Redis down, slow or garbled reads as a miss.

    Each call's deadline is ``timeout_ms`` plus the time its bytes take at ``min_mb_per_s``: a
    10-minute audio result (720 kB) is not "slow" for taking longer than a 1 kB one. Reads
    learn the values' sizes first (STRLEN of every key, one pipeline), then MGET the keys present.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: float = 50.0,
        min_mb_per_s: float = 25.0,
        ttl_s: float = 7 * 24 * 3600,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 2.0,
    ) -> None:
        self._timeout_s = timeout_ms / 1000
        self._bytes_per_s = min_mb_per_s * 1e6
        self._ttl_ms = int(ttl_s * 1000) if ttl_s > 0 else None
        self._client, self._extra_clients = _redis_client(url, self._timeout_s)
        self._breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self._cooldown_s = breaker_cooldown_s
        # calls past their deadline that have not ended yet (see _guarded)
        self._overrunning: set[asyncio.Future[Any]] = set()

    @property
    def breaker_open(self) -> bool:
        """True while Redis is being skipped after repeated failures."""
        return self._breaker.is_open

    async def get_many(
        self, keys: list[str], fits: Sequence[Fits] | None = None
    ) -> list[np.ndarray | None]:
        """STRLEN of every key, then one MGET of those present; all misses when Redis fails;
        a value ``fits`` refuses is a miss."""
        if not keys:
            return []
        start = time.perf_counter()
        blobs = await self._fetch(keys)
        CACHE_DURATION.labels("redis", "get").observe(time.perf_counter() - start)
        if blobs is None:
            ERRORS.inc(len(keys))
            return [None] * len(keys)
        return unpack_counted(blobs, fits)

    async def set_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """One pipeline of SET … PX ttl; failures are logged and counted, never raised."""
        blobs = pack_items(items)
        if not blobs:
            return
        start = time.perf_counter()
        size = sum(len(blob) for _, blob in blobs)
        written = await self._guarded("set", lambda: self._write(blobs), size)
        CACHE_DURATION.labels("redis", "set").observe(time.perf_counter() - start)
        if written is None:
            ERRORS.inc(len(blobs))

    async def ping(self) -> bool:
        """True when Redis answers PING within the timeout; bypasses the breaker."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """Close the pool (and any sentinel connections)."""
        for attempt in self._overrunning:
            attempt.cancel()
        for client in (self._client, *self._extra_clients):
            await client.aclose()

    def _overran(self, attempt: asyncio.Future[Any]) -> None:
        """A call past its deadline ended: forget it, and its outcome, which nobody awaits."""
        self._overrunning.discard(attempt)
        if not attempt.cancelled():
            attempt.exception()

    async def _fetch(self, keys: list[str]) -> list[bytes | None] | None:
        """Values of ``keys`` (None where absent); None when Redis failed or is skipped."""
        sizes = await self._guarded("get", lambda: self._strlen(keys))
        if sizes is None:
            return None
        present = [key for key, size in zip(keys, sizes, strict=True) if size]
        if not present:
            return [None] * len(keys)
        values = await self._guarded("get", lambda: self._mget(present), sum(sizes))
        if values is None:
            return None
        found = dict(zip(present, values, strict=True))
        return [found.get(key) for key in keys]

    async def _strlen(self, keys: list[str]) -> list[int]:
        """Byte length of each key's value (0 when absent), in one pipeline."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.strlen(key)
            return [int(size) for size in await pipe.execute()]

    async def _mget(self, keys: list[str]) -> list[Any]:
        """MGET; across slots in a cluster (one request per node, concurrently)."""
        if isinstance(self._client, RedisCluster):
            return await self._client.mget_nonatomic(keys)
        return await self._client.mget(keys)

    async def _write(self, blobs: list[tuple[str, bytes]]) -> list[Any]:
        """Every SET in one non-transactional pipeline."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key, blob in blobs:
                pipe.set(key, blob, px=self._ttl_ms)
            return await pipe.execute()

    async def _guarded(self, op: str, call: Callable[[], Awaitable[R]], size: int = 0) -> R | None:
        """Run ``call`` (moving ``size`` bytes) under its deadline and the breaker.

        None when skipped or failed. The deadline is the timeout plus the bytes' transfer time.
        The caller has its answer at the deadline even if the call goes on: a cancelled call
        may not stop (on Python 3.11 redis-py's asyncio.wait_for around each write loses a
        cancellation that arrives as the write completes, after the event loop stalled), and
        would then wait for the 10 s socket timeout; it is left to end on its own.
        """
        if not self._breaker.allow():
            return None
        deadline_s = min(self._timeout_s + size / self._bytes_per_s, _SOCKET_TIMEOUT_S)
        attempt = asyncio.ensure_future(call())
        try:
            await asyncio.wait([attempt], timeout=deadline_s)
        except BaseException:  # the caller was cancelled: no outcome
            attempt.cancel()
            self._breaker.abandon()
            raise
        try:
            if not attempt.done() or attempt.cancelled():
                attempt.cancel()
                self._overrunning.add(attempt)
                attempt.add_done_callback(self._overran)
                raise TimeoutError
            result = attempt.result()
        except Exception as exc:
            # the deadline raises a bare TimeoutError; say what it means.
            reason = str(exc) or f"no answer within {deadline_s * 1000:.0f} ms"
            if self._breaker.record_failure():
                log.warning(
                    "Redis cache %s failed (%s: %s); skipping Redis for %g s",
                    op,
                    type(exc).__name__,
                    reason,
                    self._cooldown_s,
                )
            else:
                log.debug("Redis cache %s failed (%s: %s)", op, type(exc).__name__, reason)
            return None
        except BaseException:
            self._breaker.abandon()
            raise
        if self._breaker.record_success():
            log.info("Redis cache reachable again")
        return result
