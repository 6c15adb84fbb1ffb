"""POST /v1/images/encode and /v1/images/decode."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.common import (
    ServicesDep,
    check_token_budget,
    key_bytes,
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
from app.api.schemas import DECODE_BODY, ENCODE_BODY, DecodedItems, ImageEncodeResponse
from app.cache import canonical_params
from app.errors import Unprocessable
from app.media import decode_image, encode_image
from app.pipeline import ItemResult, Job, unchanged
from app.runner import ImageRunner

router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Depends(require_api_key)])
ImageFormat = Literal["png", "webp", "jpeg"]
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def _shape_group(item: np.ndarray) -> tuple[int, ...]:
    return tuple(item.shape)


@router.post(
    "/encode",
    response_model=ImageEncodeResponse,
    summary="Images to token grids",
    openapi_extra=ENCODE_BODY("images"),
)
async def encode_images(
    request: Request,
    services: ServicesDep,
    model: Annotated[
        str | None, Query(description="Model name; default: first image model")
    ] = None,
    resize: Annotated[
        Literal["crop", "pad", "stretch"],
        Query(description="How to fit the model's size: centre crop, pad, or stretch"),
    ] = "crop",
) -> Response:
    """Raw image bytes, multipart files or JSON base64 -> one token grid [h][w] per image."""
    served = use_model(request, services.registry.get(model, "image"))
    blobs = await read_media_items(request, services, "images")
    size = served.info.image_size or (256, 256)
    job = Job(
        model=served,
        op="encode",
        batcher=services.batcher(served, "encode"),
        prepare=partial(
            decode_image, size=size, resize=resize, max_pixels=services.settings.max_image_pixels
        ),
        group=ImageRunner.group,
        finish=unchanged,
        params=canonical_params(resize=resize),
    )
    fits = token_fits(served, (served.info.grid or (0, 0))[0])
    results = await run_items(request, services, job, blobs, raw_bytes, lambda _: fits)
    figures = [{"shape": _shape(r)} for r in results]
    return tokens_response(request, served, results, figures, single=len(blobs) == 1)


def _shape(result: ItemResult) -> list[int]:
    return list(result.array.shape) if result.array is not None else []


@router.post(
    "/decode",
    summary="Token grids to images",
    responses={200: {"content": {"image/png": {}}, "model": DecodedItems}},
    openapi_extra=DECODE_BODY("[[int]] of the model's grid (h rows of w ids)"),
)
async def decode_images(
    request: Request,
    services: ServicesDep,
    model: Annotated[str | None, Query(description="Model name, if not in the body")] = None,
    fmt: Annotated[ImageFormat, Query(alias="format", description="Output format")] = "png",
) -> Response:
    """One grid answers the image itself; a list of grids answers JSON (or msgpack) items."""
    body = await read_token_request(request, services, 2, "[[int]] (h rows of w ids)")
    served = use_model(request, services.registry.get(body.model or model, "image"))
    info = served.info
    grid = list(info.grid or ())

    def grid_of(item: Any, where: str) -> np.ndarray:
        array = token_array(item, where, info.vocab_size)
        if list(array.shape) != grid:
            raise Unprocessable(
                f"{where}: grid {list(array.shape)} does not match model {served.name}'s grid "
                f"{grid} (rows x columns)."
            )
        return array

    arrays = await token_items(services, body, grid_of)
    check_token_budget(arrays, services.settings)

    def to_file(rgb: np.ndarray) -> np.ndarray:
        return np.frombuffer(encode_image(rgb, fmt), dtype=np.uint8)

    job = Job(
        model=served,
        op="decode",
        batcher=services.batcher(served, "decode"),
        prepare=unchanged,
        group=_shape_group,
        finish=to_file,
        params=canonical_params(format=fmt),
        use_cache=services.settings.cache_decode,
    )
    fits = file_fits(MEDIA_TYPES[fmt])
    results = await run_items(request, services, job, arrays, key_bytes, lambda _: fits)
    height, width = info.image_size or (0, 0)
    figures = [{"width": width, "height": height}] * len(results)
    return media_response(request, served, results, body.single, MEDIA_TYPES[fmt], figures)
