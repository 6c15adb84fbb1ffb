"""The FastAPI application: ``create_app(settings)`` and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import gc
import logging
import platform
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI
from opentelemetry.trace import TracerProvider

from app.api import audio, health, images, layouts, models, sequences, streams
from app.api.openapi import install_openapi, operation_id
from app.api.pages import install_pages
from app.api.problems import install_error_handlers
from app.config import Settings
from app.engine import Engine
from app.logs import configure_logging
from app.metrics import BUILD_INFO, MODEL_INFO
from app.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
)
from app.registry import ModelRegistry
from app.tracing import otlp_tracer_provider, tokserve_tracer

log = logging.getLogger("tokserve")


def package_version() -> str:
    try:
        return version("tokserve")
    except PackageNotFoundError:
        return "0+unknown"


def describe_models(registry: ModelRegistry) -> None:
    """tokserve_model_info: each loaded model's backend, modality, version and device."""
    for model in registry.models.values():
        MODEL_INFO.labels(model.name).info(
            {
                "backend": model.backend,
                "modality": model.modality,
                "version": model.version,
                "device": str(model.device),
            }
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build and start the engine (models, queues, cache, media pool); on shutdown drain it."""
    settings: Settings = app.state.settings
    preloaded: ModelRegistry | None = getattr(app.state, "registry", None)
    engine = await asyncio.to_thread(Engine.build, settings, preloaded, tracer=app.state.tracer)
    describe_models(engine.registry)
    app.state.engine = engine
    await engine.start()
    # What loading allocated (modules, weights) leaves the collector's generations: a full
    # collection then scans only what requests allocate, where it scanned the whole torch heap
    # with the GIL held and stalled the event loop (bench.soak's /healthz probe shows it).
    gc.freeze()
    try:
        yield
    finally:
        await engine.stop()
        if app.state.exports_traces:
            await asyncio.to_thread(app.state.tracer_provider.shutdown)  # sends what is left
        log.info("stopped")


def create_app(
    settings: Settings | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """Build the application; nothing is loaded until the lifespan starts. Spans go to
    ``tracer_provider`` if given (its owner shuts it down), else over OTLP when an endpoint is
    set (TOKSERVE_OTEL_ENDPOINT), else to the process's global provider (a no-op by default)."""
    settings = settings or Settings()
    configure_logging(settings)
    otlp = None if tracer_provider else otlp_tracer_provider(settings, package_version())
    tracer_provider = tracer_provider or otlp
    BUILD_INFO.info(
        {
            "version": package_version(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
    )
    app = FastAPI(
        title="tokserve",
        version=package_version(),
        summary="Images and audio to discrete tokens and back.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # app/api/pages.py serves them, with local assets and, where needed, behind the key
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # the request's span; tokserve's stages are its children, not FastAPI's operations'
        telemetry={
            "tracer_provider": tracer_provider,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    app.state.settings = settings
    app.state.tracer_provider = tracer_provider
    app.state.exports_traces = otlp is not None
    app.state.tracer = tokserve_tracer(tracer_provider)
    install_error_handlers(app)
    install_openapi(app)
    # with API keys, the API's description is not public unless TOKSERVE_PUBLIC_DOCS says so
    install_pages(app, docs_need_key=bool(settings.api_keys) and not settings.public_docs)
    routers = (images, audio, streams, models, layouts, sequences, health)
    for router in (module.router for module in routers):
        app.include_router(router)
    app.add_middleware(AdmissionMiddleware, max_in_flight=settings.max_in_flight)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    # outermost: the 413 and 503 answered by the middleware above carry the id too
    app.add_middleware(RequestIdMiddleware)
    return app
