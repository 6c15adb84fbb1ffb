"""Prometheus metrics through the real app: what one request moves, by exactly how much, and that
every label stays bounded (route templates, model names, status classes)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TINY_AUDIO, png_bytes, served, settings_for

IMAGE = "tiny-image"
AUDIO = "tiny-audio"
GRID_TOKENS = 8 * 8  # 64 px image, downsampled 8x
ENCODE_ROUTE = "/v1/images/encode"
QUEUE_WAIT = "tokserve_queue_wait_seconds_count"
BATCHES = "tokserve_batch_size_count"
BATCHED_ITEMS = "tokserve_batch_size_sum"
FORWARDS = "tokserve_inference_duration_seconds_count"
TOKENS = "tokserve_tokens_total"
REQUESTS = "tokserve_request_duration_seconds_count"


def sample(name: str, **labels: str) -> float:
    """A sample's current value; 0 for labels never used yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def model_op(model: str, op: str) -> dict[str, str]:
    return {"model": model, "op": op}


def requests(route: str, model: str, status: str) -> float:
    return sample(REQUESTS, route=route, model=model, status=status)


def pipeline_samples(model: str, op: str) -> dict[str, float]:
    """Every per-item and per-batch metric of one model x op."""
    labels = model_op(model, op)
    return {
        name: sample(name, **labels)
        for name in (QUEUE_WAIT, BATCHES, BATCHED_ITEMS, FORWARDS, TOKENS)
    }


