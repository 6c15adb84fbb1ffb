"""The Batcher: adaptive batching, grouping, backpressure, deadlines, failures, drain, metrics."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from app.batching import Batcher
from app.errors import DeadlineExceeded, Overloaded, PayloadTooLarge
from app.logs import REQUEST_ID
from app.runner import is_out_of_memory

DIM = 8

MakeBatcher = Callable[..., Awaitable[Batcher[torch.Tensor, torch.Tensor]]]
RunBatch = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def item(ident: int, length: int = DIM) -> torch.Tensor:
    """An input vector whose first element is ``ident``; a negative ident poisons its batch."""
    return torch.arange(length, dtype=torch.float32) + ident


class MatmulModel:
    """A real batched forward: items [L] stacked to [B, L] times the first L rows of W [DIM, DIM].

    It records what it ran, and ``release`` can hold a forward so that arrivals pile up behind it.
    """

    def __init__(self, *, oom_above: int | None = None) -> None:
        self.weight = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0))
        self.oom_above = oom_above
        self.attempts: list[int] = []  # size of every run_batch call, failed ones included
        self.batches: list[list[int]] = []  # idents of every batch that was computed
        self.threads: set[str] = set()
        self.started: queue.Queue[int] = queue.Queue()
        self.release = threading.Event()
        self.release.set()

    def expected(self, vector: torch.Tensor) -> torch.Tensor:
        """What the forward answers for one item on its own."""
        return vector @ self.weight[: vector.shape[0]]

    def __call__(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        self.threads.add(threading.current_thread().name)
        self.attempts.append(len(items))
        self.started.put(len(items))
        self.release.wait(timeout=5)
        if self.oom_above is not None and len(items) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(vector[0] < 0 for vector in items):
            raise ValueError("negative input")
        stacked = torch.stack(items)  # raises if shapes of different groups were mixed
        tokens = stacked @ self.weight[: stacked.shape[1]]
        self.batches.append([int(vector[0]) for vector in items])
        return list(tokens)

    @property
    def batch_sizes(self) -> list[int]:
        """Size of every computed batch, in order."""
        return [len(batch) for batch in self.batches]

    def computed(self) -> set[int]:
        """Idents of every item that went through a successful forward."""
        return {ident for batch in self.batches for ident in batch}

    async def wait_started(self) -> None:
        """Until the worker thread has entered a forward."""
        await asyncio.to_thread(self.started.get, True, 2.0)


def unstarted(
    model: str, run_batch: RunBatch, **settings: Any
) -> Batcher[torch.Tensor, torch.Tensor]:
    """A batcher for ``model``'s encode op with the tests' default settings, not yet started."""
    options = {
        "max_batch_size": 8,
        "max_wait_ms": 5.0,
        "max_queue": 64,
        "is_oom": is_out_of_memory,
        **settings,
    }
    return Batcher[torch.Tensor, torch.Tensor](model, "encode", run_batch, **options)


def assert_each_answered(
    model: MatmulModel, vectors: list[torch.Tensor], results: list[torch.Tensor]
) -> None:
    """Each result is what the forward answers for its own vector on its own."""
    for vector, tokens in zip(vectors, results, strict=True):
        assert torch.allclose(tokens, model.expected(vector))


@pytest.fixture
async def make_batcher(request: pytest.FixtureRequest) -> AsyncIterator[MakeBatcher]:
    """Started batchers named after the test, so metric labels are its own; stopped after."""
    started: list[Batcher[torch.Tensor, torch.Tensor]] = []

    async def make(run_batch: RunBatch, **settings: Any) -> Batcher[torch.Tensor, torch.Tensor]:
        batcher = unstarted(request.node.name, run_batch, **settings)
        await batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        await batcher.stop(drain_timeout_s=2.0)


async def hold_worker(
    model: MatmulModel, batcher: Batcher[torch.Tensor, torch.Tensor]
) -> asyncio.Task[torch.Tensor]:
    """Start a forward of item 0 that runs until ``model.release`` is set."""
    model.release.clear()
    blocker = asyncio.create_task(batcher.submit(item(0)))
    await model.wait_started()
    return blocker


def queue_many(
    batcher: Batcher[torch.Tensor, torch.Tensor], idents: list[int], **kwargs: Any
) -> list[asyncio.Task[torch.Tensor]]:
    """One waiting submit task per ident; they enqueue at the next loop iteration."""
    return [asyncio.create_task(batcher.submit(item(i), **kwargs)) for i in idents]


def sample(name: str, **labels: str) -> float:
    """A metric sample's current value, 0 before its labels were first used."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("max_batch_size", "max_queue", "max_wait_ms"),
    [(0, 64, 5.0), (8, 0, 5.0), (8, 64, -1.0)],
    ids=["max_batch_size", "max_queue", "max_wait_ms"],
)
def test_a_setting_below_its_bound_is_refused_naming_every_bound(
    max_batch_size: int, max_queue: int, max_wait_ms: float
) -> None:
    with pytest.raises(ValueError) as refused:
        unstarted(
            "m",
            MatmulModel(),
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_wait_ms=max_wait_ms,
        )
    assert str(refused.value) == (
        "m encode: need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0, "
        f"got {max_batch_size}, {max_queue} and {max_wait_ms}"
    )


