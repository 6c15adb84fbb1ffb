"""Server-Timing over real HTTP: each answer says where its time went inside the server (cache,
media, queue, forward, total), in milliseconds, as the metrics saw it."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import REGISTRY

from app.main import create_app
from tests.support import listening, png_bytes, settings_for

ENCODE = "/v1/images/encode?model=tiny-image"
DECODE = "/v1/images/decode"
ENTRY = re.compile(r"([a-z]+);dur=(\d+\.\d{3})")


def stages(header: str) -> dict[str, float]:
    """``name;dur=ms, ...`` -> {name: ms}, checking the whole header is such entries."""
    entries = [entry.strip() for entry in header.split(",")]
    matched = [ENTRY.fullmatch(entry) for entry in entries]
    assert all(matched), header
    return {m.group(1): float(m.group(2)) for m in matched if m}


def forward_seconds_total(op: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "tokserve_inference_duration_seconds_sum", {"model": "tiny-image", "op": op}
        )
        or 0.0
    )


async def test_a_computed_encode_times_its_cache_lookup_media_queue_and_forward(
    repo: Path,
) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        before = forward_seconds_total("encode")
        answer = await http.post(ENCODE, content=png_bytes(), headers={"content-type": "image/png"})
        forward_s = forward_seconds_total("encode") - before
    assert answer.status_code == 200
    timing = stages(answer.headers["server-timing"])
    assert list(timing) == ["cache", "media", "queue", "forward", "total"]
    # the forward the batcher measured for this request's batch, as the metric observed it
    assert abs(timing["forward"] - 1000 * forward_s) <= 0.001
    assert (
        timing["total"] >= timing["cache"] + timing["media"] + timing["queue"] + timing["forward"]
    )


async def test_a_cache_hit_is_timed_without_media_queue_or_forward(repo: Path) -> None:
    body = png_bytes(seed=3)
    app = create_app(settings_for(repo, warmup=False))
    async with listening(settings_for(repo), app) as http:
        first = await http.post(ENCODE, content=body, headers={"content-type": "image/png"})
        await app.state.engine.pipeline.flush()
        hit = await http.post(ENCODE, content=body, headers={"content-type": "image/png"})
    assert first.status_code == hit.status_code == 200
    assert hit.json()["items"][0]["cached"] is True
    timing = stages(hit.headers["server-timing"])
    assert list(timing) == ["cache", "total"]
    assert timing["cache"] <= timing["total"]


async def test_a_decode_times_writing_its_image_as_media(repo: Path) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        encoded = await http.post(
            ENCODE, content=png_bytes(), headers={"content-type": "image/png"}
        )
        grid = encoded.json()["items"][0]["tokens"]
        answer = await http.post(DECODE, json={"model": "tiny-image", "tokens": grid})
    assert answer.status_code == 200, answer.text
    # decoded files are not cached by default (TOKSERVE_CACHE_DECODE): no lookup
    assert list(stages(answer.headers["server-timing"])) == ["media", "queue", "forward", "total"]


async def test_a_request_refused_before_its_items_are_read_is_timed_by_its_total_alone(
    repo: Path,
) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        answer = await http.post(
            "/v1/images/encode?model=nope",
            content=png_bytes(),
            headers={"content-type": "image/png"},
        )
        health = await http.get("/healthz")
    assert answer.status_code == 404
    assert list(stages(answer.headers["server-timing"])) == ["total"]
    assert list(stages(health.headers["server-timing"])) == ["total"]
