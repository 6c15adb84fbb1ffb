"""GET /v1/layouts: the LLM sequence layouts loaded (tokserve_client.layouts), with id ranges."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from tokserve_client.layouts import Layout, MediaLayout

from app.api.deps import EngineDep, require_api_key
from app.api.requests import TokenRequest, read_token_request
from app.api.responses import LayoutFields, response_format
from app.api.schemas import LayoutEntry, LayoutsResponse, problems
from app.engine import Engine
from app.errors import NotFound, ProblemError, Unprocessable

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


async def decode_items(
    request: Request, engine: Engine, model: str | None, modality: str
) -> tuple[str, list[Any], bool]:
    """A decode body read for ``modality``: the model it is for, its items as token arrays (a
    layout's spans mapped back, each failed one its problem), and whether it held one item."""
    endpoint_of = engine.image if modality == "image" else engine.audio
    with engine.tracer.start_as_current_span("body.read") as reading:
        body = await read_token_request(
            request, engine, lambda name: endpoint_of(name or model).item_shape
        )
        reading.set_attribute("tokserve.items", len(body.items))
    name = endpoint_of(span_model(engine, body, model, modality)).model.name
    return name, span_tokens(engine, body, name), body.single


def span_model(engine: Engine, body: TokenRequest, model: str | None, modality: str) -> str | None:
    """The model a decode is for: the one named (body or query) or, for spans of a layout's ids,
    the model whose opening marker starts the first span (or the layout's only ``modality``
    model). None leaves the choice to the route's default."""
    named = body.model or model
    if body.layout is None:
        return named
    layout = layout_named(engine, body.layout)
    if named is not None:
        if named not in layout.media:
            raise Unprocessable(
                f"Layout {layout.name!r} does not cover model {named}; it covers "
                f"{sorted(layout.media)}."
            )
        return named
    opens = {media.begin: media for media in layout.media.values()}
    first = body.items[0][0] if body.items and body.items[0] else None
    media = opens.get(first) if isinstance(first, int) else None
    if media is not None:
        if media.modality != modality:
            raise Unprocessable(
                f"The first span opens a span of {media.model}, an {media.modality} model: "
                f"decode it at /v1/{media.modality}/decode or /v1/sequences/decode."
            )
        return media.model
    ours = [name for name, m in layout.media.items() if m.modality == modality]
    if len(ours) == 1:
        return ours[0]
    raise Unprocessable(
        f"The first span does not open with the marker of a {modality} model of layout "
        f'{layout.name!r} (its {modality} models: {ours}); name the model with "model".'
    )


def span_tokens(engine: Engine, body: TokenRequest, model: str) -> list[Any]:
    """The items to decode: the body's token arrays, or each span of ids mapped back through
    the layout (a span that does not map back holds its problem, naming it and where)."""
    if body.layout is None:
        return body.items
    layout = layout_named(engine, body.layout)
    media = layout.media[model]
    opens = {m.begin: m.model for m in layout.media.values() if m.model != model}
    items: list[np.ndarray | ProblemError] = []
    for index, ids in enumerate(body.items):
        where = "ids" if body.single else f"ids[{index}]"
        items.append(_span_tokens(media, opens, ids, where))
    return items


def _span_tokens(
    media: MediaLayout, opens: dict[int, str], ids: list[Any], where: str
) -> np.ndarray | ProblemError:
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return Unprocessable(f"{where}: every id must be an integer.")
    if ids and ids[0] in opens:
        return Unprocessable(
            f"{where} opens a span of {opens[ids[0]]}, not of {media.model}: decode each model's "
            "spans in their own request, or a whole sequence at /v1/sequences/decode."
        )
    try:
        return media.from_ids(ids)
    except (ValueError, OverflowError) as exc:
        return Unprocessable(f"{where}: {exc}.")
