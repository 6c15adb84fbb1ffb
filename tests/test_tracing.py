"""OpenTelemetry traces of real requests: the request's span and a child span per stage (body
read, cache lookup and store, media decode and encode, queue wait, response encoding), forward
spans linked to the requests of their batch; kept in memory by the SDK, or sent over OTLP/HTTP
to a collector listening on a loopback port."""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import Settings
from app.main import create_app
from tests.support import png_bytes, served, settings_for, tiny_layout, wav_bytes

IMAGE = "tiny-image"
ENCODE = f"/v1/images/encode?model={IMAGE}"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Traced:
    """The finished spans of one app, as its SDK tracer provider kept them."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter

    def request(self, request_id: str) -> ReadableSpan:
        """The server span of the request with this id."""
        (span,) = [
            span
            for span in self.exporter.get_finished_spans()
            if span.kind is SpanKind.SERVER
            and (span.attributes or {}).get("tokserve.request_id") == request_id
        ]
        return span

    def children(self, parent: ReadableSpan) -> dict[str, list[ReadableSpan]]:
        """The spans whose parent is ``parent``, by name."""
        named: dict[str, list[ReadableSpan]] = {}
        for span in self.exporter.get_finished_spans():
            if span.parent is not None and span.parent.span_id == parent.context.span_id:
                named.setdefault(span.name, []).append(span)
        return named

    def forwards_of(self, request: ReadableSpan) -> list[ReadableSpan]:
        """The forward spans with a link to ``request``."""
        return [
            span
            for span in self.exporter.get_finished_spans()
            if span.name == "forward"
            and any(link.context.span_id == request.context.span_id for link in span.links)
        ]


@asynccontextmanager
async def traced(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Traced]]:
    """The app, its spans kept in memory by a real SDK provider; a client of it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with served(settings, create_app(settings, tracer_provider=provider)) as client:
        yield client, Traced(exporter)
    provider.shutdown()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def names(children: dict[str, list[ReadableSpan]]) -> dict[str, int]:
    """How many spans of each name."""
    return {name: len(spans) for name, spans in children.items()}


async def test_an_encode_is_a_request_span_with_a_child_span_for_each_stage(repo: Path) -> None:
    files = [("files", (f"{i}.png", png_bytes(seed=900 + i), "image/png")) for i in range(2)]
    async with traced(settings_for(repo)) as (client, spans):
        answer = await client.post(ENCODE, files=files, headers={"X-Request-Id": "enc-1"})
        await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
    assert answer.status_code == 200
    request = spans.request("enc-1")
    assert request.name == "POST /v1/images/encode"
    assert attributes(request)["tokserve.model"] == IMAGE
    assert attributes(request)["http.response.status_code"] == 200
    stages = spans.children(request)
    assert names(stages) == {
        "body.read": 1,
        "cache.lookup": 1,
        "media.decode": 2,
        "queue.wait": 2,
        "response.encode": 1,
        "cache.store": 1,
    }
    assert attributes(stages["body.read"][0]) == {"tokserve.items": 2}
    assert attributes(stages["cache.lookup"][0]) == {"tokserve.items": 2, "tokserve.hits": 0}
    assert attributes(stages["cache.store"][0]) == {"tokserve.items": 2}
    for wait in stages["queue.wait"]:
        assert attributes(wait) == {"tokserve.model": IMAGE, "tokserve.op": "encode"}
    for stage in stages.values():
        assert all(span.status.status_code is StatusCode.UNSET for span in stage)