async def test_settings_at_their_bounds_are_accepted(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=1, max_queue=1, max_wait_ms=0)
    assert torch.allclose(await batcher.submit(item(1)), model.expected(item(1)))


async def test_starting_a_batcher_twice_is_refused(make_batcher: MakeBatcher) -> None:
    batcher = await make_batcher(MatmulModel())
    with pytest.raises(RuntimeError) as refused:
        await batcher.start()
    assert str(refused.value) == f"the {batcher.model} encode batcher is already started"


async def test_submit_to_a_batcher_never_started_is_refused() -> None:
    model = MatmulModel()
    with pytest.raises(RuntimeError) as refused:
        await unstarted("unstarted", model).submit(item(1))
    assert str(refused.value) == "the unstarted encode batcher was not started"
    assert model.attempts == []


async def test_dispatch_task_is_named_after_the_model_and_op(make_batcher: MakeBatcher) -> None:
    batcher = await make_batcher(MatmulModel())
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert f"batcher-{batcher.model}-encode" in names


async def test_idle_worker_dispatches_a_single_item_at_once(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_wait_ms=500)
    started = time.monotonic()
    tokens = await batcher.submit(item(1))
    # gathering company would take the whole 500 ms; a loaded 2-core machine answers in < 50 ms
    assert time.monotonic() - started < 0.25
    assert torch.allclose(tokens, model.expected(item(1)))
    assert model.batches == [[1]]


async def test_every_batch_runs_on_the_one_worker_thread_started_with_the_batcher(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=1)
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, list(range(1, 21)))  # each batch launched as the last ends
    await asyncio.sleep(0)
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert len(model.batches) == 21
    assert model.threads == {f"{batcher.model}-encode-0_0"}


async def test_items_arriving_during_a_forward_are_gathered_into_one_batch(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2, 3, 4, 5])
    await asyncio.sleep(0)
    assert batcher.depth == 5
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


async def test_batches_never_exceed_max_batch_size(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=4)
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, list(range(1, 11)))
    await asyncio.sleep(0)
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert model.batch_sizes == [1, 4, 4, 2]
    assert model.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


async def test_next_batch_waits_for_more_items_at_most_max_wait_ms_after_the_oldest(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_wait_ms=100)
    blocker = await hold_worker(model, batcher)
    arrived = time.monotonic()
    first = asyncio.create_task(batcher.submit(item(1)))
    await asyncio.sleep(0)
    model.release.set()
    await blocker
    await asyncio.sleep(0.03)
    second = asyncio.create_task(batcher.submit(item(2)))
    await first
    waited = time.monotonic() - arrived
    await second
    assert model.batches == [[0], [1, 2]]
    assert 0.09 <= waited < 0.16


async def test_items_of_different_groups_never_share_a_batch(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    lengths = [4, 8, 4, 8, 4, 8]
    vectors = [item(i, length) for i, length in enumerate(lengths, start=1)]
    waiting = [
        asyncio.create_task(batcher.submit(vector, group=vector.shape[0])) for vector in vectors
    ]
    await asyncio.sleep(0)
    model.release.set()
    await blocker
    results = await asyncio.gather(*waiting)
    assert model.batches[1:] == [[1, 3, 5], [2, 4, 6]]
    assert_each_answered(model, vectors, results)


async def test_each_caller_gets_the_result_of_its_own_item(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=4)
    vectors = [item(i) for i in range(40)]
    results = await asyncio.gather(*(batcher.submit(vector) for vector in vectors))
    assert_each_answered(model, vectors, results)
    assert max(model.batch_sizes) == 4


async def test_full_queue_answers_overloaded_with_retry_after_at_once(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_queue=2)
    rejected = sample("tokserve_rejected_total", reason="queue_full")
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2])
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(item(3))
    assert not blocker.done()  # refused at once: the worker is still held, nothing was taken
    assert refused.value.status == 503
    assert refused.value.detail == (
        f"{batcher.model} encode queue is full (2 of 2 items waiting); retry shortly."
    )
    assert refused.value.headers == {"Retry-After": "1"}
    assert sample("tokserve_rejected_total", reason="queue_full") == rejected + 1
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert model.computed() == {0, 1, 2}


