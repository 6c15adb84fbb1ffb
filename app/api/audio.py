"""POST /v1/audio/encode and /v1/audio/decode."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.deps import EngineDep, deadline_of, label_model, require_api_key
from app.api.layouts import decode_items, layout_fields
from app.api.requests import cancel_on_disconnect, read_media_items
from app.api.responses import media_response, tokens_response
from app.api.schemas import (
    AUDIO_TYPES,
    decode_body,
    encode_body,
    item_answers,
    problems,
)

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Depends(require_api_key)])
AudioFormat = Literal["wav", "flac", "ogg"]


@router.post(
    "/encode",
    response_class=Response,
    summary="Audio to codebook tokens",
    responses={
        **item_answers("AudioEncodeResponse", "AudioEncodeMsgpack", npy=True),
        **problems(400, 404, 413, 415, 422, 503, 504),
    },
    openapi_extra=encode_body("audio"),
)
async def encode_audio(
    request: Request,
    engine: EngineDep,
    model: Annotated[
        str | None, Query(description="Model name; default: first audio model")
    ] = None,
    codebooks: Annotated[
        int | None, Query(ge=1, description="Return only the first k codebooks (coarser, fewer)")
    ] = None,
    layout: Annotated[
        str | None,
        Query(description="A loaded layout (GET /v1/layouts): each item also gets its `ids` there"),
    ] = None,
    window_s: Annotated[
        float | None,
        Query(gt=0, le=3600, description="The clip in windows of this length (spans with layout)"),
    ] = None,
    overlap_s: Annotated[
        float, Query(ge=0, le=3600, description="With window_s: how much windows overlap")
    ] = 0.0,
    report: Annotated[
        bool,
        Query(
            description="Each item also gets `quality`: its reconstruction's SNR and mel distance"
        ),
    ] = False,
) -> Response:
    """WAV, FLAC, MP3, OGG, M4A/MP4 or WebM bytes, multipart files or JSON base64 -> tokens
    [K][F] per clip."""
    endpoint = engine.audio(model)
    label_model(request, endpoint.model.name)
    endpoint.check_codebooks(codebooks)
    endpoint.check_report(report)
    in_layout = layout_fields(request, engine, layout, endpoint.model.name, window_s, overlap_s)
    with engine.tracer.start_as_current_span("body.read") as reading:
        clips = await read_media_items(request, engine, "audio")
        reading.set_attribute("tokserve.items", len(clips))
    deadline = deadline_of(request, engine)
    answer = await cancel_on_disconnect(
        request, endpoint.encode(clips, codebooks, deadline, report)
    )
    with engine.tracer.start_as_current_span("response.encode"):
        return tokens_response(request, answer, single=len(clips) == 1, in_layout=in_layout)


@router.post(
    "/decode",
    response_class=Response,
    summary="Codebook tokens to audio",
    responses={
        **item_answers("DecodedAudios", "DecodedAudiosMsgpack", files=AUDIO_TYPES),
        **problems(400, 404, 413, 422, 503, 504),
    },
    openapi_extra=decode_body("audio"),
)
async def decode_audio(
    request: Request,
    engine: EngineDep,
    model: Annotated[str | None, Query(description="Model name, if not in the body")] = None,
    fmt: Annotated[AudioFormat, Query(alias="format", description="Output format")] = "wav",
) -> Response:
    """One [k][F] array answers the audio file; a list answers JSON (or msgpack) items."""
    name, items, single = await decode_items(request, engine, model, "audio")
    endpoint = engine.audio(name)
    label_model(request, endpoint.model.name)
    deadline = deadline_of(request, engine)
    work = endpoint.decode(items, fmt, deadline, single)
    answer = await cancel_on_disconnect(request, work)
    with engine.tracer.start_as_current_span("response.encode"):
        return media_response(request, answer, single)
