"""POST /v1/audio/encode and /v1/audio/decode."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.common import (
    ServicesDep,
    check_token_budget,
    key_bytes,
    off_loop,
    read_media_items,
    read_token_request,
    require_api_key,
    token_array,
    token_items,
    use_model,
)
from app.api.items import (
    file_fits,
    media_response,
    raw_bytes,
    run_items,
    token_fits,
    tokens_response,
)
from app.api.schemas import DECODE_BODY, ENCODE_BODY, AudioEncodeResponse, DecodedItems
from app.cache import Fits, canonical_params
from app.config import Settings
from app.errors import PayloadTooLarge, ProblemError, Unprocessable
from app.media import audio_header, decode_audio, encode_audio
from app.pipeline import Job, unchanged
from app.runner import AudioRunner

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Depends(require_api_key)])
AudioFormat = Literal["wav", "flac", "ogg"]
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}


def _wave_only(
    blob: bytes, sample_rate: int, channels: int, max_seconds: float, min_sample_rate: int
) -> torch.Tensor:
    return decode_audio(blob, sample_rate, channels, max_seconds, min_sample_rate)[0]


def _declared_seconds(blobs: list[bytes | ProblemError], min_rate: int) -> list[float | None]:
    """Each item's duration as its header declares it; None where unreadable or refused anyway
    (below the minimum rate: that item fails alone)."""
    seconds: list[float | None] = []
    for blob in blobs:
        header = audio_header(blob) if isinstance(blob, bytes) else None
        rate_ok = header is not None and header[0] >= min_rate
        seconds.append(header[1] / header[0] if header is not None and rate_ok else None)
    return seconds


def _check_request_seconds(total_s: float, settings: Settings, what: str) -> None:
    """Refuse a request whose items add up to more audio than MAX_REQUEST_AUDIO_SECONDS."""
    limit = settings.max_request_audio_seconds
    if total_s > limit:
        raise PayloadTooLarge(
            f"The request's items {what} {total_s:.1f} s of audio in all; at most {limit:g} s per "
            "request (TOKSERVE_MAX_REQUEST_AUDIO_SECONDS): split them into several requests."
        )


@router.post(
    "/encode",
    response_model=AudioEncodeResponse,
    summary="Audio to codebook tokens",
    openapi_extra=ENCODE_BODY("audio"),
)
async def encode_audio_route(
    request: Request,
    services: ServicesDep,
    model: Annotated[
        str | None, Query(description="Model name; default: first audio model")
    ] = None,
    codebooks: Annotated[
        int | None, Query(ge=1, description="Return only the first k codebooks (coarser, fewer)")
    ] = None,
) -> Response:
    """WAV/FLAC/OGG bytes, multipart files or JSON base64 -> tokens [K][F] per clip."""
    served = use_model(request, services.registry.get(model, "audio"))
    info = served.info
    settings = services.settings
    if codebooks is not None and codebooks > info.codebooks:
        raise Unprocessable(
            f"codebooks={codebooks}, but model {served.name} has {info.codebooks}; "
            f"ask for 1 to {info.codebooks}."
        )
    blobs = await read_media_items(request, services, "audio")
    declared = await off_loop(services, _declared_seconds, blobs, settings.min_audio_sample_rate)
    _check_request_seconds(sum(s for s in declared if s is not None), settings, "last")
    sample_rate = info.sample_rate or 24000
    frame_rate = info.frame_rate or 0.0
    job = Job(
        model=served,
        op="encode",
        batcher=services.batcher(served, "encode"),
        prepare=partial(
            _wave_only,
            sample_rate=sample_rate,
            channels=info.channels or 1,
            max_seconds=settings.max_audio_seconds,
            min_sample_rate=settings.min_audio_sample_rate,
        ),
        group=AudioRunner.encode_group,
        finish=unchanged,
    )

    def fits(index: int) -> Fits:
        # the clip's declared length, to the frame (resampling may round by one either way)
        seconds = declared[index] or 0.0
        expected = math.ceil(seconds * frame_rate)
        return token_fits(served, info.codebooks, (max(1, expected - 1), expected + 1))

    results = await run_items(request, services, job, blobs, raw_bytes, fits)
    figures = []
    for index, result in enumerate(results):
        tokens = result.array[: codebooks or info.codebooks] if result.array is not None else None
        if tokens is not None:
            results[index] = replace(result, array=tokens)
        frames = int(tokens.shape[1]) if tokens is not None else 0
        figures.append(
            {
                "shape": list(tokens.shape) if tokens is not None else [],
                "codebooks": int(tokens.shape[0]) if tokens is not None else 0,
                "frames": frames,
                "frame_rate": frame_rate,
                "sample_rate": sample_rate,
                "duration_s": round(frames / frame_rate, 6) if frame_rate else 0.0,
            }
        )
    return tokens_response(request, served, results, figures, single=len(blobs) == 1)


@router.post(
    "/decode",
    summary="Codebook tokens to audio",
    responses={200: {"content": {"audio/wav": {}}, "model": DecodedItems}},
    openapi_extra=DECODE_BODY("[[int]] of k codebooks (rows) by F frames"),
)
async def decode_audio_route(
    request: Request,
    services: ServicesDep,
    model: Annotated[str | None, Query(description="Model name, if not in the body")] = None,
    fmt: Annotated[AudioFormat, Query(alias="format", description="Output format")] = "wav",
) -> Response:
    """One [k][F] array answers the audio file; a list answers JSON (or msgpack) items."""
    body = await read_token_request(request, services, 2, "[[int]] (k codebooks of F frames)")
    served = use_model(request, services.registry.get(body.model or model, "audio"))
    info = served.info
    # a decoder that needs every codebook declares it (exported programs do)
    fewest = int(info.extra.get("decode_codebooks", 1))
    rows = f"{fewest} to {info.codebooks}" if fewest < info.codebooks else f"{fewest}"
    sample_rate = info.sample_rate or 24000
    hop = info.hop_length or 1
    max_seconds = services.settings.max_audio_seconds

    def codes_of(item: Any, where: str) -> np.ndarray:
        array = token_array(item, where, info.vocab_size)
        if array.ndim != 2 or not fewest <= array.shape[0] <= info.codebooks or array.shape[1] < 1:
            raise Unprocessable(
                f"{where} of shape {list(array.shape)} does not fit model {served.name}: send "
                f"[k][F] with {rows} codebooks (rows) and at least one frame."
            )
        if array.shape[1] * hop > max_seconds * sample_rate:
            raise PayloadTooLarge(
                f"{where}: {array.shape[1]} frames decode to "
                f"{array.shape[1] * hop / sample_rate:.1f} s of audio; at most {max_seconds:g} s "
                "(TOKSERVE_MAX_AUDIO_SECONDS, "
                f"{int(max_seconds * sample_rate / hop)} frames) per item."
            )
        return array

    arrays = await token_items(services, body, codes_of)
    check_token_budget(arrays, services.settings)
    seconds = [a.shape[1] * hop / sample_rate for a in arrays if isinstance(a, np.ndarray)]
    _check_request_seconds(sum(seconds), services.settings, "decode to")

    def to_file(wave: torch.Tensor) -> np.ndarray:
        return np.frombuffer(encode_audio(wave, sample_rate, fmt), dtype=np.uint8)

    job = Job(
        model=served,
        op="decode",
        batcher=services.batcher(served, "decode"),
        prepare=unchanged,
        group=AudioRunner.decode_group,
        finish=to_file,
        params=canonical_params(format=fmt),
        use_cache=services.settings.cache_decode,
    )
    file = file_fits(MEDIA_TYPES[fmt])
    results = await run_items(request, services, job, arrays, key_bytes, lambda _: file)
    figures = [
        {
            "sample_rate": sample_rate,
            "duration_s": round(a.shape[1] * hop / sample_rate, 6)
            if isinstance(a, np.ndarray)
            else 0.0,
        }
        for a in arrays
    ]
    return media_response(request, served, results, body.single, MEDIA_TYPES[fmt], figures)