async def test_each_forward_of_a_requests_items_is_a_span_linked_to_the_request(
    repo: Path,
) -> None:
    files = [("files", (f"{i}.png", png_bytes(seed=910 + i), "image/png")) for i in range(3)]
    async with traced(settings_for(repo)) as (client, spans):
        answer = await client.post(ENCODE, files=files, headers={"X-Request-Id": "fwd-1"})
    assert answer.status_code == 200
    request = spans.request("fwd-1")
    forwards = spans.forwards_of(request)
    assert 1 <= len(forwards) <= 3
    assert sum(attributes(span)["tokserve.batch_size"] for span in forwards) == 3
    waited = sorted(wait.end_time or 0 for wait in spans.children(request)["queue.wait"])
    forwarded = 0
    for forward in sorted(forwards, key=lambda span: span.start_time or 0):
        assert forward.parent is None  # a batch is its own trace: it serves several requests
        assert forward.context.trace_id != request.context.trace_id
        assert attributes(forward)["tokserve.model"] == IMAGE
        assert attributes(forward)["tokserve.op"] == "encode"
        assert attributes(forward)["tokserve.request_ids"] == ("fwd-1",)
        forwarded += attributes(forward)["tokserve.batch_size"]
        # its items' waits ended when it took them
        assert waited[forwarded - 1] <= (forward.start_time or 0)


async def test_a_cache_hit_is_answered_without_media_queue_or_forward_spans(repo: Path) -> None:
    image = png_bytes(seed=920)
    async with traced(settings_for(repo)) as (client, spans):
        await client.post(ENCODE, content=image)
        await client.app.state.engine.pipeline.flush()  # type: ignore[attr-defined]
        answer = await client.post(ENCODE, content=image, headers={"X-Request-Id": "hit-1"})
    assert answer.json()["items"][0]["cached"] is True
    request = spans.request("hit-1")
    stages = spans.children(request)
    assert names(stages) == {"body.read": 1, "cache.lookup": 1, "response.encode": 1}
    assert attributes(stages["cache.lookup"][0]) == {"tokserve.items": 1, "tokserve.hits": 1}
    assert spans.forwards_of(request) == []


async def test_a_decode_encodes_its_file_in_a_span_and_forwards_as_decode(repo: Path) -> None:
    grid = np.random.default_rng(930).integers(0, 1000, (8, 8)).tolist()
    async with traced(settings_for(repo)) as (client, spans):
        answer = await client.post(
            "/v1/images/decode",
            json={"model": IMAGE, "tokens": grid},
            headers={"X-Request-Id": "d"},
        )
    assert answer.status_code == 200
    request = spans.request("d")
    assert request.name == "POST /v1/images/decode"
    assert attributes(request)["tokserve.model"] == IMAGE
    stages = spans.children(request)
    assert names(stages) == {
        "body.read": 1,
        "queue.wait": 1,
        "media.encode": 1,
        "response.encode": 1,
    }
    (forward,) = spans.forwards_of(request)
    assert attributes(forward)["tokserve.op"] == "decode"


