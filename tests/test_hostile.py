"""Hostile clients: each request's cost is bounded, a bad item fails alone, and the cache cannot
be poisoned (API keys: tests/test_auth.py)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import soundfile as sf
from prometheus_client import REGISTRY

from app.api import requests
from app.batching import Batcher
from app.cache import MemoryCache, cache_key, canonical_params
from app.errors import DeadlineExceeded
from app.pipeline import Job, Pipeline, unchanged
from app.runner import is_out_of_memory
from app.tokens import key_bytes
from tests.support import (
    TINY_AUDIO,
    ffmpeg_audio,
    held_body,
    in_chunks,
    png_bytes,
    served,
    settings_for,
    wav_bytes,
)

GRID = 8
K = TINY_AUDIO["arch"]["codebooks"]
VOCAB = 8 * 5 * 5 * 5


def assert_problem(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word.lower() in detail.lower(), detail


# ---------------------------------------------------------------------------------------------
# bounded cost per request


async def test_decode_of_more_items_than_max_items_is_refused_before_any_is_read(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = msgpack.packb({"model": "tiny-audio", "tokens": [[[0]]] * 100_000})

    def unpack_all(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpacking 100,000 items holds the GIL for ~80 ms")

    monkeypatch.setattr(msgpack, "unpackb", unpack_all)  # the item count comes from headers
    response = await client.post("/v1/audio/decode", content=body, headers=MSGPACK)
    assert_problem(response, 413, "100000 token items", "TOKSERVE_MAX_ITEMS")
    as_json = await client.post("/v1/audio/decode", json={"tokens": [[[0]]] * 100_000})
    assert_problem(as_json, 413, "100000 token items", "TOKSERVE_MAX_ITEMS")


async def test_a_token_body_over_the_token_budget_is_refused_by_size_not_parsed(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_decode_tokens=1000)) as client:
        garbage = b"\xc1" * (requests.token_body_limit(client.app.state.settings) + 1)  # type: ignore[attr-defined]
        response = await client.post("/v1/audio/decode", content=garbage, headers=MSGPACK)
        assert_problem(response, 413, "TOKSERVE_MAX_DECODE_TOKENS")
        assert response.headers["connection"] == "close"
        streamed = await client.post(
            "/v1/audio/decode", content=in_chunks(garbage), headers=MSGPACK
        )
        assert_problem(streamed, 413, "TOKSERVE_MAX_DECODE_TOKENS")


async def test_large_token_bodies_are_parsed_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed_on: list[str] = []
    parse_json = requests._parse_json

    def recording(body: bytes) -> Any:
        parsed_on.append(threading.current_thread().name)
        return parse_json(body)

    monkeypatch.setattr(requests, "_parse_json", recording)
    tokens = np.zeros((GRID, GRID), int).tolist()
    small = json.dumps({"tokens": tokens})
    edge = " " * (requests.INLINE_PARSE_BYTES - len(small)) + small  # whitespace makes size
    for body in (small, edge, " " + edge):
        response = await client.post(
            "/v1/images/decode", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200
    loop = threading.current_thread().name
    assert parsed_on[:2] == [loop, loop]  # up to INLINE_PARSE_BYTES: inline, no thread hop
    assert parsed_on[2].startswith("media")


def _wav(samples: int, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(samples, np.float32), sample_rate, format="WAV")
    return buffer.getvalue()


async def test_audio_declaring_a_rate_below_the_minimum_is_refused_before_it_is_resampled(
    client: httpx.AsyncClient,
) -> None:
    tiny = _wav(600, 1)  # 600 s at 1 Hz: 14.4 million samples once resampled
    assert len(tiny) < 2000
    response = await client.post("/v1/audio/encode", content=tiny)
    assert_problem(response, 422, "1 Hz", "8000 Hz", "TOKSERVE_MIN_AUDIO_SAMPLE_RATE")


async def test_encode_items_adding_up_to_more_audio_than_a_request_may_hold_are_refused(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_request_audio_seconds=1.0)) as client:
        files = [("files", (f"{i}.wav", wav_bytes(seconds=0.6))) for i in range(2)]
        response = await client.post("/v1/audio/encode", files=files)
        assert_problem(response, 413, "1.2 s", "TOKSERVE_MAX_REQUEST_AUDIO_SECONDS")
        alone = await client.post("/v1/audio/encode", files=files[:1])
        assert alone.status_code == 200


async def test_m4a_and_webm_items_count_towards_a_requests_audio_by_their_headers(
    repo: Path,
) -> None:
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(28800) / 48000)).astype(np.float32)[None]
    m4a = ffmpeg_audio(tone, 48000, "ipod", "aac")  # 0.6 s
    webm = ffmpeg_audio(tone, 48000, "webm", "libopus")  # 0.6 s, and 8 ms of Matroska rounding
    async with served(settings_for(repo, max_request_audio_seconds=1.0)) as client:
        files = [("files", ("a.m4a", m4a)), ("files", ("b.webm", webm[:500]))]
        # the WebM is cut after its header: its length is read, not decoded
        response = await client.post("/v1/audio/encode", files=files)
        assert_problem(response, 413, "1.2 s", "TOKSERVE_MAX_REQUEST_AUDIO_SECONDS")
        alone = await client.post("/v1/audio/encode", files=[("files", ("b.webm", webm))])
        assert alone.status_code == 200


async def test_decode_items_adding_up_to_more_audio_than_a_request_may_hold_are_refused(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_request_audio_seconds=1.0)) as client:
        codes = np.zeros((K, 30), int).tolist()  # 30 frames of 20 ms: 0.6 s each
        response = await client.post("/v1/audio/decode", json={"tokens": [codes, codes]})
        assert_problem(response, 413, "1.2 s", "TOKSERVE_MAX_REQUEST_AUDIO_SECONDS")
        assert (await client.post("/v1/audio/decode", json={"tokens": [codes]})).status_code == 200


async def test_requests_past_max_in_flight_are_answered_503_before_their_bodies_are_read(
    repo: Path,
) -> None:
    async with served(settings_for(repo, max_in_flight=1)) as client:
        release = asyncio.Event()
        image = png_bytes(seed=41)
        held = asyncio.ensure_future(
            client.post("/v1/images/encode", content=held_body(image, release))
        )
        await asyncio.sleep(0.05)
        turned_away = await client.post("/v1/images/encode", content=image)
        assert_problem(turned_away, 503, "TOKSERVE_MAX_IN_FLIGHT")
        assert turned_away.headers["retry-after"] == "1"
        assert turned_away.headers["connection"] == "close"  # its body is not read
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200
        release.set()
        assert (await held).status_code == 200
        assert (await client.post("/v1/images/encode", content=image)).status_code == 200


async def test_a_requests_deadline_counts_from_its_arrival_not_from_its_last_byte(
    client: httpx.AsyncClient,
) -> None:
    release = asyncio.Event()
    slow = asyncio.ensure_future(
        client.post(
            "/v1/images/encode",
            content=held_body(png_bytes(seed=42), release),
            headers={"X-Request-Timeout": "0.1"},
        )
    )
    await asyncio.sleep(0.3)
    release.set()
    assert_problem(await slow, 504, "deadline")


class _Blocking:
    """A prepare step that holds its pool thread until released, counting who got one."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[str] = []

    def __call__(self, item: str) -> str:
        self.started.append(item)
        if item.startswith("slow"):
            assert self.release.wait(10)
        return item


