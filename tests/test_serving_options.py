"""A model's ``serving`` options (config.json) as its queues behave and its metrics count them.

Each test serves one tiny image model whose config.json alone sets the option under test (the
environment overrides nothing), and sends decode requests through the app over HTTP. The items
of one decode request enter the model's queue together, in one turn of the event loop, before
the queue's dispatcher looks at them: how many wait at once is decided by the request, not by
timing. The defaults (max_batch_size 16, max_wait_ms 5, max_queue 256) would answer otherwise.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.errors import ProblemError
from tests.support import TINY_IMAGE, served, settings_for, write_model

GRID = 8  # 64 px / 8
VOCAB = 8 * 5 * 5 * 5
DECODE = "/v1/images/decode"


def sample(name: str, **labels: str) -> float:
    """A sample's current value; 0 for labels never used yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def grids(count: int, seed: int) -> list[list[list[int]]]:
    """``count`` distinct random token grids: distinct items are each computed, never shared."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, (GRID, GRID)).tolist() for _ in range(count)]


ServeModel = Callable[[str, dict[str, float]], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def serve_model(tmp_path: Path) -> AsyncIterator[ServeModel]:
    """Serve a tiny image model named ``name`` with ``serving`` in its config.json."""
    async with AsyncExitStack() as stack:

        async def start(name: str, serving: dict[str, float]) -> httpx.AsyncClient:
            write_model(tmp_path, {**TINY_IMAGE, "name": name, "serving": serving})
            return await stack.enter_async_context(served(settings_for(tmp_path)))

        yield start


async def test_max_batch_size_bounds_every_batch_under_concurrent_load(
    serve_model: ServeModel,
) -> None:
    name = "batch-of-2"
    client = await serve_model(name, {"max_batch_size": 2, "max_wait_ms": 5, "max_queue": 64})
    labels = {"model": name, "op": "decode"}
    batches = sample("tokserve_batch_size_count", **labels)
    items = sample("tokserve_batch_size_sum", **labels)
    at_most_2 = sample("tokserve_batch_size_bucket", le="2.0", **labels)

    answers = await asyncio.gather(
        *(client.post(DECODE, json={"model": name, "tokens": grids(6, seed)}) for seed in range(4))
    )

    assert [response.status_code for response in answers] == [200] * 4
    assert sample("tokserve_batch_size_sum", **labels) - items == 24
    # every request's six items waited together: each batch took the two its size allows
    assert sample("tokserve_batch_size_count", **labels) - batches == 12
    assert sample("tokserve_batch_size_bucket", le="2.0", **labels) - at_most_2 == 12


async def test_max_queue_answers_the_item_past_it_503_counted_as_queue_full(
    serve_model: ServeModel,
) -> None:
    name = "queue-of-4"
    client = await serve_model(name, {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 4})
    queue_full = sample("tokserve_rejected_total", reason="queue_full")
    computed = sample("tokserve_batch_size_sum", model=name, op="decode")

    response = await client.post(DECODE, json={"model": name, "tokens": grids(5, seed=10)})

    items = response.json()["items"]
    statuses = [item["error"]["status"] if "error" in item else 200 for item in items]
    assert (response.status_code, statuses) == (207, [200, 200, 200, 200, 503])
    *decoded, refused = items
    assert [item["media_type"] for item in decoded] == ["image/png"] * 4
    assert refused["error"]["detail"] == (
        f"{name} decode queue is full (4 of 4 items waiting); retry shortly."
    )
    assert sample("tokserve_rejected_total", reason="queue_full") - queue_full == 1
    assert sample("tokserve_batch_size_sum", model=name, op="decode") - computed == 4


async def test_an_item_refused_for_a_full_queue_leaves_nothing_for_the_garbage_collector(
    serve_model: ServeModel,
) -> None:
    """Its problem's traceback holds the frames that held its tokens; kept in a reference cycle,
    they stayed in memory until the collector next ran, which an idle server never does: after
    a burst of refused 60 s clips, 0.4-1.1 GB more (bench.memory, 64 clients)."""
    name = "queue-of-4-no-cycles"
    client = await serve_model(name, {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 4})
    gc.collect()
    gc.disable()
    try:
        response = await client.post(DECODE, json={"model": name, "tokens": grids(5, seed=11)})
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = [type(o).__name__ for o in gc.garbage if isinstance(o, (np.ndarray, BaseException))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert response.status_code == 207
    assert held == []


async def test_an_item_refused_for_a_full_queue_keeps_its_problem_without_the_traceback(
    serve_model: ServeModel,
) -> None:
    """The answer needs the problem's status and sentence; its traceback would keep the frames
    that held the item's input alive for as long as the problem is."""
    name = "queue-of-4-no-traceback"
    client = await serve_model(name, {"max_batch_size": 8, "max_wait_ms": 5, "max_queue": 4})
    endpoint = client.app.state.engine.endpoints[name]  # type: ignore[attr-defined]
    answer = await endpoint.decode([np.array(grid) for grid in grids(5, seed=12)], "png", None)
    *_, refused = answer.items
    assert isinstance(refused, ProblemError) and refused.status == 503
    assert refused.__traceback__ is None


async def test_max_wait_ms_holds_an_item_that_came_to_a_busy_queue_back_for_company(
    serve_model: ServeModel,
) -> None:
    """Three items, batches of two: the third arrived while the first two ran, and waits its
    full max_wait_ms (400 ms) for a second item that never comes. A loaded machine can only
    make the wait longer, so only the lower bound is asserted."""
    name = "waits-400-ms"
    client = await serve_model(name, {"max_batch_size": 2, "max_wait_ms": 400, "max_queue": 64})
    labels = {"model": name, "op": "decode"}
    waited_s = sample("tokserve_queue_wait_seconds_sum", **labels)
    batches = sample("tokserve_batch_size_count", **labels)

    start = time.perf_counter()
    response = await client.post(DECODE, json={"model": name, "tokens": grids(3, seed=20)})
    elapsed_s = time.perf_counter() - start

    assert response.status_code == 200, response.text
    assert sample("tokserve_batch_size_count", **labels) - batches == 2
    assert sample("tokserve_queue_wait_seconds_sum", **labels) - waited_s >= 0.4
    assert elapsed_s >= 0.4
