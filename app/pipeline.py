"""The request path below HTTP: cache lookup, single-flight, media work in threads, the batch queue.

``Pipeline.run`` takes every item of one request (raw media bytes to encode, token arrays to
decode) and returns one result per item. Hits never touch the queue; misses are prepared
(decoded, resized, resampled) in the media thread pool, computed once however many identical
requests are in flight, and written back to the cache in one round trip after the response is
on its way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batching import Batcher
from app.cache import TokenCache, cache_key
from app.errors import DeadlineExceeded, ProblemError
from app.metrics import TOKENS
from app.registry import LoadedModel
from app.single_flight import SingleFlight

log = logging.getLogger("tokserve.pipeline")


@dataclass(frozen=True)
class Job:
    """What one request asks of one model operation."""

    model: LoadedModel
    op: str  # "encode" | "decode"
    batcher: Batcher[Any, Any]
    prepare: Callable[[Any], Any]  # runs in the media pool: request item -> batch item
    group: Callable[[Any], Hashable]
    finish: Callable[[Any], np.ndarray]  # runs in the media pool: batch result -> cached array
    params: str = ""
    use_cache: bool = True


def unchanged(array: np.ndarray) -> np.ndarray:
    """The identity, for a Job step with nothing to do."""
    return array


class _BadItem(Exception):
    """An item's media could not be prepared; ``error`` says why, for whichever request sent it."""

    def __init__(self, error: ProblemError) -> None:
        super().__init__(error.detail)
        self.error = error


@dataclass(frozen=True)
class ItemResult:
    array: np.ndarray
    cached: bool


class Pipeline:
    """Cache + single-flight + media pool in front of the batchers."""

    def __init__(self, cache: TokenCache, media_pool: Executor) -> None:
        self.cache = cache
        self.media_pool = media_pool
        # a request's deadline is its own: those sharing its computation go on without it
        self.flights = SingleFlight(leader_only=(DeadlineExceeded,))
        self._writes: set[asyncio.Task[None]] = set()

    async def run(
        self, job: Job, items: list[Any], key_bytes: list[bytes], deadline: float | None
    ) -> list[ItemResult]:
        """One result per item, in order; ``key_bytes[i]`` identifies item i in the cache."""
        model = job.model
        keys = [cache_key(model.name, model.version, job.op, job.params, b) for b in key_bytes]
        hits: list[np.ndarray | None] = (
            await self.cache.get_many(keys) if job.use_cache else [None] * len(keys)
        )
        computed: dict[int, np.ndarray] = {}

        async def compute(index: int) -> np.ndarray:
            try:
                prepared = await self._media(job.prepare, items[index])
            except ProblemError as exc:
                raise _BadItem(exc) from exc
            result = await job.batcher.submit(
                prepared, group=job.group(prepared), deadline=deadline
            )
            array = await self._media(job.finish, result)
            # tokens produced by a computed encode, or consumed by a computed decode
            tokens = array if job.op == "encode" else prepared
            TOKENS.labels(model.name, job.op).inc(np.size(tokens))
            computed[index] = array
            return array

        async def flight(index: int) -> np.ndarray:
            try:
                return await self.flights.run(keys[index], lambda: compute(index))
            except _BadItem as bad:  # shared by every request with this item: name it per request
                exc = bad.error
                if len(items) == 1:
                    raise exc from None
                detail = f"Item {index}: {exc.detail}"
                raise type(exc)(detail, headers=exc.headers, **exc.extra) from None

        misses = {i: asyncio.ensure_future(flight(i)) for i, hit in enumerate(hits) if hit is None}
        if misses:
            try:
                await asyncio.gather(*misses.values())
            except BaseException:
                for task in misses.values():
                    task.cancel()
                raise
        if job.use_cache and computed:
            self._write_behind([(keys[i], array) for i, array in computed.items()])
        return [
            ItemResult(hit, True) if hit is not None else ItemResult(misses[i].result(), False)
            for i, hit in enumerate(hits)
        ]

    async def _media(self, step: Callable[[Any], Any], value: Any) -> Any:
        """Run one media step in the pool; the identity runs inline (a thread hop costs more)."""
        if step is unchanged:
            return value
        return await asyncio.get_running_loop().run_in_executor(self.media_pool, step, value)

    def _write_behind(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store results without delaying the response; the task is kept until it ends."""
        task = asyncio.create_task(self.cache.set_many(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for pending cache writes (shutdown and tests)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
