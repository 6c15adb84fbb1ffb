"""OpenTelemetry tracing: off unless an OTLP endpoint is configured (TOKSERVE_OTEL_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT), then exported over OTLP/HTTP with the `otel` extra's SDK.

FastAPI opens each request's span; tokserve's stages are its children (docs/observability.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import trace

from app.config import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACER_NAME = "tokserve"


def otlp_tracer_provider(settings: Settings, version: str) -> TracerProvider | None:
    """A provider that batches spans to ``{otel_endpoint}/v1/traces``; None when no endpoint is
    set. Raises ValueError when one is set but the `otel` extra is not installed."""
    if not settings.otel_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(
            f"an OTLP endpoint is set ({settings.otel_endpoint}: TOKSERVE_OTEL_ENDPOINT or "
            "OTEL_EXPORTER_OTLP_ENDPOINT), but the OpenTelemetry SDK is not installed: "
            "pip install 'tokserve[otel]', or unset the endpoint"
        ) from exc
    resource = Resource.create({"service.name": "tokserve", "service.version": version})
    provider = TracerProvider(resource=resource)
    endpoint = settings.otel_endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def tokserve_tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    """The tracer of tokserve's spans: from ``provider``, else the process's global provider (a
    no-op unless something, such as opentelemetry-instrument, set one)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)
