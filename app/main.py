"""The FastAPI application: ``create_app(settings)`` and the lifespan that owns every resource."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import platform
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.api import audio, health, images, models
from app.api.common import require_api_key
from app.api.problems import install_error_handlers
from app.batching import Batcher
from app.cache import create_cache
from app.config import Settings
from app.logs import configure_logging
from app.metrics import BUILD_INFO, MODEL_INFO
from app.middleware import AdmissionMiddleware, BodyLimitMiddleware, MetricsMiddleware
from app.pipeline import Pipeline
from app.registry import ModelRegistry
from app.runner import AudioRunner, ImageRunner
from app.services import Services
from app.warmup import warm_up

log = logging.getLogger("tokserve")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (cgroup v2).

    os.cpu_count() is the node's cores: a pod limited to 4 CPUs on a 64-core node would decode
    64 images at once within a memory limit sized for a few.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the limit
    return cpus


def package_version() -> str:
    try:
        return version("tokserve")
    except PackageNotFoundError:
        return "0+unknown"


def build_runners(services: Services) -> None:
    """One runner and two batchers (encode, decode) per loaded model."""
    for model in services.registry.models.values():
        runner: ImageRunner | AudioRunner = (
            ImageRunner(model) if model.modality == "image" else AudioRunner(model)
        )
        services.runners[model.name] = runner
        for op, run_batch in (("encode", runner.encode_batch), ("decode", runner.decode_batch)):
            services.batchers[(model.name, op)] = Batcher(
                model.name,
                op,
                run_batch,
                max_batch_size=model.serving.max_batch_size,
                max_wait_ms=model.serving.max_wait_ms,
                max_queue=model.serving.max_queue,
            )
        MODEL_INFO.labels(model.name).info(
            {
                "backend": model.backend,
                "modality": model.modality,
                "version": model.version,
                "device": str(model.device),
            }
        )


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux: per thread; never lowers it)."""
    if hasattr(os, "setpriority"):
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, max(current, nice))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load models, start batchers and connect the cache; on shutdown drain, then release."""
    settings: Settings = app.state.settings
    preloaded: ModelRegistry | None = getattr(app.state, "registry", None)
    registry: ModelRegistry = (
        preloaded
        if preloaded is not None
        else await asyncio.to_thread(ModelRegistry.load, settings)
    )
    media_threads = max(2, usable_cpus())
    media_pool = ThreadPoolExecutor(
        max_workers=media_threads,
        thread_name_prefix="media",
        initializer=lower_priority,
        initargs=(settings.request_nice,),
    )
    cache = create_cache(settings)
    services = Services(
        settings=settings,
        registry=registry,
        cache=cache,
        # one request may take half the media threads: the rest stay free for the others
        pipeline=Pipeline(cache, media_pool, media_share=media_threads // 2),
        media_pool=media_pool,
    )
    build_runners(services)
    app.state.services = services
    for batcher in services.batchers.values():
        await batcher.start()
    lower_priority(settings.request_nice)  # the event loop's thread, once the model threads exist
    if settings.warmup:
        await asyncio.to_thread(warm_up, services)
    services.ready = True
    log.info("ready: %s", ", ".join(registry.names()) or "no models")
    try:
        yield
    finally:
        services.ready = False
        services.begin_drain()
        drain_s = services.drain_left_s()
        await asyncio.gather(*(b.stop(drain_s) for b in services.batchers.values()))
        await services.pipeline.flush()
        await cache.close()
        media_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")


def install_keyed_docs(app: FastAPI) -> None:
    """/openapi.json and /docs behind the API key (a browser needs a proxy adding the header)."""
    keyed = [Depends(require_api_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tokserve - API")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()
    configure_logging(settings)
    BUILD_INFO.info(
        {
            "version": package_version(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
    )
    docs_need_key = bool(settings.api_keys) and not settings.public_docs
    app = FastAPI(
        title="tokserve",
        version=package_version(),
        summary="Images and audio to discrete tokens and back.",
        lifespan=lifespan,
        # with API keys, the API's description is not public unless TOKSERVE_PUBLIC_DOCS says so
        openapi_url=None if docs_need_key else "/openapi.json",
        docs_url=None if docs_need_key else "/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    install_error_handlers(app)
    if docs_need_key:
        install_keyed_docs(app)
    for router in (images.router, audio.router, models.router, health.router):
        app.include_router(router)
    app.add_middleware(AdmissionMiddleware, max_in_flight=settings.max_in_flight)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    return app