def cache_samples() -> dict[str, float]:
    return {
        result: sample("tokserve_cache_requests_total", result=result)
        for result in ("hit", "miss", "error")
    }


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each sample changed."""
    return {name: after[name] - before[name] for name in before}


def request_label_sets() -> Iterator[dict[str, str]]:
    """The labels of every tokserve_request_duration_seconds series in the registry."""
    for family in REGISTRY.collect():
        if family.name == "tokserve_request_duration_seconds":
            for series in family.samples:
                if series.name == REQUESTS:
                    yield series.labels


async def encode(client: httpx.AsyncClient, image: bytes) -> httpx.Response:
    response = await client.post(f"{ENCODE_ROUTE}?model={IMAGE}&resize=crop", content=image)
    await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
    return response


async def test_encode_miss_moves_every_pipeline_metric_once_and_a_hit_moves_none(
    client: httpx.AsyncClient,
) -> None:
    image = png_bytes(seed=401)
    pipeline, cache = pipeline_samples(IMAGE, "encode"), cache_samples()
    answered = requests(ENCODE_ROUTE, IMAGE, "2xx")

    miss = await encode(client, image)
    assert miss.status_code == 200 and miss.json()["items"][0]["cached"] is False
    assert requests(ENCODE_ROUTE, IMAGE, "2xx") == answered + 1
    assert moved(pipeline, pipeline_samples(IMAGE, "encode")) == {
        QUEUE_WAIT: 1,
        BATCHES: 1,
        BATCHED_ITEMS: 1,
        FORWARDS: 1,
        TOKENS: GRID_TOKENS,
    }
    assert moved(cache, cache_samples()) == {"hit": 0, "miss": 1, "error": 0}

    pipeline, cache = pipeline_samples(IMAGE, "encode"), cache_samples()
    hit = await encode(client, image)
    assert hit.status_code == 200 and hit.json()["items"][0]["cached"] is True
    assert requests(ENCODE_ROUTE, IMAGE, "2xx") == answered + 2
    assert moved(pipeline, pipeline_samples(IMAGE, "encode")) == dict.fromkeys(pipeline, 0)
    assert moved(cache, cache_samples()) == {"hit": 1, "miss": 0, "error": 0}
    assert sample("tokserve_queue_depth", **model_op(IMAGE, "encode")) == 0


async def test_a_three_image_request_counts_three_items_and_tokens_in_its_batches(
    client: httpx.AsyncClient,
) -> None:
    files = [("files", (f"{i}.png", png_bytes(seed=410 + i), "image/png")) for i in range(3)]
    before, cache = pipeline_samples(IMAGE, "encode"), cache_samples()
    response = await client.post(ENCODE_ROUTE, files=files)
    assert response.status_code == 200
    change = moved(before, pipeline_samples(IMAGE, "encode"))
    assert change[QUEUE_WAIT] == 3 and change[BATCHED_ITEMS] == 3
    assert 1 <= change[BATCHES] <= 3 and change[FORWARDS] == change[BATCHES]
    assert change[TOKENS] == 3 * GRID_TOKENS
    assert moved(cache, cache_samples()) == {"hit": 0, "miss": 3, "error": 0}


async def test_decode_counts_the_tokens_it_consumed_and_skips_the_cache(
    client: httpx.AsyncClient,
) -> None:
    grid = np.random.default_rng(420).integers(0, 1000, (8, 8)).tolist()
    before, cache = pipeline_samples(IMAGE, "decode"), cache_samples()
    answered = requests("/v1/images/decode", IMAGE, "2xx")
    response = await client.post("/v1/images/decode", json={"model": IMAGE, "tokens": grid})
    assert response.status_code == 200
    assert requests("/v1/images/decode", IMAGE, "2xx") == answered + 1
    assert moved(before, pipeline_samples(IMAGE, "decode")) == {
        QUEUE_WAIT: 1,
        BATCHES: 1,
        BATCHED_ITEMS: 1,
        FORWARDS: 1,
        TOKENS: GRID_TOKENS,
    }
    assert moved(cache, cache_samples()) == dict.fromkeys(cache, 0)  # decode is not cached


async def test_a_refused_upload_is_a_4xx_of_its_route_and_model_and_computes_nothing(
    client: httpx.AsyncClient,
) -> None:
    before = pipeline_samples(IMAGE, "encode")
    refused = requests(ENCODE_ROUTE, IMAGE, "4xx")
    response = await encode(client, b"not an image at all")
    assert response.status_code == 415
    assert requests(ENCODE_ROUTE, IMAGE, "4xx") == refused + 1
    assert moved(before, pipeline_samples(IMAGE, "encode")) == dict.fromkeys(before, 0)


async def test_unknown_paths_and_models_share_constant_labels(client: httpx.AsyncClient) -> None:
    unmatched = requests("unmatched", "", "4xx")
    unknown_model = requests(ENCODE_ROUTE, "", "4xx")
    assert (await client.get("/nope/123")).status_code == 404
    assert (await client.post("/nope/456?x=1", content=b"x")).status_code == 404
    response = await client.post(f"{ENCODE_ROUTE}?model=evil-{'9' * 40}", content=png_bytes())
    assert response.status_code == 404
    assert requests("unmatched", "", "4xx") == unmatched + 2
    assert requests(ENCODE_ROUTE, "", "4xx") == unknown_model + 1

    app = client.app  # type: ignore[attr-defined]
    # the API's templates, the docs' own routes, and the one label of everything unmatched
    documented = {getattr(route, "path", None) for route in app.routes}
    templates = set(app.openapi()["paths"]) | documented | {"unmatched"}
    for labels in request_label_sets():
        assert labels["route"] in templates, labels
        assert not labels["model"].startswith("evil-"), labels  # only served models name series
        assert labels["status"] in {"1xx", "2xx", "3xx", "4xx", "5xx"}, labels


def audio_decode_body(seed: int, frames: int) -> bytes:
    """A msgpack decode request of random ids; distinct seeds are distinct requests, which
    matters because identical requests in flight are computed once."""
    shape = (TINY_AUDIO["arch"]["codebooks"], frames)
    tokens = np.random.default_rng(seed).integers(0, 64, shape).astype("<i4")
    item = {"dtype": "<i4", "shape": list(shape), "data": tokens.tobytes()}
    return msgpack.packb({"model": AUDIO, "tokens": item})


async def test_a_full_queue_answers_503_counted_as_queue_full_and_never_computed(
    repo: Path,
) -> None:
    frames, headers = 400, {"Content-Type": "application/msgpack"}
    settings = settings_for(repo, max_queue=1, max_batch_size=1)
    async with served(settings) as client:
        before = pipeline_samples(AUDIO, "decode")
        rejected = sample("tokserve_rejected_total", reason="queue_full")
        overloaded = requests("/v1/audio/decode", AUDIO, "5xx")
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/audio/decode", content=audio_decode_body(430 + i, frames), headers=headers
                )
                for i in range(8)
            )
        )
    statuses = sorted(response.status_code for response in answers)
    computed = statuses.count(200)
    refused = [response for response in answers if response.status_code == 503]
    assert refused and computed and computed + len(refused) == 8, statuses
    assert all(response.headers["retry-after"] == "1" for response in refused)
    assert sample("tokserve_rejected_total", reason="queue_full") == rejected + len(refused)
    assert requests("/v1/audio/decode", AUDIO, "5xx") == overloaded + len(refused)
    assert moved(before, pipeline_samples(AUDIO, "decode")) == {
        QUEUE_WAIT: computed,
        BATCHES: computed,
        BATCHED_ITEMS: computed,
        FORWARDS: computed,
        TOKENS: computed * TINY_AUDIO["arch"]["codebooks"] * frames,
    }


async def test_model_and_build_info_are_exposed(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
    for name, model in models.items():
        labels = {
            "model": name,
            "backend": "native",
            "modality": model["modality"],
            "version": model["version"],
            "device": "cpu",
        }
        assert sample("tokserve_model_info", **labels) == 1
    build = next(f for f in REGISTRY.collect() if f.name == "tokserve_build")
    (series,) = build.samples
    assert series.value == 1 and {"version", "python", "torch"} <= set(series.labels)
    assert "tokserve_build_info{" in text and "tokserve_model_info{" in text


@pytest.mark.skipif(sys.platform != "linux", reason="process metrics read /proc")
async def test_process_metrics_are_exposed(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    assert "process_cpu_seconds_total " in text
    assert "process_resident_memory_bytes " in text


async def test_a_requests_duration_is_observed_once_within_the_time_its_client_waited(
    client: httpx.AsyncClient,
) -> None:
    labels = {"route": "/v1/models", "model": "", "status": "2xx"}
    count = sample(REQUESTS, **labels)
    total = sample("tokserve_request_duration_seconds_sum", **labels)
    start = time.perf_counter()
    assert (await client.get("/v1/models")).status_code == 200
    waited = time.perf_counter() - start
    assert sample(REQUESTS, **labels) == count + 1
    assert 0 < sample("tokserve_request_duration_seconds_sum", **labels) - total <= waited


async def test_an_unexpected_error_is_counted_as_a_5xx_of_its_route(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that escapes every handler still leaves its request in the metrics (the only way
    to get one is to put it there: no input makes a route raise one)."""

    def broken(model: str | None = None) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app.state.engine, "image", broken)  # type: ignore[attr-defined]
    failed = requests(ENCODE_ROUTE, "", "5xx")
    with pytest.raises(RuntimeError, match="a bug"):  # the in-process client re-raises it
        await client.post(ENCODE_ROUTE, content=png_bytes())
    assert requests(ENCODE_ROUTE, "", "5xx") == failed + 1


