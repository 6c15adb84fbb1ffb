"""The request path below HTTP: cache lookup, single-flight, media work in threads, the batch queue.

``Pipeline.run`` takes every item of one request (raw media bytes to encode, token arrays to
decode) and returns one result per item. Hits never touch the queue; misses are prepared
(decoded, resized, resampled) in the media thread pool, computed once however many identical
requests are in flight, and written back to the cache in one round trip after the response is
on its way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from opentelemetry import trace

from app.batching import RETRY_AFTER_S, Batcher
from app.cache import Fits, TokenCache, cache_key
from app.errors import DeadlineExceeded, Overloaded, ProblemError
from app.metrics import REJECTED, TOKENS
from app.registry import LoadedModel
from app.single_flight import SingleFlight
from app.timing import timed

log = logging.getLogger("tokserve.pipeline")
T = TypeVar("T")


async def in_media_pool(pool: Executor, work: Callable[[], T]) -> T:
    """``work()`` in the media pool. Work the engine's stop cancelled while it waited for a
    thread, or work that comes after the stop, is refused with 503 as the queues refuse it,
    and counted; the caller's own cancellation (its client gone) stays a cancellation."""
    loop = asyncio.get_running_loop()
    try:
        # in the caller's context: what is logged there carries its request id
        return await loop.run_in_executor(pool, contextvars.copy_context().run, work)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
    except RuntimeError as exc:  # the pool's "cannot schedule new futures after shutdown"
        if "shutdown" not in str(exc):
            raise
    REJECTED.labels("shutdown").inc()
    raise Overloaded(
        "tokserve shut down while this request's media waited to be read; retry on another "
        "replica.",
        headers={"Retry-After": RETRY_AFTER_S},
    )


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


@dataclass(frozen=True)
class ItemResult:
    """One item's outcome: its array, or the problem that stopped this item alone."""

    array: np.ndarray | None
    cached: bool = False
    error: ProblemError | None = None


def _before(deadline: float | None, step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``step``, refused with a 504 if the deadline has passed when a pool thread takes it up."""

    def checked(value: Any) -> Any:
        if deadline is not None and time.monotonic() >= deadline:
            REJECTED.labels("deadline").inc()
            raise DeadlineExceeded(
                "The request's deadline passed before its item could be prepared; it was not "
                "computed. Retry, or allow more time with X-Request-Timeout."
            )
        return step(value)

    return checked


class Pipeline:
    """Cache + single-flight + media pool in front of the batchers.

    One request takes at most ``media_share`` of the media pool's threads at a time, so a
    request of many large files cannot hold every thread while other requests wait. Each stage
    is a span of ``tracer``, a child of the caller's.
    """

    def __init__(
        self,
        cache: TokenCache,
        media_pool: Executor,
        media_share: int = 1,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.cache = cache
        self.tracer = tracer or trace.NoOpTracer()
        self.media_pool = media_pool
        self.media_share = max(1, media_share)
        # a request's deadline is its own: those sharing its computation go on without it
        self.flights = SingleFlight(leader_only=(DeadlineExceeded,))
        self._writes: set[asyncio.Task[None]] = set()

    async def run(
        self,
        job: Job,
        items: list[Any],
        key_bytes: list[bytes],
        deadline: float | None,
        fits: Sequence[Fits] | None = None,
    ) -> list[ItemResult]:
        """One result per item, in order; ``key_bytes[i]`` identifies item i in the cache and
        ``fits[i]`` says whether a cached array can answer it. An item that fails with a
        ProblemError gets it in its result; the others are unaffected."""
        model = job.model
        keys = [cache_key(model.name, model.version, job.op, job.params, b) for b in key_bytes]
        hits: list[np.ndarray | None] = (
            await self._lookup(keys, fits) if job.use_cache else [None] * len(keys)
        )
        computed: dict[int, np.ndarray] = {}
        share = asyncio.Semaphore(self.media_share)

        async def compute(index: int) -> np.ndarray:
            prepared = await self._media("media.decode", job.prepare, items[index], share, deadline)
            result = await job.batcher.submit(
                prepared, group=job.group(prepared), deadline=deadline
            )
            array = await self._media("media.encode", job.finish, result, share)
            # tokens produced by a computed encode, or consumed by a computed decode
            tokens = array if job.op == "encode" else prepared
            TOKENS.labels(model.name, job.op).inc(np.size(tokens))
            computed[index] = array
            return array

        async def flight(index: int) -> ItemResult:
            try:
                array = await self.flights.run(keys[index], lambda: compute(index))
            except ProblemError as exc:  # this item's own problem; the others go on
                # without its traceback: its frames hold the item's input, and the frames that
                # shared the exception (single-flight) make a cycle only the collector frees
                return ItemResult(None, error=exc.with_traceback(None))
            return ItemResult(array)

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
            ItemResult(hit, cached=True) if hit is not None else misses[i].result()
            for i, hit in enumerate(hits)
        ]

    async def _lookup(
        self, keys: list[str], fits: Sequence[Fits] | None
    ) -> list[np.ndarray | None]:
        """The cached array of each key that has one that fits, in one call: span cache.lookup."""
        with (
            timed("cache"),
            self.tracer.start_as_current_span(
                "cache.lookup", attributes={"tokserve.items": len(keys)}
            ) as span,
        ):
            hits = await self.cache.get_many(keys, fits)
            span.set_attribute("tokserve.hits", sum(hit is not None for hit in hits))
            return hits

    async def _media(
        self,
        span_name: str,
        step: Callable[[Any], Any],
        value: Any,
        share: asyncio.Semaphore,
        deadline: float | None = None,
    ) -> Any:
        """Run one media step in the pool within the request's share of its threads, refused
        if ``deadline`` has passed when a thread takes it up; the identity runs inline (a
        thread hop costs more) and has no span."""
        if step is unchanged:
            return value
        with timed("media"), self.tracer.start_as_current_span(span_name):
            async with share:
                work = partial(_before(deadline, step), value)
                return await in_media_pool(self.media_pool, work)

    async def _store(self, items: list[tuple[str, np.ndarray]]) -> None:
        with self.tracer.start_as_current_span(
            "cache.store", attributes={"tokserve.items": len(items)}
        ):
            await self.cache.set_many(items)

    def _write_behind(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store results without delaying the response; the task is kept until it ends."""
        task = asyncio.create_task(self._store(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Wait for pending cache writes (shutdown and tests)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