async def test_item_whose_deadline_passes_while_queued_answers_504_and_is_never_computed(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    rejected = sample("tokserve_rejected_total", reason="deadline")
    blocker = await hold_worker(model, batcher)
    late = asyncio.create_task(batcher.submit(item(1), deadline=time.monotonic() + 0.05))
    with pytest.raises(DeadlineExceeded) as expired:
        await late
    assert not batcher.idle, "answered once the worker was free, not at its deadline"
    assert expired.value.detail == (
        f"The request waited past its deadline for {batcher.model}; it was not computed."
    )
    assert batcher.depth == 0
    model.release.set()
    await blocker
    assert model.computed() == {0}
    assert sample("tokserve_rejected_total", reason="deadline") == rejected + 1


async def test_item_submitted_past_its_deadline_is_refused_without_queueing(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    rejected = sample("tokserve_rejected_total", reason="deadline")
    with pytest.raises(DeadlineExceeded) as refused:
        await batcher.submit_many([item(1), item(2)], deadline=time.monotonic() - 1)
    assert refused.value.detail == f"The request's deadline passed before {batcher.model} got it."
    assert sample("tokserve_rejected_total", reason="deadline") == rejected + 2
    assert model.attempts == []
    assert batcher.depth == 0


async def test_item_past_its_deadline_when_its_batch_is_taken_is_left_out_of_the_batch(
    make_batcher: MakeBatcher,
) -> None:
    """The event loop is blocked past item 1's deadline while the dispatcher is due to take its
    batch: the batch is taken before the deadline's timer runs, and must leave item 1 out."""
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=3, max_wait_ms=5000)
    blocker = await hold_worker(model, batcher)
    deadline = time.monotonic() + 0.5
    late = asyncio.create_task(batcher.submit(item(1), deadline=deadline))
    company = queue_many(batcher, [2])
    await asyncio.sleep(0)
    model.release.set()
    await blocker  # the worker is free; items 1 and 2 gather for a third
    company += queue_many(batcher, [3])
    await asyncio.sleep(0)  # item 3 fills the batch and wakes the dispatcher
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
    with pytest.raises(DeadlineExceeded):
        await late
    assert batcher.depth == 0, "items 2 and 3 were not taken at once"
    await asyncio.gather(*company)
    assert model.batches == [[0], [2, 3]]


async def test_cancelled_waiters_item_is_dropped_and_never_computed(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    rejected = sample("tokserve_rejected_total", reason="cancelled")
    blocker = await hold_worker(model, batcher)
    (gone,) = queue_many(batcher, [1])
    await asyncio.sleep(0)
    assert batcher.depth == 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.depth == 0
    model.release.set()
    await blocker
    await batcher.submit(item(2))
    assert model.batches == [[0], [2]]
    assert sample("tokserve_rejected_total", reason="cancelled") == rejected + 1


async def test_cancelling_a_waiter_whose_item_is_running_lets_the_forward_finish_unheard(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    rejected = sample("tokserve_rejected_total", reason="cancelled")
    blocker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocker
    assert sample("tokserve_rejected_total", reason="cancelled") == rejected
    model.release.set()
    assert torch.allclose(await batcher.submit(item(1)), model.expected(item(1)))
    assert model.batches == [[0], [1]]


async def test_failing_forward_fails_only_its_batch_and_the_next_batch_succeeds(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    doomed = queue_many(batcher, [-1, 1], group="a")
    spared = queue_many(batcher, [2], group="b")
    await asyncio.sleep(0)
    model.release.set()
    await blocker
    for task in doomed:
        with pytest.raises(Overloaded):
            await task
    assert torch.allclose(await spared[0], model.expected(item(2)))
    assert torch.allclose(await batcher.submit(item(3)), model.expected(item(3)))
    assert model.attempts == [1, 2, 1, 1]


async def test_failed_forward_answers_503_caused_by_the_models_error_for_every_item(
    make_batcher: MakeBatcher,
) -> None:
    batcher = await make_batcher(MatmulModel())
    rejected = sample("tokserve_rejected_total", reason="error")
    with pytest.raises(Overloaded) as failed:
        await batcher.submit_many([item(-1), item(1)])
    assert failed.value.detail == f"The {batcher.model} encode forward pass failed; retry shortly."
    assert failed.value.headers == {"Retry-After": "1"}
    assert isinstance(failed.value.__cause__, ValueError)
    assert str(failed.value.__cause__) == "negative input"
    assert sample("tokserve_rejected_total", reason="error") == rejected + 2


async def test_failed_forward_is_logged_with_its_traceback_model_op_and_batch_size(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = await make_batcher(MatmulModel())
    with pytest.raises(Overloaded), caplog.at_level(logging.ERROR, logger="tokserve.batching"):
        await batcher.submit_many([item(-1), item(1)])
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{batcher.model} encode: the forward pass over a batch of 2 failed on instance 0"
    )
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "negative input"


async def test_run_batch_answering_too_few_results_fails_the_batch_naming_both_counts(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(lambda items: model(items)[:-1])
    with pytest.raises(Overloaded) as failed:
        await batcher.submit_many([item(1), item(2)])
    assert isinstance(failed.value.__cause__, ValueError)
    assert str(failed.value.__cause__) == "run_batch returned 1 results for 2"


async def test_out_of_memory_batch_is_retried_in_halves_with_correct_results(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel(oom_above=2)
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    vectors = [item(i) for i in range(1, 9)]
    waiting = [asyncio.create_task(batcher.submit(vector)) for vector in vectors]
    await asyncio.sleep(0)
    model.release.set()
    await blocker
    results = await asyncio.gather(*waiting)
    assert model.attempts == [1, 8, 4, 2, 2, 4, 2, 2]
    assert model.batches[1:] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert_each_answered(model, vectors, results)


async def test_out_of_memory_on_a_batch_of_two_retries_each_item_alone(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel(oom_above=1)
    batcher = await make_batcher(model)
    vectors = [item(1), item(2)]
    results = await batcher.submit_many(vectors)
    assert model.attempts == [2, 1, 1]
    assert model.batches == [[1], [2]]
    assert_each_answered(model, vectors, results)


async def test_out_of_memory_retry_is_logged_as_a_warning_with_model_op_and_batch_size(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = await make_batcher(MatmulModel(oom_above=2))
    with caplog.at_level(logging.WARNING, logger="tokserve.batching"):
        await batcher.submit_many([item(i) for i in range(1, 5)])
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", f"{batcher.model} encode: out of memory on a batch of 4, retrying it in halves")
    ]


async def test_out_of_memory_on_a_single_item_answers_overloaded(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel(oom_above=0)
    batcher = await make_batcher(model)
    with pytest.raises(Overloaded):
        await batcher.submit(item(1))
    assert model.attempts == [1]


async def test_submit_many_batches_with_others_and_returns_results_in_request_order(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    vectors = [item(1, 4), item(2, 8), item(3, 4), item(4, 8)]
    request = asyncio.create_task(batcher.submit_many(vectors, groups=[4, 8, 4, 8]))
    (other,) = queue_many(batcher, [5], group=8)
    await asyncio.sleep(0)
    model.release.set()
    await asyncio.gather(blocker, other)
    results = await request
    assert model.batches[1:] == [[1, 3], [2, 4, 5]]
    assert_each_answered(model, vectors, results)


async def test_submit_many_without_groups_batches_all_its_items_together(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    vectors = [item(1), item(2), item(3)]
    assert_each_answered(model, vectors, await batcher.submit_many(vectors))
    assert model.batches == [[1, 2, 3]]


async def test_submit_many_with_a_group_count_unlike_its_item_count_is_refused(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    with pytest.raises(ValueError) as refused:
        await batcher.submit_many([item(1), item(2), item(3)], groups=["a", "b"])
    assert str(refused.value) == "3 items but 2 groups"
    assert batcher.depth == 0
    assert model.attempts == []


async def test_submit_many_fails_as_a_whole_and_drops_its_queued_siblings(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=2, max_wait_ms=1000)
    blocker = await hold_worker(model, batcher)
    request = asyncio.create_task(
        batcher.submit_many([item(-1), item(-2), item(7)], groups=["a", "a", "b"])
    )
    await asyncio.sleep(0)
    started = time.monotonic()
    model.release.set()
    with pytest.raises(Overloaded):
        await request
    assert time.monotonic() - started < 0.5  # item 7 would have waited 1 s for company
    await blocker
    assert batcher.depth == 0
    assert model.attempts == [1, 2]
    assert 7 not in model.computed()


async def test_request_of_exactly_max_queue_items_is_admitted(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_queue=2)
    vectors = [item(1), item(2)]
    results = await batcher.submit_many(vectors)
    assert_each_answered(model, vectors, results)


async def test_submit_many_with_more_items_than_the_queue_holds_is_refused_as_too_large(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_queue=2)
    with pytest.raises(PayloadTooLarge) as refused:
        await batcher.submit_many([item(1), item(2), item(3)])
    assert refused.value.status == 413
    assert refused.value.detail == (
        f"{batcher.model} takes at most 2 items per request; this one has 3."
    )
    assert model.attempts == []


async def test_stop_drains_queued_work_then_refuses_new_submits(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2, 3])
    await asyncio.sleep(0)
    stopping = asyncio.create_task(batcher.stop(drain_timeout_s=2.0))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="shutting down"):
        await batcher.submit(item(4))
    model.release.set()
    await stopping
    results = await asyncio.gather(*waiting)
    assert batcher.idle
    assert model.batches == [[0], [1, 2, 3]]
    for ident, tokens in zip([1, 2, 3], results, strict=True):
        assert torch.allclose(tokens, model.expected(item(ident)))
    await blocker


async def test_stop_fails_what_is_left_after_the_drain_timeout(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    rejected = sample("tokserve_rejected_total", reason="shutdown")
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2])
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=0.05)
    for task in [blocker, *waiting]:
        with pytest.raises(Overloaded, match="shut down"):
            await task
    assert batcher.depth == 0
    assert sample("tokserve_rejected_total", reason="shutdown") == rejected + 3
    model.release.set()
    assert model.attempts == [1]


async def test_stop_returns_after_the_drain_timeout_while_the_forward_still_runs(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    await batcher.stop(drain_timeout_s=0.05)
    assert model.batches == [], "stop() waited for the held forward to end"
    model.release.set()
    with pytest.raises(Overloaded):
        await blocker


async def test_submit_after_stop_answers_503_and_counts_every_item_as_shutdown(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    await batcher.stop()
    rejected = sample("tokserve_rejected_total", reason="shutdown")
    with pytest.raises(Overloaded) as refused:
        await batcher.submit_many([item(1), item(2)])
    assert refused.value.detail == f"{batcher.model} is shutting down; retry on another replica."
    assert refused.value.headers == {"Retry-After": "1"}
    assert sample("tokserve_rejected_total", reason="shutdown") == rejected + 2
    assert model.attempts == []


async def test_one_batch_moves_queue_and_batch_metrics_exactly(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    labels = {"model": batcher.model, "op": "encode"}
    before = {
        name: sample(name, **labels)
        for name in (
            "tokserve_batch_size_count",
            "tokserve_batch_size_sum",
            "tokserve_queue_wait_seconds_count",
            "tokserve_inference_duration_seconds_count",
        )
    }
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2, 3])
    await asyncio.sleep(0)
    assert sample("tokserve_queue_depth", **labels) == 3
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert sample("tokserve_queue_depth", **labels) == 0
    assert sample("tokserve_batch_size_count", **labels) == before["tokserve_batch_size_count"] + 2
    assert sample("tokserve_batch_size_sum", **labels) == before["tokserve_batch_size_sum"] + 4
    queue_waits = sample("tokserve_queue_wait_seconds_count", **labels)
    assert queue_waits == before["tokserve_queue_wait_seconds_count"] + 4
    forwards = sample("tokserve_inference_duration_seconds_count", **labels)
    assert forwards == before["tokserve_inference_duration_seconds_count"] + 2


async def test_queue_wait_and_inference_histograms_observe_the_measured_durations(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    labels = {"model": batcher.model, "op": "encode"}
    waits_before = sample("tokserve_queue_wait_seconds_sum", **labels)
    forwards_before = sample("tokserve_inference_duration_seconds_sum", **labels)
    started = time.monotonic()
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2, 3])
    await asyncio.sleep(0)
    await asyncio.sleep(0.06)  # items 1-3 queue, and item 0's forward runs, at least this long
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    elapsed = time.monotonic() - started
    waits = sample("tokserve_queue_wait_seconds_sum", **labels) - waits_before
    forwards = sample("tokserve_inference_duration_seconds_sum", **labels) - forwards_before
    assert 3 * 0.05 <= waits <= 4 * elapsed
    assert 0.05 <= forwards <= 2 * elapsed


class Spans:
    """A real SDK tracer whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]


async def send_as(
    spans: Spans, batcher: Batcher[torch.Tensor, torch.Tensor], request_id: str, ident: int
) -> tuple[int, int] | None:
    """Submit item ``ident`` as a request would: its id set, inside its span; that span's
    (trace id, span id) (raises what the submit raises)."""
    REQUEST_ID.set(request_id)  # in this task's own copy of the context
    with spans.tracer.start_as_current_span(f"request {request_id}") as span:
        await batcher.submit(item(ident))
    return ids(span.get_span_context())


def ids(context: trace.SpanContext | None) -> tuple[int, int] | None:
    """A span context as (trace id, span id), comparable and hashable."""
    return None if context is None else (context.trace_id, context.span_id)


async def two_requests_in_one_batch(
    spans: Spans, make_batcher: MakeBatcher, first: int, second: int
) -> list[asyncio.Task[tuple[int, int] | None]]:
    """Requests "a" (item ``first``) and "b" (item ``second``) queued behind a held forward,
    then released into one batch; their tasks, done."""
    model = MatmulModel()
    batcher = await make_batcher(model, tracer=spans.tracer)
    blocker = await hold_worker(model, batcher)
    senders = [
        asyncio.create_task(send_as(spans, batcher, "b", second)),
        asyncio.create_task(send_as(spans, batcher, "a", first)),
    ]
    while batcher.depth < 2:
        await asyncio.sleep(0.001)
    model.release.set()
    await blocker
    await asyncio.wait(senders)
    assert model.attempts[1:] == [2]
    return senders


async def test_a_batch_is_one_forward_span_linked_to_the_span_of_each_request_in_it(
    make_batcher: MakeBatcher,
) -> None:
    spans = Spans()
    b, a = [task.result() for task in await two_requests_in_one_batch(spans, make_batcher, 1, 2)]
    held, joint = spans.named("forward")
    assert held.attributes is not None and held.attributes["tokserve.batch_size"] == 1
    assert held.attributes["tokserve.model"].startswith("test_a_batch_is_one_forward_span")
    assert held.links == () and held.attributes["tokserve.request_ids"] == ()
    assert joint.parent is None
    assert {ids(link.context) for link in joint.links} == {a, b}
    assert dict(joint.attributes or {}) == {
        "tokserve.model": held.attributes["tokserve.model"],
        "tokserve.op": "encode",
        "tokserve.batch_size": 2,
        "tokserve.request_ids": ("a", "b"),
        "tokserve.instance": "0",
    }
    assert joint.status.status_code is trace.StatusCode.UNSET


async def test_each_items_wait_in_the_queue_is_a_span_of_its_request_ending_as_its_batch_starts(
    make_batcher: MakeBatcher,
) -> None:
    spans = Spans()
    b, a = [task.result() for task in await two_requests_in_one_batch(spans, make_batcher, 1, 2)]
    waits = {ids(span.parent): span for span in spans.named("queue.wait")}
    _, joint = spans.named("forward")
    assert set(waits) == {None, a, b}  # the held item was sent outside any span
    for sender in (a, b):
        wait = waits[sender]
        assert wait.attributes is not None and wait.attributes["tokserve.op"] == "encode"
        assert sender is not None and wait.context.trace_id == sender[0]
        assert wait.end_time is not None and joint.start_time is not None
        assert wait.end_time <= joint.start_time


async def test_a_failed_forward_is_logged_with_the_ids_of_every_request_in_its_batch(
    make_batcher: MakeBatcher,
) -> None:
    spans = Spans()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tokserve.batching")
    logger.addHandler(handler)
    try:
        senders = await two_requests_in_one_batch(spans, make_batcher, -1, 2)
    finally:
        logger.removeHandler(handler)
    assert all(isinstance(task.exception(), Overloaded) for task in senders)
    (failed,) = [
        r for r in records if "the forward pass over a batch of 2 failed" in r.getMessage()
    ]
    assert failed.request_id == "a,b"  # type: ignore[attr-defined]
    _, joint = spans.named("forward")
    assert joint.status.status_code is trace.StatusCode.ERROR
    assert joint.status.description == "ValueError: negative input"
    (exception,) = joint.events
    assert exception.name == "exception" and exception.attributes is not None
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "negative input"
    assert REQUEST_ID.get() is None


async def test_the_worker_runs_each_batch_as_its_own_requests_and_no_other(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    seen: list[str | None] = []  # the request ids a record logged by the backend would carry

    def run(items: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(REQUEST_ID.get())
        return model(items)

    async def as_request(request_id: str) -> None:
        REQUEST_ID.set(request_id)
        await batcher.submit(item(1))

    batcher = await make_batcher(run)
    await asyncio.create_task(as_request("r-9"))
    await batcher.submit(item(2))
    assert seen == ["r-9", None]


# Several instances of one model behind one queue (TOKSERVE_DEVICES, TOKSERVE_INSTANCES)


class BrokenInstance(MatmulModel):
    """An instance whose device is gone: every forward it starts fails."""

    def __call__(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        self.threads.add(threading.current_thread().name)
        self.attempts.append(len(items))
        self.started.put(len(items))
        raise RuntimeError("device lost")


async def test_two_instances_both_compute_on_their_own_threads_with_unchanged_results(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"cpu/0": first, "cpu/1": second}, max_batch_size=2)
    assert batcher.instances == ["cpu/0", "cpu/1"]
    blocker = await hold_worker(first, batcher)  # the first instance runs item 0 ...
    vectors = [item(i) for i in range(1, 5)]
    results = await batcher.submit_many(vectors)  # ... while the second takes the others
    assert second.batches and first.batches == []
    first.release.set()
    assert_each_answered(first, [item(0)], [await blocker])
    assert_each_answered(second, vectors, results)
    assert first.computed() | second.computed() == {0, 1, 2, 3, 4}
    assert first.threads == {f"{batcher.model}-encode-cpu/0_0"}
    assert second.threads == {f"{batcher.model}-encode-cpu/1_0"}


async def test_an_item_arriving_while_another_instance_is_free_starts_at_once(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second}, max_wait_ms=500)
    blocker = await hold_worker(first, batcher)
    started = time.monotonic()
    assert_each_answered(second, [item(1)], [await batcher.submit(item(1))])
    # gathering company would take the whole 500 ms; a loaded 2-core machine answers in < 50 ms
    assert time.monotonic() - started < 0.25
    first.release.set()
    await blocker


async def test_a_batch_that_fails_on_one_instance_is_answered_by_the_other(
    make_batcher: MakeBatcher,
) -> None:
    broken, healthy = BrokenInstance(), MatmulModel()
    batcher = await make_batcher({"broken": broken, "healthy": healthy}, max_wait_ms=0)
    errors = sample("tokserve_rejected_total", reason="error")
    waits = sample("tokserve_queue_wait_seconds_count", model=batcher.model, op="encode")
    vectors = [item(i) for i in range(1, 4)]
    results = await batcher.submit_many(vectors)
    assert_each_answered(healthy, vectors, results)
    assert broken.attempts == [3] and healthy.batches == [[1, 2, 3]]
    assert sample("tokserve_rejected_total", reason="error") == errors
    # a retried item's queue wait is observed once, when it first started
    after = sample("tokserve_queue_wait_seconds_count", model=batcher.model, op="encode")
    assert after == waits + 3
    assert batcher.idle


async def test_a_retried_batch_waits_for_an_instance_it_has_not_failed_on(
    make_batcher: MakeBatcher,
) -> None:
    broken, healthy = BrokenInstance(), MatmulModel()
    batcher = await make_batcher({"healthy": healthy, "broken": broken}, max_wait_ms=0)
    blocker = await hold_worker(healthy, batcher)  # the healthy instance is busy ...
    retried = asyncio.create_task(batcher.submit(item(1)))  # ... so the broken one takes it
    await broken.wait_started()
    await asyncio.sleep(0.05)  # the broken instance is free again: it must not take item 1 twice
    assert broken.attempts == [1] and not retried.done()
    healthy.release.set()
    assert_each_answered(healthy, [item(1)], [await retried])
    await blocker
    assert healthy.batches == [[0], [1]]


async def test_a_retried_item_keeps_its_deadline_and_answers_504_if_it_passes_while_queued(
    make_batcher: MakeBatcher,
) -> None:
    broken, healthy = BrokenInstance(), MatmulModel()
    batcher = await make_batcher({"healthy": healthy, "broken": broken}, max_wait_ms=0)
    blocker = await hold_worker(healthy, batcher)  # the healthy instance is busy ...
    deadline = time.monotonic() + 0.1
    retried = asyncio.create_task(batcher.submit(item(1), deadline=deadline))
    await broken.wait_started()  # ... the broken one failed it, so it waits for the healthy one
    with pytest.raises(DeadlineExceeded):
        async with asyncio.timeout(2):  # answered at its deadline, not left waiting
            await retried
    assert time.monotonic() >= deadline
    healthy.release.set()
    await blocker
    assert healthy.batches == [[0]]


async def test_a_batch_failing_on_every_instance_answers_503_after_one_try_on_each(
    make_batcher: MakeBatcher,
) -> None:
    first, second = BrokenInstance(), BrokenInstance()
    batcher = await make_batcher({"a": first, "b": second})
    errors = sample("tokserve_rejected_total", reason="error")
    with pytest.raises(Overloaded) as failed:
        await batcher.submit_many([item(1), item(2)])
    assert str(failed.value.__cause__) == "device lost"
    assert first.attempts == [2] and second.attempts == [2]
    assert sample("tokserve_rejected_total", reason="error") == errors + 2


async def test_each_instance_counts_its_own_batches_and_busy_seconds(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second}, max_batch_size=1)
    labels = {"model": batcher.model, "op": "encode"}
    names = ("tokserve_instance_batches_total", "tokserve_instance_busy_seconds_total")
    before = {(name, i): sample(name, **labels, instance=i) for name in names for i in "ab"}

    def added(name: str, instance: str) -> float:
        return sample(name, **labels, instance=instance) - before[name, instance]

    blocker = await hold_worker(first, batcher)
    await asyncio.sleep(0.05)
    await batcher.submit_many([item(1), item(2)])
    first.release.set()
    await blocker
    assert added("tokserve_instance_batches_total", "a") == 1
    assert added("tokserve_instance_batches_total", "b") == 2
    # the first instance's one forward was held for 50 ms at least
    assert added("tokserve_instance_busy_seconds_total", "a") >= 0.05
    assert added("tokserve_instance_busy_seconds_total", "b") > 0


async def test_stop_waits_for_the_batches_of_every_instance(make_batcher: MakeBatcher) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second})
    blocker = await hold_worker(first, batcher)
    second.release.clear()
    other = asyncio.create_task(batcher.submit(item(1)))
    await second.wait_started()
    assert not batcher.idle
    stopping = asyncio.create_task(batcher.stop(drain_timeout_s=2.0))
    await asyncio.sleep(0.05)
    first.release.set()  # one instance done, the other still computing: not drained yet
    await blocker
    await asyncio.sleep(0.05)
    assert not stopping.done()
    second.release.set()
    await stopping
    assert_each_answered(second, [item(1)], [await other])
    assert batcher.idle


async def test_stop_after_the_drain_timeout_fails_the_batches_running_on_every_instance(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second})
    blocker = await hold_worker(first, batcher)
    second.release.clear()
    other = asyncio.create_task(batcher.submit(item(1)))
    await second.wait_started()
    await batcher.stop(drain_timeout_s=0.05)
    for task in (blocker, other):
        with pytest.raises(Overloaded):
            await task
    first.release.set()
    second.release.set()


async def test_warm_up_runs_on_each_instance_s_own_worker_thread(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second})
    await batcher.run_on_each(lambda run_batch: run_batch([item(1)]) and None)
    assert first.batches == [[1]] and second.batches == [[1]]
    assert first.threads == {f"{batcher.model}-encode-a_0"}
    assert second.threads == {f"{batcher.model}-encode-b_0"}


async def test_stop_after_the_drain_timeout_fails_what_runs_beside_an_instance_that_finished(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second})
    assert_each_answered(first, [item(1)], [await batcher.submit(item(1))])  # "a" is done ...
    second.release.clear()
    held = asyncio.create_task(batcher.submit(item(2)))  # ... while "b" computes at the timeout
    await second.wait_started()
    await batcher.stop(drain_timeout_s=0.05)
    with pytest.raises(Overloaded):
        await held
    second.release.set()
    assert first.batches == [[1]] and second.attempts == [1]


async def test_stop_after_the_drain_timeout_fails_what_runs_beside_an_instance_never_used(
    make_batcher: MakeBatcher,
) -> None:
    first, second = MatmulModel(), MatmulModel()
    batcher = await make_batcher({"a": first, "b": second})
    blocker = await hold_worker(first, batcher)  # "b" has run no batch when the timeout comes
    await batcher.stop(drain_timeout_s=0.05)
    with pytest.raises(Overloaded):
        await blocker
    first.release.set()
    assert second.attempts == []


def test_a_batcher_without_instances_is_refused() -> None:
    with pytest.raises(ValueError) as refused:
        unstarted("m", {})
    assert str(refused.value) == "m encode: need at least one instance"
