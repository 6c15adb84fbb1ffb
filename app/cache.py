"""Token cache: key derivation, Redis and in-process backends (values: app/cache_format.py).

The cache may only make the service faster: every failure (Redis down, slow, answering garbage)
reads as a miss and is counted, never raised to the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.cache_format import pack_array, unpack_array
from app.config import Settings
from app.metrics import CACHE_BYTES, CACHE_DURATION, CACHE_REQUESTS

log = logging.getLogger("tokserve.cache")

R = TypeVar("R")

_HITS = CACHE_REQUESTS.labels(result="hit")
_MISSES = CACHE_REQUESTS.labels(result="miss")
_ERRORS = CACHE_REQUESTS.labels(result="error")
# well-formed values that do not fit what the caller expects (wrong dtype, shape or ids)
_INVALID = CACHE_REQUESTS.labels(result="invalid")

# Whether a cached array is an answer the caller can serve; anything else reads as a miss.
Fits = Callable[[np.ndarray], bool]

# ---------------------------------------------------------------------------------------------
# keys


def cache_key(model: str, version: str, op: str, params: str, data: bytes) -> str:
    """``tok:{model}:{version}:{op}:{params}:{blake2b-128 hex of data}``."""
    # ':' in the first three fields would let two different requests spell the same key.
    for name, field in (("model", model), ("version", version), ("op", op)):
        if ":" in field:
            raise ValueError(f"cache key {name} must not contain ':' (got {field!r})")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return f"tok:{model}:{version}:{op}:{params}:{digest}"


def canonical_params(**params: object) -> str:
    """Result-changing parameters as sorted ``k=v`` pairs: ``n_q=8,resize=crop``."""
    return ",".join(f"{name}={params[name]}" for name in sorted(params))


def _pack_items(items: list[tuple[str, np.ndarray]]) -> list[tuple[str, bytes]]:
    """Pack each item; an array that cannot be packed is logged, counted and left out."""
    packed = []
    for key, tokens in items:
        try:
            packed.append((key, pack_array(tokens)))
        except (TypeError, ValueError) as exc:
            _ERRORS.inc()
            log.warning("not caching %s: %s", key, exc)
    return packed


def _unpack_counted(
    blobs: list[bytes | None], fits: Sequence[Fits] | None
) -> list[np.ndarray | None]:
    """Unpack looked-up values, counting one hit, miss, error (garbage) or invalid (readable,
    but its ``fits`` refuses it: whoever can write to the cache must not choose answers)."""
    results: list[np.ndarray | None] = []
    hits = garbage = invalid = 0
    for index, blob in enumerate(blobs):
        if blob is None:
            results.append(None)
            continue
        try:
            array = unpack_array(blob)
        except ValueError as exc:
            results.append(None)
            garbage += 1
            log.warning("cached value unreadable, treating as a miss: %s", exc)
            continue
        if fits is not None and not fits[index](array):
            results.append(None)
            invalid += 1
            log.warning("cached %s%s does not fit its key; a miss", array.dtype, list(array.shape))
            continue
        results.append(array)
        hits += 1
    misses = len(blobs) - hits - garbage - invalid
    for counter, count in (
        (_HITS, hits),
        (_MISSES, misses),
        (_ERRORS, garbage),
        (_INVALID, invalid),
    ):
        if count:
            counter.inc(count)
    return results


# ---------------------------------------------------------------------------------------------
# backends


class TokenCache(Protocol):
    """Where token arrays computed for a cache key are kept; lookups and writes never raise."""

    async def get_many(
        self, keys: list[str], fits: Sequence[Fits] | None = None
    ) -> list[np.ndarray | None]:
        """Arrays for ``keys`` in order, None for each miss and each value refused by its
        ``fits`` (one predicate per key); one round trip."""
        ...

    async def set_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store every item with the configured TTL; one round trip; never raises."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers now."""
        ...

    async def close(self) -> None:
        """Release connections or memory."""
        ...