ITEM_ERRORS = "tokserve_item_errors_total"
DASHBOARD = Path(__file__).resolve().parent.parent / "docker/grafana/dashboards/tokserve.json"
# labels Prometheus adds to every scraped series; the exposition does not hold them
TARGET_LABELS = {"instance", "job"}


def item_errors(model: str, op: str) -> dict[str, float]:
    """Every status's count of failed items of one model x op."""
    statuses = ("400", "413", "415", "422", "503", "504")
    return {status: sample(ITEM_ERRORS, model=model, op=op, status=status) for status in statuses}


async def test_each_failed_item_is_counted_once_by_model_op_and_its_status(
    client: httpx.AsyncClient,
) -> None:
    before = item_errors(IMAGE, "encode")
    files = [
        ("files", ("good.png", png_bytes(seed=430), "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
    ]
    assert (await client.post(ENCODE_ROUTE, files=files)).status_code == 207
    assert moved(before, item_errors(IMAGE, "encode")) == {**dict.fromkeys(before, 0), "415": 1}

    before = item_errors(IMAGE, "decode")
    grids = [np.zeros((8, 8), int).tolist(), np.full((8, 8), 10**6).tolist()]
    answer = await client.post("/v1/images/decode", json={"model": IMAGE, "tokens": grids})
    assert answer.status_code == 207
    assert moved(before, item_errors(IMAGE, "decode")) == {**dict.fromkeys(before, 0), "422": 1}


async def test_a_request_refused_whole_counts_no_failed_item(client: httpx.AsyncClient) -> None:
    before = item_errors(IMAGE, "encode")
    assert (await client.post(ENCODE_ROUTE, content=b"")).status_code == 400
    assert (await client.post(f"{ENCODE_ROUTE}?model=nope", content=png_bytes())).status_code == 404
    assert moved(before, item_errors(IMAGE, "encode")) == dict.fromkeys(before, 0)


def scraped_series(text: str) -> dict[str, dict[str, set[str]]]:
    """Each sample name of an exposition -> its label names -> the values seen."""
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for point in family.samples:
            labels = series.setdefault(point.name, {})
            for label, value in point.labels.items():
                labels.setdefault(label, set()).add(value)
    return series


async def test_every_dashboard_panel_charts_series_the_server_exports_after_real_requests(
    client: httpx.AsyncClient,
) -> None:
    image = png_bytes(seed=440)
    await encode(client, image)  # a miss, computed and cached
    await encode(client, image)  # a hit
    files = [("files", (f"{i}.png", png_bytes(seed=441 + i), "image/png")) for i in range(2)]
    files.append(("files", ("bad.png", b"not an image", "image/png")))
    assert (await client.post(ENCODE_ROUTE, files=files)).status_code == 207  # a failed item
    late = await client.post(
        ENCODE_ROUTE, content=png_bytes(seed=445), headers={"X-Request-Timeout": "1e-9"}
    )
    assert late.status_code == 504  # a rejection
    exported = scraped_series((await client.get("/metrics")).text)

    panels = json.loads(DASHBOARD.read_text())["panels"]
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\btokserve_\w+", expr)
            assert names or "up{" in expr, f"{panel['title']}: charts no tokserve series"
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not exported"
            for name, selector in re.findall(r"\b(tokserve_\w+)\{([^}]*)\}", expr):
                for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
                    assert label in exported[name], f"{panel['title']}: {name} has no {label}"
                    if op == "=":
                        assert value in exported[name][label], f"{panel['title']}: {label}={value}"
            grouped = {
                label.strip()
                for labels in re.findall(r"\bby\s*\(([^)]*)\)", expr)
                for label in labels.split(",")
            }
            for label in grouped - TARGET_LABELS:
                assert any(label in exported[name] for name in names), (
                    f"{panel['title']}: no series of {names} has the label {label}"
                )
