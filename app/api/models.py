"""GET /v1/models: what is loaded, with every figure a client needs to use it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from app.api.deps import EngineDep, require_api_key
from app.api.schemas import ModelsResponse, problems, ref
from app.errors import NotFound

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


LIMITS = (
    "max_items",
    "max_body_bytes",
    "max_image_pixels",
    "max_audio_seconds",
    "max_request_audio_seconds",
    "min_audio_sample_rate",
    "max_decode_tokens",
)


@router.get(
    "",
    response_model=None,
    summary="Loaded models and request limits",
    responses={200: {"model": ModelsResponse, "description": "Every loaded model, and limits"}},
)
async def list_models(engine: EngineDep) -> dict[str, Any]:
    """Each loaded model, and the limits a client splits its work by."""
    settings = engine.settings
    return {
        "models": [m.describe() for m in engine.registry.models.values()],
        "limits": {name: getattr(settings, name) for name in LIMITS},
    }


ONE_MODEL = {
    "oneOf": [ref("ImageModel"), ref("AudioModel")],
    "discriminator": {
        "propertyName": "modality",
        "mapping": {"image": ref("ImageModel")["$ref"], "audio": ref("AudioModel")["$ref"]},
    },
}


@router.get(
    "/{name}",
    response_model=None,
    summary="One model",
    responses={
        200: {"description": "The model", "content": {"application/json": {"schema": ONE_MODEL}}},
        **problems(404),
    },
)
async def get_model(name: str, engine: EngineDep) -> dict[str, Any]:
    model = engine.registry.models.get(name)
    if model is None:
        raise NotFound(f"Unknown model {name!r}; loaded models: {engine.registry.names()}.")
    return model.describe()
