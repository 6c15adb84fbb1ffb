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
from prometheus_client import REGISTRY

from app.batching import Batcher
from app.errors import DeadlineExceeded, Overloaded, PayloadTooLarge
from app.runner import is_out_of_memory

DIM = 8

MakeBatcher = Callable[..., Awaitable[Batcher[torch.Tensor, torch.Tensor]]]


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


@pytest.fixture
async def make_batcher(request: pytest.FixtureRequest) -> AsyncIterator[MakeBatcher]:
    """Started batchers named after the test, so metric labels are its own; stopped after."""
    started: list[Batcher[torch.Tensor, torch.Tensor]] = []

    async def make(model: MatmulModel, **settings: Any) -> Batcher[torch.Tensor, torch.Tensor]:
        options = {
            "max_batch_size": 8,
            "max_wait_ms": 5.0,
            "max_queue": 64,
            "is_oom": is_out_of_memory,
            **settings,
        }
        batcher = Batcher[torch.Tensor, torch.Tensor](request.node.name, "encode", model, **options)
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


async def test_idle_worker_dispatches_a_single_item_at_once(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_wait_ms=500)
    started = time.monotonic()
    tokens = await batcher.submit(item(1))
    assert time.monotonic() - started < 0.05
    assert torch.allclose(tokens, model.expected(item(1)))
    assert model.batches == [[1]]


async def test_run_batch_runs_on_the_models_worker_thread(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    await batcher.submit(item(1))
    await batcher.submit(item(2))
    (thread,) = model.threads
    assert thread.startswith(f"{batcher.model}-encode")
    assert thread != threading.current_thread().name


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
    for vector, tokens in zip(vectors, results, strict=True):
        assert torch.allclose(tokens, model.expected(vector))


async def test_each_caller_gets_the_result_of_its_own_item(make_batcher: MakeBatcher) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_batch_size=4)
    vectors = [item(i) for i in range(40)]
    results = await asyncio.gather(*(batcher.submit(vector) for vector in vectors))
    for vector, tokens in zip(vectors, results, strict=True):
        assert torch.allclose(tokens, model.expected(vector))
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
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(item(3))
    assert time.monotonic() - started < 0.01
    assert refused.value.status == 503
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
    with pytest.raises(DeadlineExceeded):
        await late  # answered at its deadline, while the worker is still busy
    assert not blocker.done(), "answered only once the worker was free, not at its deadline"
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
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(item(1), deadline=time.monotonic() - 1)
    assert model.attempts == []
    assert batcher.depth == 0


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


async def test_failing_forward_fails_only_its_batch_and_the_next_batch_succeeds(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model)
    blocker = await hold_worker(model, batcher)
    doomed = queue_many(batcher, [-1, 1], group="a")
    spared = queue_many(batcher, [2], group="b")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="tokserve.batching"):
        model.release.set()
        await blocker
        for task in doomed:
            with pytest.raises(Overloaded) as failed:
                await task
            assert batcher.model in failed.value.detail
            assert "forward pass failed" in failed.value.detail
    assert torch.allclose(await spared[0], model.expected(item(2)))
    assert torch.allclose(await batcher.submit(item(3)), model.expected(item(3)))
    assert model.attempts == [1, 2, 1, 1]
    assert any(record.exc_info for record in caplog.records)


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
    for vector, tokens in zip(vectors, results, strict=True):
        assert torch.allclose(tokens, model.expected(vector))


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
    for vector, tokens in zip(vectors, results, strict=True):
        assert torch.allclose(tokens, model.expected(vector))


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


async def test_submit_many_with_more_items_than_the_queue_holds_is_refused_as_too_large(
    make_batcher: MakeBatcher,
) -> None:
    model = MatmulModel()
    batcher = await make_batcher(model, max_queue=2)
    with pytest.raises(PayloadTooLarge):
        await batcher.submit_many([item(1), item(2), item(3)])
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
    blocker = await hold_worker(model, batcher)
    waiting = queue_many(batcher, [1, 2])
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=0.05)
    for task in [blocker, *waiting]:
        with pytest.raises(Overloaded, match="shut down"):
            await task
    assert batcher.depth == 0
    model.release.set()
    assert model.attempts == [1]


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
