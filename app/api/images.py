"""POST /v1/images/encode and /v1/images/decode."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.deps import EngineDep, deadline_of, label_model, require_api_key
from app.api.layouts import decode_items, layout_fields
from app.api.requests import cancel_on_disconnect, read_media_items
from app.api.responses import media_response, tokens_response
from app.api.schemas import (
    IMAGE_TYPES,
    decode_body,
    encode_body,
    item_answers,
    problems,
)

router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Depends(require_api_key)])
ImageFormat = Literal["png", "webp", "jpeg"]


@router.post(
    "/encode",
    response_class=Response,
    summary="Images to token grids",
    responses={
        **item_answers("ImageEncodeResponse", "ImageEncodeMsgpack", npy=True),
        **problems(400, 404, 413, 415, 422, 503, 504),
    },
    openapi_extra=encode_body("images"),
)
async def encode_images(
    request: Request,
    engine: EngineDep,
    model: Annotated[
        str | None, Query(description="Model name; default: first image model")
    ] = None,
    resize: Annotated[
        Literal["crop", "pad", "stretch"],
        Query(description="How to fit the model's size: centre crop, pad, or stretch"),
    ] = "crop",
    layout: Annotated[
        str | None,
        Query(description="A loaded layout (GET /v1/layouts): each item also gets its `ids` there"),
    ] = None,
    report: Annotated[
        bool,
        Query(description="Each item also gets `quality`: its reconstruction's PSNR and SSIM"),
    ] = False,
) -> Response:
    """Raw image bytes, multipart files or JSON base64 -> one token grid [h][w] per image."""
    endpoint = engine.image(model)
    label_model(request, endpoint.model.name)
    endpoint.check_report(report)
    in_layout = layout_fields(request, engine, layout, endpoint.model.name)
    with engine.tracer.start_as_current_span("body.read") as reading:
        images = await read_media_items(request, engine, "images")
        reading.set_attribute("tokserve.items", len(images))
    deadline = deadline_of(request, engine)
    answer = await cancel_on_disconnect(request, endpoint.encode(images, resize, deadline, report))
    with engine.tracer.start_as_current_span("response.encode"):
        return tokens_response(request, answer, single=len(images) == 1, in_layout=in_layout)


@router.post(
    "/decode",
    response_class=Response,
    summary="Token grids to images",
    responses={
        **item_answers("DecodedImages", "DecodedImagesMsgpack", files=IMAGE_TYPES),
        **problems(400, 404, 413, 422, 503, 504),
    },
    openapi_extra=decode_body("image"),
)
async def decode_images(
    request: Request,
    engine: EngineDep,
    model: Annotated[str | None, Query(description="Model name, if not in the body")] = None,
    fmt: Annotated[ImageFormat, Query(alias="format", description="Output format")] = "png",
) -> Response:
    """One grid answers the image itself; a list of grids answers JSON (or msgpack) items."""
    name, items, single = await decode_items(request, engine, model, "image")
    endpoint = engine.image(name)
    label_model(request, endpoint.model.name)
    deadline = deadline_of(request, engine)
    work = endpoint.decode(items, fmt, deadline, single)
    answer = await cancel_on_disconnect(request, work)
    with engine.tracer.start_as_current_span("response.encode"):
        return media_response(request, answer, single)
