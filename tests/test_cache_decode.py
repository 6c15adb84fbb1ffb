"""TOKSERVE_CACHE_DECODE through the app: decoded files are cached only when it is on.

Off (the default), every decode is computed, and the cache is neither asked nor written; on, a
repeated decode is answered from the cache with the very bytes computed the first time.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.support import served, settings_for

GRID = 8  # 64 px / 8
VOCAB = 8 * 5 * 5 * 5
K = 4  # tiny-audio's codebooks
# each route with tokens for it: an 8 x 8 grid of the image model, 4 codebooks x 20 frames
DECODES = {
    "/v1/images/decode": np.random.default_rng(500).integers(0, VOCAB, (GRID, GRID)).tolist(),
    "/v1/audio/decode": np.random.default_rng(501).integers(0, 64, (K, 20)).tolist(),
}


def sample(name: str, **labels: str) -> float:
    """A sample's current value; 0 for labels never used yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def counts(route: str) -> dict[str, float]:
    """Cache lookups by result, and the forward passes of the route's model's decode queue."""
    model = "tiny-image" if route.startswith("/v1/images") else "tiny-audio"
    return {
        "hit": sample("tokserve_cache_requests_total", result="hit"),
        "miss": sample("tokserve_cache_requests_total", result="miss"),
        "forwards": sample("tokserve_batch_size_count", model=model, op="decode"),
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each count changed."""
    return {name: after[name] - before[name] for name in before}


async def decode_twice(client: httpx.AsyncClient, route: str) -> list[dict[str, object]]:
    """The same one-item decode twice, each answered and its cache write done before the next
    (a list of one item: its answer says whether the cache gave it)."""
    answers = []
    for _ in range(2):
        response = await client.post(route, json={"tokens": [DECODES[route]]})
        assert response.status_code == 200, response.text
        answers.append(response.json()["items"][0])
        await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
    return answers


@asynccontextmanager
async def serve_with(
    repo: Path, monkeypatch: pytest.MonkeyPatch, cache_decode: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the tiny models with TOKSERVE_CACHE_DECODE set so (None: unset)."""
    if cache_decode is None:
        monkeypatch.delenv("TOKSERVE_CACHE_DECODE", raising=False)
    else:
        monkeypatch.setenv("TOKSERVE_CACHE_DECODE", cache_decode)
    async with served(settings_for(repo)) as client:
        yield client


@pytest.mark.parametrize("route", DECODES)
async def test_by_default_every_decode_is_computed_and_the_cache_never_asked(
    route: str, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_with(repo, monkeypatch, None) as client:
        before = counts(route)
        first, again = await decode_twice(client, route)
        after = counts(route)
        held = client.app.state.engine.cache.bytes_held  # type: ignore[attr-defined]
    assert (first["cached"], again["cached"]) == (False, False)
    assert moved(before, after) == {"hit": 0, "miss": 0, "forwards": 2}
    assert held == 0  # nothing was written either


@pytest.mark.parametrize("route", DECODES)
async def test_with_cache_decode_on_a_repeated_decode_is_the_cached_file_byte_for_byte(
    route: str, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_with(repo, monkeypatch, "true") as client:
        before = counts(route)
        first, again = await decode_twice(client, route)
        after = counts(route)
    assert (first["cached"], again["cached"]) == (False, True)
    assert moved(before, after) == {"hit": 1, "miss": 1, "forwards": 1}
    assert isinstance(first["data"], str) and isinstance(again["data"], str)
    assert base64.b64decode(again["data"]) == base64.b64decode(first["data"])
