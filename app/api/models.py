"""GET /v1/models: what is loaded, with every figure a client needs to use it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from app.api.common import ServicesDep, require_api_key
from app.api.schemas import ModelsResponse
from app.errors import NotFound

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("", response_model=ModelsResponse, summary="Loaded models")
async def list_models(services: ServicesDep) -> dict[str, Any]:
    return {"models": [m.describe() for m in services.registry.models.values()]}


@router.get("/{name}", summary="One model")
async def get_model(name: str, services: ServicesDep) -> dict[str, Any]:
    model = services.registry.models.get(name)
    if model is None:
        raise NotFound(f"Unknown model {name!r}; loaded models: {services.registry.names()}.")
    return model.describe()