async def test_an_unreadable_item_fails_its_media_decode_span_and_the_others_go_on(
    repo: Path,
) -> None:
    files = [
        ("files", ("good.png", png_bytes(seed=940), "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
    ]
    async with traced(settings_for(repo)) as (client, spans):
        answer = await client.post(ENCODE, files=files, headers={"X-Request-Id": "bad-1"})
    assert answer.status_code == 207
    decodes = spans.children(spans.request("bad-1"))["media.decode"]
    assert sorted(span.status.status_code.name for span in decodes) == ["ERROR", "UNSET"]
    (failed,) = [span for span in decodes if span.status.status_code is StatusCode.ERROR]
    assert [event.name for event in failed.events] == ["exception"]


async def test_a_sequences_image_and_clip_decode_at_once_each_in_a_span_of_its_model(
    repo: Path, tmp_path: Path
) -> None:
    settings = settings_for(repo, layout_dir=str(tiny_layout(tmp_path / "layouts", repo)))
    async with traced(settings) as (client, spans):
        grid = (await client.post(ENCODE, content=png_bytes(seed=950))).json()["items"][0]
        clip = await client.post("/v1/audio/encode", content=wav_bytes(seconds=0.3))
        layout = client.app.state.engine.registry.layouts["tiny"]  # type: ignore[attr-defined]
        image_ids = layout.to_ids(IMAGE, np.array(grid["tokens"])).tolist()
        clip_ids = layout.to_ids("tiny-audio", np.array(clip.json()["items"][0]["tokens"]))
        body = {"layout": "tiny", "ids": [5, *image_ids, 6, *clip_ids.tolist()]}
        answer = await client.post(
            "/v1/sequences/decode", json=body, headers={"X-Request-Id": "seq-1"}
        )
    assert answer.status_code == 200
    decodes = spans.children(spans.request("seq-1"))["sequence.decode"]
    assert sorted(attributes(span)["tokserve.model"] for span in decodes) == [
        "tiny-audio",
        IMAGE,
    ]
    # one model's spans are not waited for before the next model's start
    assert max(span.start_time or 0 for span in decodes) < min(
        span.end_time or 0 for span in decodes
    )


async def test_a_request_with_a_traceparent_continues_the_callers_trace(repo: Path) -> None:
    async with traced(settings_for(repo)) as (client, spans):
        await client.get("/healthz", headers={"traceparent": TRACEPARENT, "X-Request-Id": "tp"})
    request = spans.request("tp")
    assert f"{request.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert request.parent is not None and f"{request.parent.span_id:016x}" == "b7ad6b7169203331"


async def test_without_an_otlp_endpoint_nothing_is_recorded(repo: Path) -> None:
    async with served(settings_for(repo, warmup=False)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        assert client.app.state.exports_traces is False  # type: ignore[attr-defined]
        assert not engine.tracer.start_span("probe").is_recording()


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on a loopback port: each POST to /v1/traces, decoded."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.exports.append(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads what arrived."""

        super().__init__(("127.0.0.1", 0), Receive)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, with its resource's attributes."""
        return [
            ({kv.key: kv.value.string_value for kv in batch.resource.attributes}, span)
            for export in self.exports
            for batch in export.resource_spans
            for scope in batch.scope_spans
            for span in scope.spans
        ]


@contextmanager
def collecting() -> Iterator[Collector]:
    collector = Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        collector.shutdown()
        collector.server_close()


async def test_spans_are_sent_over_otlp_http_to_the_standard_endpoint_variable(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with collecting() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        settings = settings_for(repo)
        assert settings.otel_endpoint == collector.url
        async with served(settings) as client:
            answer = await client.post(
                ENCODE, content=png_bytes(seed=950), headers={"X-Request-Id": "o-1"}
            )
            assert answer.status_code == 200
        # the lifespan's end sent what the batch processor still held
        received = collector.spans()
    assert received, "no span reached the collector"
    assert {resource["service.name"] for resource, _ in received} == {"tokserve"}
    by_name = {span.name: span for _, span in received}
    assert {
        "POST /v1/images/encode",
        "body.read",
        "cache.lookup",
        "media.decode",
        "queue.wait",
        "forward",
        "response.encode",
    } <= set(by_name)
    request = by_name["POST /v1/images/encode"]
    request_attributes = {kv.key: kv.value for kv in request.attributes}
    assert request_attributes["tokserve.request_id"].string_value == "o-1"
    assert request_attributes["tokserve.model"].string_value == IMAGE
    assert by_name["body.read"].parent_span_id == request.span_id
    assert [link.span_id for link in by_name["forward"].links] == [request.span_id]


def test_an_otlp_endpoint_without_the_otel_extra_refuses_to_start_naming_the_extra(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what `import` finds when the package is not installed
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ValueError) as refused:
        create_app(settings_for(repo, otel_endpoint="http://127.0.0.1:4318"))
    assert str(refused.value) == (
        "an OTLP endpoint is set (http://127.0.0.1:4318: TOKSERVE_OTEL_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT), but the OpenTelemetry SDK is not installed: "
        "pip install 'tokserve[otel]', or unset the endpoint"
    )