async def _pipeline_with(
    prepare: Callable[[str], str], media_share: int
) -> tuple[Pipeline, Job, Batcher[Any, Any], ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="media")
    batcher: Batcher[Any, Any] = Batcher(
        "fake",
        "encode",
        list,
        max_batch_size=4,
        max_wait_ms=1,
        max_queue=16,
        is_oom=is_out_of_memory,
    )
    await batcher.start()
    job = Job(
        model=_FakeModel(),  # type: ignore[arg-type]
        op="encode",
        batcher=batcher,
        prepare=prepare,
        group=lambda _: None,
        finish=unchanged,
        use_cache=False,
    )
    return Pipeline(MemoryCache(1 << 20, 60), pool, media_share), job, batcher, pool


class _FakeModel:
    name, version = "fake", "v1"


async def test_one_request_of_many_slow_items_leaves_media_threads_for_other_requests() -> None:
    prepare = _Blocking()
    pipeline, job, batcher, pool = await _pipeline_with(prepare, media_share=1)
    try:
        hog = asyncio.ensure_future(
            pipeline.run(job, ["slow-0", "slow-1", "slow-2"], [b"0", b"1", b"2"], None)
        )
        async with asyncio.timeout(5):
            while not prepare.started:
                await asyncio.sleep(0.001)
            (other,) = await pipeline.run(job, ["quick"], [b"q"], None)
        assert other.array == "quick"
        assert prepare.started == ["slow-0", "quick"]  # the hog held one thread, not both
        prepare.release.set()
        assert [r.array for r in await hog] == ["slow-0", "slow-1", "slow-2"]
    finally:
        prepare.release.set()
        await batcher.stop(1.0)
        pool.shutdown()


