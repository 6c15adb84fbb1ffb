"""POST /v1/sequences/decode: what an LLM generated, text and media spans mixed, taken apart.

The sequence is cut into spans by a layout (tokserve_client.layouts); each media span is
decoded by its model (PNG/WebP/JPEG or WAV/FLAC/OGG; base64 in JSON, raw in msgpack), text
spans come back as id ranges, and a span that does not decode (not closed, a code out of range,
a ragged grid) carries its problem, with its position, while the others are answered: 207
when one failed.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import msgpack
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from tokserve_client.layouts import Span

from app.api.deps import EngineDep, deadline_of, require_api_key
from app.api.layouts import layout_named
from app.api.requests import cancel_on_disconnect
from app.api.responses import MSGPACK, MULTI_STATUS, problem_of, response_format
from app.api.schemas import (
    SequenceRequest,
    problems,
    span_answers,
)
from app.endpoints import Media
from app.errors import PayloadTooLarge, ProblemError, Unprocessable

router = APIRouter(
    prefix="/v1/sequences", tags=["sequences"], dependencies=[Depends(require_api_key)]
)


@router.post(
    "/decode",
    response_class=Response,
    summary="A generated sequence to its text and media spans",
    responses={**span_answers(), **problems(400, 404, 413, 422)},
)
async def decode_sequence(request: Request, body: SequenceRequest, engine: EngineDep) -> Response:
    """Each span in order: text as an id range, media decoded, or the span's problem."""
    layout = layout_named(engine, body.layout)
    limit = engine.settings.max_decode_tokens
    if len(body.ids) > limit:
        raise PayloadTooLarge(
            f"{len(body.ids)} ids in one sequence; at most {limit} (TOKSERVE_MAX_DECODE_TOKENS)."
        )
    spans = layout.split(body.ids)
    deadline = deadline_of(request, engine)
    results: dict[int, Media | ProblemError] = {}
    by_model: dict[str, list[int]] = {}
    for index, span in enumerate(spans):
        if span.model is not None and span.tokens is not None:
            by_model.setdefault(span.model, []).append(index)

    async def decode_model(model: str, indexes: list[int]) -> None:
        """One model's spans in one call, beside the other models' (a span of its own)."""
        endpoint = engine.endpoints[model]
        fmt = body.image_format if endpoint.model.modality == "image" else body.audio_format
        attributes: dict[str, str | int] = {"tokserve.model": model, "tokserve.spans": len(indexes)}
        with engine.tracer.start_as_current_span("sequence.decode", attributes=attributes):
            try:
                answer = await endpoint.decode([spans[i].tokens for i in indexes], fmt, deadline)
                results.update(zip(indexes, answer.items, strict=True))
            except ProblemError as exc:  # the model refuses them all (encode-only, too long)
                results.update((i, exc) for i in indexes)

    # the models' queues and instances are their own: an image's forward need not wait for a clip's
    work = asyncio.gather(*(decode_model(m, indexes) for m, indexes in by_model.items()))
    await cancel_on_disconnect(request, work)
    binary = response_format(request) == "msgpack"
    answered = [_span(span, results.get(i), binary) for i, span in enumerate(spans)]
    status = MULTI_STATUS if any("error" in span for span in answered) else 200
    content = {"layout": layout.name, "spans": answered}
    if binary:
        return Response(msgpack.packb(content), status, media_type=MSGPACK)
    return JSONResponse(content, status)


def _span(span: Span, result: Media | ProblemError | None, binary: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": span.kind, "start": span.start, "end": span.end}
    if span.kind == "text":
        return entry
    entry["model"] = span.model
    if result is None:
        result = Unprocessable(f"ids {span.start} to {span.end - 1}: {span.problem}.")
    if isinstance(result, ProblemError):
        return {**entry, "error": problem_of(result)}
    data = result.data if binary else base64.b64encode(result.data).decode()
    return {
        **entry,
        "data": data,
        "media_type": result.media_type,
        **result.figures,
        "cached": result.cached,
    }
