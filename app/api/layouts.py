"""GET /v1/layouts: the LLM sequence layouts loaded (tokserve_client.layouts), with id ranges."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from tokserve_client.layouts import Layout

from app.api.deps import EngineDep, require_api_key
from app.api.responses import LayoutFields, response_format
from app.api.schemas import LayoutEntry, LayoutsResponse, problems
from app.engine import Engine
from app.errors import NotFound, Unprocessable

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


def layout_named(engine: Engine, name: str) -> Layout:
    """The loaded layout ``name``; 404 naming the loaded ones."""
    layout = engine.registry.layouts.get(name)
    if layout is None:
        raise NotFound(
            f"Unknown layout {name!r}; loaded layouts: {sorted(engine.registry.layouts)}."
        )
    return layout


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
    return describe(layout_named(engine, name))


def layout_fields(
    request: Request,
    engine: Engine,
    name: str | None,
    model: str,
    window_s: float | None = None,
    overlap_s: float = 0.0,
) -> LayoutFields | None:
    """What ``?layout=NAME`` adds to each encoded item of ``model``: its span of ids in that
    layout (``ids``). With ``window_s``, the clip comes in windows of that many seconds
    overlapping by ``overlap_s`` (``windows``), each its own span (or, without a layout, its
    own tokens), so that each fits a context; an overlap of a window or more advances one frame
    at a time. Checked before any work: an unknown layout (404), one that does not cover the
    model, or an npy answer with either (422)."""
    if name is None and window_s is None:
        return None
    layout = layout_named(engine, name) if name is not None else None
    if layout is not None and model not in layout.media:
        raise Unprocessable(
            f"Layout {name!r} does not cover model {model}; it covers {sorted(layout.media)}."
        )
    if response_format(request) == "npy":
        raise Unprocessable(
            "layout and window_s add to each item what application/x-npy cannot carry; ask "
            "for JSON or msgpack."
        )

    def span(tokens: np.ndarray) -> dict[str, Any]:
        if layout is None:
            return {"tokens": tokens.tolist()}
        return {"ids": layout.to_ids(model, tokens).tolist()}

    if window_s is None:
        return span
    frame_rate = engine.audio(model).frame_rate
    width = max(1, round(window_s * frame_rate))
    step = max(1, width - round(overlap_s * frame_rate))  # windows advance a frame at least

    def windows(tokens: np.ndarray) -> dict[str, Any]:
        cut, start = [], 0
        while True:
            part = tokens[:, start : start + width]
            cut.append(
                {
                    "start_s": round(start / frame_rate, 6),
                    "duration_s": round(part.shape[1] / frame_rate, 6),
                    **span(part),
                }
            )
            if start + width >= tokens.shape[1]:
                return {"windows": cut}
            start += step

    return windows
