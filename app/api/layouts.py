"""GET /v1/layouts: the LLM sequence layouts loaded (app/layouts.py), with their id ranges."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends

from app.api.deps import EngineDep, require_api_key
from app.api.schemas import LayoutEntry, LayoutsResponse, problems
from app.errors import NotFound
from app.layouts import Layout

router = APIRouter(prefix="/v1/layouts", tags=["layouts"], dependencies=[Depends(require_api_key)])


def describe(layout: Layout) -> dict[str, Any]:
    """A layout as a client needs it: vocabulary, markers, each model's place and every range."""
    return {
        "name": layout.name,
        "description": layout.description,
        "source": layout.source,
        "vocab_size": layout.vocab_size,
        "text_vocab_size": layout.text_vocab_size,
        "markers": dict(layout.markers),
        "models": {
            name: {key: value for key, value in asdict(media).items() if key != "model"}
            for name, media in layout.media.items()
        },
        "ranges": [r._asdict() for r in layout.ranges],
    }


@router.get(
    "",
    response_model=None,
    summary="Loaded sequence layouts",
    responses={200: {"model": LayoutsResponse, "description": "Every loaded layout"}},
)
async def list_layouts(engine: EngineDep) -> dict[str, Any]:
    """Every layout whose models are loaded, with the id ranges it uses."""
    return {"layouts": [describe(layout) for layout in engine.registry.layouts.values()]}


@router.get(
    "/{name}",
    response_model=None,
    summary="One sequence layout",
    responses={200: {"model": LayoutEntry, "description": "The layout"}, **problems(404)},
)
async def get_layout(name: str, engine: EngineDep) -> dict[str, Any]:
    layout = engine.registry.layouts.get(name)
    if layout is None:
        raise NotFound(
            f"Unknown layout {name!r}; loaded layouts: {sorted(engine.registry.layouts)}."
        )
    return describe(layout)