async def test_an_item_whose_deadline_passed_while_waiting_for_a_thread_is_never_prepared() -> None:
    prepare = _Blocking()
    pipeline, job, batcher, pool = await _pipeline_with(prepare, media_share=2)
    try:
        hog = asyncio.ensure_future(pipeline.run(job, ["slow-a", "slow-b"], [b"a", b"b"], None))
        async with asyncio.timeout(5):
            while len(prepare.started) < 2:
                await asyncio.sleep(0.001)
        late = asyncio.ensure_future(
            pipeline.run(job, ["quick"], [b"q"], deadline=time.monotonic() + 0.05)
        )
        await asyncio.sleep(0.2)
        prepare.release.set()
        (result,) = await late
        assert isinstance(result.error, DeadlineExceeded)
        assert "quick" not in prepare.started
        await hog
    finally:
        prepare.release.set()
        await batcher.stop(1.0)
        pool.shutdown()


# ---------------------------------------------------------------------------------------------
# the cache cannot choose answers


def _cache_counter(result: str) -> float:
    value = REGISTRY.get_sample_value("tokserve_cache_requests_total", {"result": result})
    return value or 0.0


POISONS = {
    "float tokens": np.full((GRID, GRID), 3.0, np.float32),
    "another shape": np.zeros((GRID, GRID + 1), np.uint16),
    "ids past the vocabulary": np.full((GRID, GRID), VOCAB, np.uint16),
    "a flat list": np.zeros(GRID * GRID, np.uint16),
}


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_cached_value_that_does_not_fit_the_model_is_a_counted_miss(
    repo: Path, poison: str, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    image = png_bytes(seed=31)
    async with served(settings_for(repo, redis_url=url)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        model = engine.registry.get("tiny-image", "image")
        key = cache_key(model.name, model.version, "encode", canonical_params(resize="crop"), image)
        await engine.cache.set_many([(key, POISONS[poison])])
        invalid = _cache_counter("invalid")
        response = await client.post("/v1/images/encode", content=image)
        assert response.status_code == 200, response.text
        (item,) = response.json()["items"]
        assert item["cached"] is False
        tokens = np.array(item["tokens"])
        assert tokens.shape == (GRID, GRID) and tokens.dtype.kind == "i"
        assert tokens.min() >= 0 and tokens.max() < VOCAB
        assert _cache_counter("invalid") == invalid + 1


async def test_cached_audio_tokens_of_another_length_are_a_miss(client: httpx.AsyncClient) -> None:
    clip = wav_bytes(seconds=0.5, freq=523.0)  # 25 frames
    engine = client.app.state.engine  # type: ignore[attr-defined]
    model = engine.registry.get("tiny-audio", "audio")
    key = cache_key(model.name, model.version, "encode", "", clip)
    await engine.cache.set_many([(key, np.zeros((K, 40), np.uint16))])
    (item,) = (await client.post("/v1/audio/encode", content=clip)).json()["items"]
    assert item["cached"] is False and item["frames"] == 25
    (again,) = (await client.post("/v1/audio/encode", content=clip)).json()["items"]
    assert again["cached"] is True and again["tokens"] == item["tokens"]


async def test_cached_decoded_media_that_is_not_the_asked_format_is_a_miss(repo: Path) -> None:
    async with served(settings_for(repo, cache_decode=True)) as client:
        tokens = np.ones((GRID, GRID), int)
        engine = client.app.state.engine  # type: ignore[attr-defined]
        model = engine.registry.get("tiny-image", "image")
        key = cache_key(model.name, model.version, "decode", "format=png", key_bytes(tokens))
        await engine.cache.set_many([(key, np.frombuffer(b"GIF89a" + bytes(64), np.uint8))])
        response = await client.post("/v1/images/decode", json={"tokens": tokens.tolist()})
        assert response.status_code == 200
        assert response.content.startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# per-item answers

MSGPACK = {"Content-Type": "application/msgpack"}


async def test_a_multi_item_encode_with_one_bad_item_answers_207_and_the_rest_their_tokens(
    client: httpx.AsyncClient,
) -> None:
    files = [
        ("files", ("a.wav", wav_bytes(seconds=0.5))),
        ("files", ("b.wav", _wav(600, 1))),
        ("files", ("c.wav", wav_bytes(seconds=0.3))),
    ]
    response = await client.post("/v1/audio/encode", files=files)
    assert response.status_code == 207, response.text
    first, bad, third = response.json()["items"]
    assert (first["frames"], third["frames"]) == (25, 15)
    assert (
        bad["error"]["status"] == 422 and "TOKSERVE_MIN_AUDIO_SAMPLE_RATE" in bad["error"]["detail"]
    )


async def test_when_every_item_fails_the_request_takes_the_first_status_and_lists_each(
    client: httpx.AsyncClient,
) -> None:
    files = [("files", ("a.png", b"no image")), ("files", ("b.png", png_bytes(seed=5)[:-300]))]
    response = await client.post("/v1/images/encode", files=files)
    assert_problem(response, 415, "Every item failed; item 0")
    assert [p["status"] for p in response.json()["items"]] == [415, 415]


async def test_a_multi_item_decode_with_one_bad_item_answers_207_in_json_and_msgpack(
    client: httpx.AsyncClient,
) -> None:
    good = np.zeros((GRID, GRID), int).tolist()
    items = [good, np.zeros((GRID, GRID + 1), int).tolist(), good]
    response = await client.post("/v1/images/decode", json={"tokens": items})
    assert response.status_code == 207, response.text
    first, bad, third = response.json()["items"]
    assert first["data"] == third["data"] and first["media_type"] == "image/png"
    assert bad["error"]["status"] == 422 and "tokens[1]" in bad["error"]["detail"]
    binary = await client.post(
        "/v1/images/decode",
        json={"tokens": items},
        headers={"Accept": "application/msgpack"},
    )
    assert binary.status_code == 207
    unpacked = msgpack.unpackb(binary.content)["items"]
    assert unpacked[0]["data"].startswith(b"\x89PNG") and unpacked[1]["error"]["status"] == 422


async def test_npy_answers_fail_as_a_whole_when_an_item_fails(client: httpx.AsyncClient) -> None:
    files = [("files", ("a.png", png_bytes(seed=6))), ("files", ("b.png", b"no image"))]
    response = await client.post(
        "/v1/images/encode", files=files, headers={"Accept": "application/x-npy"}
    )
    assert_problem(response, 415, "Item 1", "msgpack or JSON")
