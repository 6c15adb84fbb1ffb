"""Token cache: the ``TokenCache`` contract and ``create_cache``; keys (keys.py), the stored
value format (format.py), the in-process (memory.py) and Redis (redis.py) backends.

The cache may only make the service faster: every failure (Redis down, slow, answering garbage)
reads as a miss and is counted, never raised to the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from app.cache.counting import Fits
from app.cache.keys import cache_key, canonical_params
from app.cache.memory import MemoryCache
from app.cache.redis import RedisCache
from app.config import Settings

__all__ = [
    "Fits",
    "MemoryCache",
    "RedisCache",
    "TokenCache",
    "cache_key",
    "canonical_params",
    "create_cache",
]


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
