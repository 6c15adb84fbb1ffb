"""The in-process cache: a least-recently-used map bounded by bytes, the default without Redis."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from app.cache.counting import Fits, pack_items, unpack_counted
from app.metrics import CACHE_BYTES, CACHE_DURATION


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
        results = unpack_counted(blobs, fits)
        CACHE_DURATION.labels("memory", "get").observe(time.perf_counter() - start)
        return results

    async def set_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store items, evicting least recently used entries past ``max_bytes``."""
        start = time.perf_counter()
        expires_at = time.monotonic() + self._ttl_s if self._ttl_s > 0 else math.inf
        packed = pack_items(items)
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
