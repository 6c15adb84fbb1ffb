"""Batcher: one queue per model × op and one worker thread per model instance; batch assembly,
backpressure, deadlines, balancing between instances.

The queue knows nothing of HTTP and nothing of models: it gathers items, hands lists of them to
an instance's ``run_batch`` callable on that instance's worker thread, and answers each waiter
with its own result.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import trace

from app.errors import DeadlineExceeded, Overloaded, PayloadTooLarge
from app.logs import REQUEST_ID, logging_for
from app.metrics import (
    BATCH_SIZE,
    INFERENCE_DURATION,
    INSTANCE_BATCHES,
    INSTANCE_BUSY,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    REJECTED,
)
from app.timing import Timings, current_timings

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

log = logging.getLogger("tokserve.batching")

RETRY_AFTER_S = "1"


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    """One submitted item: what to compute, who waits for it, when it arrived and must start;
    the request that sent it (its id, its span, its Server-Timing) and its span of waiting in
    the queue."""

    item: T
    group: Hashable
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[R]
    arrived: float  # time.monotonic() seconds
    seq: int
    request_id: str | None
    sender: trace.SpanContext
    timings: Timings | None
    waiting: trace.Span
    expiry: asyncio.TimerHandle | None = None
    failed_on: set[str] = field(default_factory=set)  # instances whose forward of it failed


class _Instance(Generic[T, R]):
    """One model instance: its batch function, its worker thread and the batch it runs."""

    def __init__(
        self, model: str, op: str, name: str, run_batch: Callable[[list[T]], list[R]]
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.running: list[_Entry[T, R]] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{model}-{op}-{name}")
        self.batches = INSTANCE_BATCHES.labels(model, op, name)
        self.busy_s = INSTANCE_BUSY.labels(model, op, name)


class Batcher(Generic[T, R]):
    """Gathers items for one model × op into batches and runs them on its instances' threads.

    An item arriving while a worker is idle starts at once. Items arriving while every worker
    runs a batch gather; when one frees, the next batch takes up to ``max_batch_size`` items of
    the oldest item's group, waiting for more at most until ``max_wait_ms`` after that item
    arrived. A batch that fails with an error ``is_oom`` recognises (out of memory) is retried
    in halves. ``run_batch`` is one callable, or instance name -> callable for several instances
    of the model: whichever is free takes the next batch, and the items of a batch that failed
    on one instance are queued again for an instance that has not failed them yet.
    Each item's wait is a span (queue.wait) of the sender's; each batch's forward pass is a span
    linked to its items' senders, and what the worker logs carries their request ids.
    """

    _loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        model: str,
        op: str,
        run_batch: Callable[[list[T]], list[R]] | Mapping[str, Callable[[list[T]], list[R]]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        is_oom: Callable[[BaseException], bool],
        tracer: trace.Tracer | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"{model} {op}: need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0, "
                f"got {max_batch_size}, {max_queue} and {max_wait_ms}"
            )
        self.model = model
        self.op = op
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        run_batches = run_batch if isinstance(run_batch, Mapping) else {"0": run_batch}
        if not run_batches:
            raise ValueError(f"{model} {op}: need at least one instance")
        self._run_batches = dict(run_batches)
        self._instances: list[_Instance[T, R]] = []
        self._free: list[_Instance[T, R]] = []
        self._is_oom = is_oom
        self._tracer = tracer or trace.NoOpTracer()
        self._span_attributes = {"tokserve.model": model, "tokserve.op": op}
        # group -> its waiting entries in arrival order; a group is deleted when it empties
        self._groups: dict[Hashable, OrderedDict[_Entry[T, R], None]] = {}
        self._depth = 0
        self._seq = itertools.count()
        self._idle_since = 0.0
        self._closing = False
        self._arrived = asyncio.Event()
        self._freed = asyncio.Event()  # set when an instance frees
        self._dispatcher: asyncio.Task[None] | None = None
        self._queue_wait = QUEUE_WAIT.labels(model, op)
        self._batch_size = BATCH_SIZE.labels(model, op)
        self._inference = INFERENCE_DURATION.labels(model, op)
        self._queue_depth = QUEUE_DEPTH.labels(model, op)

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch running)."""
        return self._depth

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return self._depth == 0 and len(self._free) == len(self._instances)

    @property
    def instances(self) -> list[str]:
        """The names of the model instances that run this queue's batches."""
        return list(self._run_batches)

    async def start(self) -> None:
        """Create each instance's worker thread and the dispatch task on the running loop."""
        if self._dispatcher is not None:
            raise RuntimeError(f"the {self.model} {self.op} batcher is already started")
        self._loop = asyncio.get_running_loop()
        self._instances = [
            _Instance(self.model, self.op, name, run_batch)
            for name, run_batch in self._run_batches.items()
        ]
        # Start the worker threads now, from the caller's thread, so they inherit the caller's
        # scheduling priority rather than that of whichever thread submits the first batch.
        for instance in self._instances:
            await asyncio.wrap_future(instance.executor.submit(threading.get_native_id))
        self._free = list(self._instances)
        self._idle_since = time.monotonic()
        self._dispatcher = asyncio.create_task(
            self._dispatch(), name=f"batcher-{self.model}-{self.op}"
        )

    async def submit(self, item: T, *, group: Hashable = None, deadline: float | None = None) -> R:
        """Compute one item in a batch of items with an equal ``group``; deadline in monotonic s."""
        (result,) = await self.submit_many([item], groups=[group], deadline=deadline)
        return result

    async def submit_many(
        self,
        items: list[T],
        *,
        groups: list[Hashable] | None = None,
        deadline: float | None = None,
    ) -> list[R]:
        """Compute items batched with everyone else's: results in order, or the first error."""
        if groups is None:
            groups = [None] * len(items)
        elif len(groups) != len(items):
            raise ValueError(f"{len(items)} items but {len(groups)} groups")
        if not items:
            return []
        entries = self._admit(items, groups, deadline)
        futures = [entry.future for entry in entries]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # the waiter was cancelled (client gone) or one item failed: nobody wants the rest
            self._abandon(entries)
        errors = [future.exception() for future in futures if not future.cancelled()]
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, drain for up to ``drain_timeout_s``, then fail what is left (503)."""
        if self._closing:
            return
        self._closing = True
        if self._dispatcher is None:
            return
        self._arrived.set()
        done, _ = await asyncio.wait([self._dispatcher], timeout=drain_timeout_s)
        if not done:
            self._dispatcher.cancel()
            await asyncio.wait([self._dispatcher])
            self._fail_unfinished()
        for instance in self._instances:
            instance.executor.shutdown(wait=False, cancel_futures=True)

    async def run_on_each(self, work: Callable[[Callable[[list[T]], list[R]]], V]) -> list[V]:
        """``work(run_batch)`` on every instance's own worker thread, one after the other, and
        what each returned (the warm-up: a thread's first forward sets up its thread pools)."""
        return [
            await asyncio.wrap_future(instance.executor.submit(work, instance.run_batch))
            for instance in self._instances
        ]

    def _overloaded(self, detail: str) -> Overloaded:
        return Overloaded(detail, headers={"Retry-After": RETRY_AFTER_S})

    def _admit(
        self, items: list[T], groups: list[Hashable], deadline: float | None
    ) -> list[_Entry[T, R]]:
        """Queue every item of one request, or none of them."""
        if self._dispatcher is None:
            raise RuntimeError(f"the {self.model} {self.op} batcher was not started")
        count = len(items)
        if self._closing:
            REJECTED.labels("shutdown").inc(count)
            raise self._overloaded(f"{self.model} is shutting down; retry on another replica.")
        if count > self.max_queue:
            raise PayloadTooLarge(
                f"{self.model} takes at most {self.max_queue} items per request; "
                f"this one has {count}."
            )
        if self._depth + count > self.max_queue:
            REJECTED.labels("queue_full").inc(count)
            raise self._overloaded(
                f"{self.model} {self.op} queue is full ({self._depth} of {self.max_queue} "
                "items waiting); retry shortly."
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            REJECTED.labels("deadline").inc(count)
            raise DeadlineExceeded(f"The request's deadline passed before {self.model} got it.")
        request_id = REQUEST_ID.get()
        sender = trace.get_current_span().get_span_context()
        timings = current_timings()
        entries = [
            _Entry(
                item,
                group,
                deadline,
                self._loop.create_future(),
                now,
                next(self._seq),
                request_id,
                sender,
                timings,
                self._queue_span(),
            )
            for item, group in zip(items, groups, strict=True)
        ]
        for entry in entries:
            self._enqueue(entry, now)
        self._arrived.set()
        return entries

    def _enqueue(self, entry: _Entry[T, R], now: float, first: bool = False) -> None:
        waiting = self._groups.setdefault(entry.group, OrderedDict())
        waiting[entry] = None
        if first:
            waiting.move_to_end(entry, last=False)
        self._depth += 1
        self._queue_depth.inc()
        if entry.deadline is not None:
            entry.expiry = self._loop.call_later(entry.deadline - now, self._expire, entry)

    def _queue_span(self) -> trace.Span:
        """A new span of an item's waiting in the queue."""
        return self._tracer.start_span("queue.wait", attributes=self._span_attributes)

    def _remove(self, entry: _Entry[T, R]) -> bool:
        """Take ``entry`` out of the queue; False if it was not waiting there."""
        waiting = self._groups.get(entry.group)
        if waiting is None or entry not in waiting:
            return False
        del waiting[entry]
        if not waiting:
            del self._groups[entry.group]
        self._depth -= 1
        self._queue_depth.dec()
        entry.waiting.end()
        if entry.expiry is not None:
            entry.expiry.cancel()
        return True

    def _expire(self, entry: _Entry[T, R]) -> None:
        """Answer 504 for an item whose deadline passed while it waited; it is never computed."""
        if self._remove(entry):
            REJECTED.labels("deadline").inc()
            entry.future.set_exception(
                DeadlineExceeded(
                    f"The request waited past its deadline for {self.model}; it was not computed."
                )
            )

    def _abandon(self, entries: list[_Entry[T, R]]) -> None:
        """Drop the entries nobody waits for any more; a running one finishes unheard."""
        for entry in entries:
            if entry.future.done():
                continue
            entry.future.cancel()
            if self._remove(entry):
                REJECTED.labels("cancelled").inc()

    async def _dispatch(self) -> None:
        """Event-loop task: whenever an instance is free, start the next batch on it."""
        while True:
            head = await self._next_head()
            instance = self._free_for(head) if head is not None else None
            if instance is None:
                if head is None and len(self._free) == len(self._instances):
                    return  # stopped, drained, and no batch running that could fail back
                # every instance is busy, or the head failed on each free one, or batches still
                # run while stopping
                self._freed.clear()
                await self._freed.wait()
                continue
            assert head is not None
            batch = self._take(head.group)
            if batch:
                self._launch(batch, instance)

    def _free_for(self, head: _Entry[T, R]) -> _Instance[T, R] | None:
        """The first free instance that has not failed ``head`` already."""
        return next((i for i in self._free if i.name not in head.failed_on), None)

    async def _next_head(self) -> _Entry[T, R] | None:
        """The oldest waiting entry once its batch should start; None when stopped and drained."""
        while True:
            if not self._groups:
                if self._closing:
                    return None
                await self._wait_for_arrival(None)
                continue
            head = min(
                (next(iter(waiting)) for waiting in self._groups.values()),
                key=lambda entry: entry.seq,
            )
            gather_until = head.arrived + self.max_wait_s
            if (
                self._closing
                or head.arrived >= self._idle_since  # it came to an idle worker: no added wait
                or len(self._groups[head.group]) >= self.max_batch_size
                or time.monotonic() >= gather_until
            ):
                return head
            await self._wait_for_arrival(gather_until - time.monotonic())

    async def _wait_for_arrival(self, timeout_s: float | None) -> None:
        self._arrived.clear()
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()

    def _take(self, group: Hashable) -> list[_Entry[T, R]]:
        """Pop up to max_batch_size live entries of ``group`` in arrival order."""
        waiting = self._groups[group]
        batch: list[_Entry[T, R]] = []
        now = time.monotonic()
        while waiting and len(batch) < self.max_batch_size:
            entry = next(iter(waiting))
            if entry.deadline is not None and entry.deadline <= now:
                self._expire(entry)
                continue
            self._remove(entry)
            batch.append(entry)
        return batch

    def _launch(self, batch: list[_Entry[T, R]], instance: _Instance[T, R]) -> None:
        started = time.monotonic()
        for entry in batch:
            if not entry.failed_on:  # a retried item's wait was observed when it first started
                self._queue_wait.observe(started - entry.arrived)
                if entry.timings is not None:
                    entry.timings.add("queue", started - entry.arrived)
        self._batch_size.observe(len(batch))
        instance.batches.inc()
        instance.running = batch
        self._free.remove(instance)
        instance.executor.submit(self._work, batch, instance)

    def _work(self, batch: list[_Entry[T, R]], instance: _Instance[T, R]) -> None:
        """Worker thread: run one batch and hand its outcome back to the event loop."""
        outcome: list[R] | Exception
        started = time.perf_counter()
        request_ids = sorted({entry.request_id for entry in batch if entry.request_id})
        forward = self._tracer.start_as_current_span(
            "forward",
            links=[trace.Link(entry.sender) for entry in batch if entry.sender.is_valid],
            attributes={
                **self._span_attributes,
                "tokserve.batch_size": len(batch),
                "tokserve.request_ids": request_ids,
                "tokserve.instance": instance.name,
            },
        )
        with logging_for(request_ids), forward as span:
            try:
                outcome = self._forward([entry.item for entry in batch], instance.run_batch)
            except Exception as exc:
                log.exception(
                    "%s %s: the forward pass over a batch of %d failed on instance %s",
                    self.model,
                    self.op,
                    len(batch),
                    instance.name,
                )
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                outcome = exc
        busy_s = time.perf_counter() - started
        self._inference.observe(busy_s)
        instance.busy_s.inc(busy_s)
        # the loop is closed only after a stop() that timed out and already answered everyone
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._complete, batch, outcome, instance, busy_s)

    def _forward(self, items: list[T], run_batch: Callable[[list[T]], list[R]]) -> list[R]:
        """Worker thread: run_batch, split in halves (recursively) when it runs out of memory."""
        try:
            results = run_batch(items)
        except Exception as exc:
            if len(items) < 2 or not self._is_oom(exc):
                raise
            log.warning(
                "%s %s: out of memory on a batch of %d, retrying it in halves",
                self.model,
                self.op,
                len(items),
            )
        else:
            if len(results) != len(items):
                raise ValueError(f"run_batch returned {len(results)} results for {len(items)}")
            return results
        # retried outside the except block so the failed attempt's frames and tensors are freed
        half = len(items) // 2
        return self._forward(items[:half], run_batch) + self._forward(items[half:], run_batch)

    def _complete(
        self,
        batch: list[_Entry[T, R]],
        outcome: list[R] | Exception,
        instance: _Instance[T, R],
        busy_s: float,
    ) -> None:
        """Event loop: answer the batch's waiters (those still waiting) and free the instance;
        the items of a failed batch go back to the queue's head while an instance is left that
        has not failed them. Each item's request counts the forward in its Server-Timing."""
        instance.running = []
        for entry in batch:
            if entry.timings is not None:
                entry.timings.add("forward", busy_s)
        if isinstance(outcome, Exception):
            waiting = [entry for entry in batch if not entry.future.done()]
            for entry in waiting:
                entry.failed_on.add(instance.name)
            retried = [e for e in waiting if len(e.failed_on) < len(self._instances)]
            now = time.monotonic()
            for entry in reversed(retried):
                entry.waiting = self._queue_span()  # its first wait ended when it started
                self._enqueue(entry, now, first=True)
            if retried:
                self._arrived.set()
            REJECTED.labels("error").inc(len(batch) - len(retried))
            for entry in batch:
                if entry not in retried and not entry.future.done():
                    error = self._overloaded(
                        f"The {self.model} {self.op} forward pass failed; retry shortly."
                    )
                    error.__cause__ = outcome
                    entry.future.set_exception(error)
        else:
            for entry, result in zip(batch, outcome, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        self._idle_since = time.monotonic()
        self._free.append(instance)
        self._freed.set()

    def _fail_unfinished(self) -> None:
        """After the drain timeout: answer everything queued or running with Overloaded."""
        queued = [entry for waiting in self._groups.values() for entry in waiting]
        for entry in queued:
            self._remove(entry)
        running = [entry for instance in self._instances for entry in instance.running]
        unanswered = [entry for entry in queued + running if not entry.future.done()]
        REJECTED.labels("shutdown").inc(len(unanswered))
        for entry in unanswered:
            entry.future.set_exception(
                self._overloaded(f"{self.model} shut down before this item's result was ready.")
            )
