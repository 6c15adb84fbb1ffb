"""POST /v1/audio/encode and /v1/audio/decode."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.common import (
    ServicesDep,
    check_token_budget,
    key_bytes,
    media_response,
    read_media_items,
    read_token_request,
    require_api_key,
    run_job,
    token_array,
    tokens_response,
    use_model,
)
from app.api.schemas import DECODE_BODY, ENCODE_BODY, AudioEncodeResponse, DecodedItems
from app.cache import canonical_params
from app.errors import PayloadTooLarge, Unprocessable
from app.media import decode_audio, encode_audio
from app.pipeline import Job, unchanged
from app.runner import AudioRunner

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Depends(require_api_key)])
AudioFormat = Literal["wav", "flac", "ogg"]
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}


def _wave_only(blob: bytes, sample_rate: int, channels: int, max_seconds: float) -> torch.Tensor:
    return decode_audio(blob, sample_rate, channels, max_seconds)[0]


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
    if codebooks is not None and codebooks > info.codebooks:
        raise Unprocessable(
            f"codebooks={codebooks}, but model {served.name} has {info.codebooks}; "
            f"ask for 1 to {info.codebooks}."
        )
    blobs = await read_media_items(request, services, "audio")
    sample_rate = info.sample_rate or 24000
    job = Job(
        model=served,
        op="encode",
        batcher=services.batcher(served, "encode"),
        prepare=partial(
            _wave_only,
            sample_rate=sample_rate,
            channels=info.channels or 1,
            max_seconds=services.settings.max_audio_seconds,
        ),
        group=AudioRunner.encode_group,
        finish=unchanged,
    )
    results = await run_job(request, services, job, blobs, blobs)
    frame_rate = info.frame_rate or 0.0
    items = []
    for result in results:
        tokens = result.array[: codebooks or info.codebooks]
        frames = int(tokens.shape[1])
        items.append(
            {
                "tokens": tokens,
                "shape": list(tokens.shape),
                "codebooks": int(tokens.shape[0]),
                "frames": frames,
                "frame_rate": frame_rate,
                "sample_rate": sample_rate,
                "duration_s": round(frames / frame_rate, 6) if frame_rate else 0.0,
                "cached": result.cached,
            }
        )
    return tokens_response(request, served, items)


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
    body = await read_token_request(request, 2, "[[int]] (k codebooks of F frames)")
    served = use_model(request, services.registry.get(body.model or model, "audio"))
    info = served.info
    # a decoder that needs every codebook declares it (exported programs do)
    fewest = int(info.extra.get("decode_codebooks", 1))
    rows = f"{fewest} to {info.codebooks}" if fewest < info.codebooks else f"{fewest}"
    sample_rate = info.sample_rate or 24000
    hop = info.hop_length or 1
    max_seconds = services.settings.max_audio_seconds
    arrays = []
    for index, item in enumerate(body.items):
        array = token_array(item, None if body.single else index, info.vocab_size)
        if array.ndim != 2 or not fewest <= array.shape[0] <= info.codebooks or array.shape[1] < 1:
            raise Unprocessable(
                f"Tokens of shape {list(array.shape)} do not fit model {served.name}: send "
                f"[k][F] with {rows} codebooks (rows) and at least one frame."
            )
        if array.shape[1] * hop > max_seconds * sample_rate:
            raise PayloadTooLarge(
                f"{array.shape[1]} frames decode to {array.shape[1] * hop / sample_rate:.1f} s of "
                f"audio; at most {max_seconds:g} s (TOKSERVE_MAX_AUDIO_SECONDS, "
                f"{int(max_seconds * sample_rate / hop)} frames) per item."
            )
        arrays.append(array)
    check_token_budget(arrays, services)

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
    results = await run_job(request, services, job, arrays, [key_bytes(a) for a in arrays])
    metadata = [
        {
            "sample_rate": sample_rate,
            "duration_s": round(a.shape[1] * hop / sample_rate, 6),
            "cached": r.cached,
        }
        for a, r in zip(arrays, results, strict=True)
    ]
    return media_response(
        request,
        served,
        [r.array.tobytes() for r in results],
        body.single,
        MEDIA_TYPES[fmt],
        metadata,
    )