class MemoryCache:
    """In-process LRU bounded by bytes (keys + packed values), the default without Redis."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        # A thread lock, never held across an await: also safe to call from worker threads.
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        """Bytes of keys and packed values currently held."""
        return self._bytes

    async def get_many(
        self, keys: list[str], fits: Sequence[Fits] | None = None
    ) -> list[np.ndarray | None]:
        """Arrays for ``keys``, None where missing, expired or refused by ``fits``; a hit
        becomes most recent."""
        start = time.perf_counter()
        now = time.monotonic()
        blobs: list[bytes | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[0] <= now:
                    self._drop(key)
                    entry = None
                if entry is not None:
                    self._entries.move_to_end(key)
                blobs.append(None if entry is None else entry[1])
            CACHE_BYTES.set(self._bytes)
        results = _unpack_counted(blobs, fits)
        CACHE_DURATION.labels("memory", "get").observe(time.perf_counter() - start)
        return results

    async def set_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store items, evicting least recently used entries past ``max_bytes``."""
        start = time.perf_counter()
        expires_at = time.monotonic() + self._ttl_s if self._ttl_s > 0 else math.inf
        packed = _pack_items(items)
        with self._lock:
            for key, blob in packed:
                self._drop(key)
                size = len(key) + len(blob)
                if size > self._max_bytes:
                    continue
                self._entries[key] = (expires_at, blob)
                self._bytes += size
                while self._bytes > self._max_bytes:
                    self._drop(next(iter(self._entries)))
            CACHE_BYTES.set(self._bytes)
        CACHE_DURATION.labels("memory", "set").observe(time.perf_counter() - start)

    def _drop(self, key: str) -> None:
        """Forget ``key`` if held; the caller holds the lock."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(key) + len(entry[1])

    async def ping(self) -> bool:
        """Always reachable."""
        return True

    async def close(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            CACHE_BYTES.set(0)


class CircuitBreaker:
    """Refuse calls for ``cooldown_s`` after ``failures`` failures in a row, then admit a probe."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self._threshold = max(1, failures)
        self._cooldown_s = cooldown_s
        self._consecutive_failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused or a probe decides."""
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether a call may go out now; past the cool-down, admits exactly one probe."""
        if self._open_until is None:
            return True
        if self._probing or time.monotonic() < self._open_until:
            return False
        self._probing = True
        return True

    def record_success(self) -> bool:
        """Close the breaker; True when it was open."""
        was_open = self._open_until is not None
        self._consecutive_failures = 0
        self._open_until = None
        self._probing = False
        return was_open

    def record_failure(self) -> bool:
        """Count a failure; True when this one opened a closed breaker."""
        self._consecutive_failures += 1
        self._probing = False
        was_open = self._open_until is not None
        if was_open or self._consecutive_failures >= self._threshold:
            self._open_until = time.monotonic() + self._cooldown_s
        return not was_open and self._open_until is not None

    def abandon(self) -> None:
        """A call ended without an outcome (its caller was cancelled): free the probe slot."""
        self._probing = False


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
            _ERRORS.inc(len(keys))
            return [None] * len(keys)
        return _unpack_counted(blobs, fits)

    async def set_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """One pipeline of SET … PX ttl; failures are logged and counted, never raised."""
        blobs = _pack_items(items)
        if not blobs:
            return
        start = time.perf_counter()
        size = sum(len(blob) for _, blob in blobs)
        written = await self._guarded("set", lambda: self._write(blobs), size)
        CACHE_DURATION.labels("redis", "set").observe(time.perf_counter() - start)
        if written is None:
            _ERRORS.inc(len(blobs))

    async def ping(self) -> bool:
        """True when Redis answers PING within the timeout; bypasses the breaker."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """Close the pool (and any sentinel connections)."""
        for client in (self._client, *self._extra_clients):
            await client.aclose()

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
        """
        if not self._breaker.allow():
            return None
        deadline_s = min(self._timeout_s + size / self._bytes_per_s, _SOCKET_TIMEOUT_S)
        try:
            async with asyncio.timeout(deadline_s):
                result = await call()
        except Exception as exc:
            # asyncio's deadline raises a bare TimeoutError; say what it means.
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


def create_cache(settings: Settings) -> TokenCache:
    """RedisCache when ``redis_url`` is set, else the in-process MemoryCache."""
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            timeout_ms=settings.redis_timeout_ms,
            min_mb_per_s=settings.redis_min_mb_per_s,
            ttl_s=settings.cache_ttl_s,
            breaker_failures=settings.redis_breaker_failures,
            breaker_cooldown_s=settings.redis_breaker_cooldown_s,
        )
    return MemoryCache(settings.cache_max_bytes, settings.cache_ttl_s)
