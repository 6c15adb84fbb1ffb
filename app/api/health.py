"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.api.deps import EngineDep, require_api_key
from app.api.schemas import Health, Ready, problems
from app.errors import Overloaded

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=None,
    summary="Liveness: the process answers",
    responses={200: {"model": Health, "description": "The process answers"}},
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=None,
    summary="Readiness: models loaded and warmed up, not draining",
    responses={200: {"model": Ready, "description": "Ready"}, **problems(503)},
)
async def readyz(engine: EngineDep) -> dict[str, Any]:
    if not engine.ready or engine.drain.draining:
        state = "draining" if engine.drain.draining else "starting"
        raise Overloaded(f"Not ready: the server is {state}.", headers={"Retry-After": "1"})
    return {"status": "ready", "models": engine.registry.names()}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request, engine: EngineDep) -> Response:
    """With API keys set, a scraper sends one too unless TOKSERVE_PUBLIC_METRICS opens this."""
    if not engine.settings.public_metrics:
        await require_api_key(request, engine)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
