"""What every resource shares: dependencies, reading items from a request, answering tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import secrets
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgpack
import numpy as np
from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import BadRequest, ClientGone, PayloadTooLarge, Unauthorized, Unprocessable
from app.media import parse_base64
from app.pipeline import ItemResult, Job
from app.registry import LoadedModel
from app.services import Services

T = TypeVar("T")
MSGPACK = "application/msgpack"
NPY = "application/x-npy"
ResponseFormat = Literal["json", "msgpack", "npy"]
# the media types that name each format, in Accept and (msgpack) in Content-Type
_FORMAT_TYPES: dict[ResponseFormat, tuple[str, ...]] = {
    "msgpack": (MSGPACK, "application/x-msgpack"),
    "npy": (NPY,),
    "json": ("application/json",),
}


async def get_services(request: Request) -> Services:
    """The app's Services (async: FastAPI would run a plain function in its thread pool)."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_api_key(request: Request, services: ServicesDep) -> None:
    """When TOKSERVE_API_KEYS is set, every /v1 request carries one of them (async: no thread)."""
    keys = services.settings.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not any(secrets.compare_digest(given.encode(), key.encode()) for key in keys):
        raise Unauthorized(
            "A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


def use_model(request: Request, model: LoadedModel) -> LoadedModel:
    """Label this request's metrics with the model that serves it."""
    request.state.model = model.name
    return model


def deadline_of(request: Request, services: Services) -> float:
    """time.monotonic() by which work must have started: X-Request-Timeout or the default."""
    timeout_s = services.settings.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            timeout_s = float(header)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= 3600:
            raise BadRequest(
                f"X-Request-Timeout must be a number of seconds in (0, 3600], not {header!r}."
            )
    return time.monotonic() + timeout_s


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_count(count: int, services: Services, what: str) -> None:
    if count == 0:
        raise BadRequest(
            f"The request holds no {what}: send raw bytes as the body, multipart files, "
            f'or JSON {{"{what}": [<base64>, ...]}}.'
        )
    if count > services.settings.max_items:
        raise PayloadTooLarge(
            f"{count} {what} in one request; at most {services.settings.max_items} "
            "(TOKSERVE_MAX_ITEMS) are accepted."
        )


async def read_media_items(request: Request, services: Services, what: str) -> list[bytes]:
    """Raw media of every item: the body itself, each multipart file, or JSON base64 strings."""
    content_type = _content_type(request)
    if content_type == "multipart/form-data":
        form = await _read_form(request, services, what)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        _check_count(len(files), services, what)
        blobs = [await upload.read() for upload in files]
        await form.close()
    elif content_type == "application/json":
        payload = _parse_json(await request.body())
        encoded = payload.get(what) if isinstance(payload, dict) else None
        if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
            raise Unprocessable(
                f'The JSON body must be {{"{what}": ["<base64>", ...]}}: a list of base64 strings.'
            )
        _check_count(len(encoded), services, what)
        blobs = [parse_base64(text, f"{what}[{i}]") for i, text in enumerate(encoded)]
    else:
        blobs = [await request.body()]
    for index, blob in enumerate(blobs):
        if not blob:
            where = "The request body" if len(blobs) == 1 else f"Item {index}"
            raise BadRequest(f"{where} is empty; send the {what[:-1]} file's bytes.")
    return blobs


class _InMemoryMultiPartParser(MultiPartParser):
    """Keeps file parts in memory, as JSON bodies are: each is read whole right after parsing
    and the body limit bounds them. Starlette spools parts over 1 MB to the temporary directory,
    which concurrent uploads fill (a container's /tmp is a small volume), failing every request."""

    spool_max_size = sys.maxsize


async def _read_form(request: Request, services: Services, what: str) -> FormData:
    """The multipart form, parsing at most one part more than the item limit allows."""
    max_items = services.settings.max_items
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            parser = _InMemoryMultiPartParser(
                request.headers, stream, max_files=max_items + 1, max_fields=max_items + 1
            )
            return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many"):
            raise PayloadTooLarge(
                f"More than {max_items + 1} parts in one multipart request; at most {max_items} "
                f"{what} (TOKSERVE_MAX_ITEMS) are accepted."
            ) from exc
        raise BadRequest(
            f"The multipart body could not be parsed ({exc.message}); send multipart/form-data "
            "with one file part per item."
        ) from exc


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise BadRequest("The JSON body is nested too deeply to parse.") from exc
    except ValueError as exc:  # also UnicodeDecodeError, and integers over Python's digit limit
        raise BadRequest(f"The body is not valid JSON ({exc}).") from exc


@dataclass(frozen=True)
class TokenRequest:
    """A decode request: token arrays, and whether the client sent one item or a list."""

    model: str | None
    items: list[Any]
    single: bool


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


async def read_token_request(request: Request, item_ndim: int, layout: str) -> TokenRequest:
    """Parse ``{model, tokens}`` from JSON or msgpack; tokens is one item or a list of items."""
    body = await request.body()
    if not body:
        raise BadRequest(f'The body is empty; send {{"model": ..., "tokens": {layout}}}.')
    if _content_type(request) in _FORMAT_TYPES["msgpack"]:
        try:
            payload = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            reason = str(exc) or type(exc).__name__
            raise BadRequest(f"The body is not valid msgpack ({reason}).") from exc
    else:
        payload = _parse_json(body)
    if not isinstance(payload, dict) or "tokens" not in payload:
        raise Unprocessable(f'The body must be an object {{"model": ..., "tokens": {layout}}}.')
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise Unprocessable("'model' must be a string naming a loaded model.")
    tokens = payload["tokens"]
    if isinstance(tokens, dict):
        return TokenRequest(model, [tokens], True)
    depth = _depth(tokens)
    if depth == item_ndim:
        return TokenRequest(model, [tokens], True)
    if depth == item_ndim + 1 or (isinstance(tokens, list) and tokens and _is_binary(tokens[0])):
        return TokenRequest(model, list(tokens), False)
    raise Unprocessable(
        f"'tokens' must be {layout} for one item, or a list of those for several "
        f"(got {depth} levels of nesting)."
    )


def _is_binary(item: Any) -> bool:
    return isinstance(item, dict)


def token_array(item: Any, index: int | None, vocab_size: int) -> np.ndarray:
    """One item of a decode request as an int64 array; refuses non-integers and ids out of range."""
    where = "tokens" if index is None else f"tokens[{index}]"
    if isinstance(item, dict):
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(n) is int for n in shape):
            raise Unprocessable(f"{where}: a binary item's 'shape' must be a list of integers.")
        try:
            dtype = np.dtype(item["dtype"])
            if dtype.byteorder == "=":  # unstated: binary tokens are little-endian
                dtype = dtype.newbyteorder("<")
            array = np.frombuffer(item["data"], dtype=dtype)
            array = array.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise Unprocessable(
                f"{where}: a binary item needs 'dtype', 'shape' and 'data' (bytes: binary items "
                f"come in msgpack bodies) that agree ({exc})."
            ) from exc
    else:
        try:
            array = np.asarray(item)
        except ValueError as exc:
            raise Unprocessable(f"{where} is ragged: every row must have the same length.") from exc
    if array.size == 0:
        raise Unprocessable(f"{where} holds no token ids; send at least one.")
    if array.dtype.kind not in "iu":
        found = "nulls or integers beyond 64 bits" if array.dtype.kind == "O" else array.dtype.name
        raise Unprocessable(f"{where} must hold integer token ids, not {found}.")
    if not isinstance(item, dict) and _holds_bool(item):
        raise Unprocessable(f"{where} must hold integer token ids, not true or false.")
    if array.min() < 0 or array.max() >= vocab_size:
        raise Unprocessable(
            f"{where} holds ids from {array.min()} to {array.max()}; "
            f"this model accepts 0 to {vocab_size - 1}."
        )
    return array.astype(np.int64)


def _holds_bool(rows: list[Any]) -> bool:
    """Whether nested lists hold true/false anywhere (numpy reads them as 1 and 0 among ints)."""
    values = rows
    while values and isinstance(values[0], list):
        values = list(itertools.chain.from_iterable(values))
    return any(type(value) is bool for value in values)


def check_token_budget(arrays: list[np.ndarray], services: Services) -> None:
    total = sum(a.size for a in arrays)
    limit = services.settings.max_decode_tokens
    if total > limit:
        raise PayloadTooLarge(
            f"{total} tokens in one request; at most {limit} (TOKSERVE_MAX_DECODE_TOKENS)."
        )


def key_bytes(array: np.ndarray) -> bytes:
    """Cache identity of a token array: its shape and little-endian int32 ids."""
    return np.asarray(array.shape, "<u4").tobytes() + array.astype("<i4").tobytes()


def _accept_ranges(accept: str) -> dict[str, float]:
    """``Accept`` as {media range: q}; a range without a q, or with an unreadable one, is 1."""
    ranges = {}
    for part in accept.lower().split(","):
        media_range, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                with contextlib.suppress(ValueError):
                    q = float(value)
        if media_range:
            ranges[media_range] = q
    return ranges


def response_format(request: Request) -> ResponseFormat:
    """Content negotiation on Accept: msgpack or npy when named with a q above 0 and not below
    JSON's (msgpack on a tie with npy), JSON otherwise."""
    ranges = _accept_ranges(request.headers.get("accept", ""))

    def q_of(fmt: ResponseFormat) -> float:
        return max((ranges[t] for t in _FORMAT_TYPES[fmt] if t in ranges), default=0.0)

    binary: ResponseFormat = max(("msgpack", "npy"), key=q_of)  # max keeps the first on a tie
    return binary if q_of(binary) > 0 and q_of(binary) >= q_of("json") else "json"


def compact(tokens: np.ndarray) -> np.ndarray:
    """One dtype for cached and computed tokens alike: uint16 when the ids fit."""
    return tokens.astype("<u2") if tokens.size and int(tokens.max()) < 2**16 else tokens


def tokens_response(request: Request, model: LoadedModel, items: list[dict[str, Any]]) -> Response:
    """Answer encode results; each item dict holds ``tokens`` (an array) and its metadata."""
    fmt = response_format(request)
    headers = {"X-Model-Version": model.version}
    if fmt == "npy":
        shapes = {item["tokens"].shape for item in items}
        if len(shapes) != 1:
            raise Unprocessable(
                "Accept: application/x-npy needs items of one shape; use msgpack or JSON."
            )
        buffer = io.BytesIO()
        stacked = np.stack([compact(item["tokens"]) for item in items])
        np.save(buffer, stacked[0] if len(items) == 1 else stacked)
        return Response(buffer.getvalue(), media_type=NPY, headers=headers)
    if fmt == "msgpack":
        packed = []
        for item in items:
            tokens = compact(item["tokens"])
            packed.append(
                {
                    **item,
                    "tokens": tokens.tobytes(),
                    "dtype": tokens.dtype.name,
                    "shape": list(tokens.shape),
                }
            )
        body = {"model": model.name, "version": model.version, "items": packed}
        return Response(msgpack.packb(body), media_type=MSGPACK, headers=headers)
    listed = [{**item, "tokens": item["tokens"].tolist()} for item in items]
    body = {"model": model.name, "version": model.version, "items": listed}
    return JSONResponse(body, headers=headers)


def media_response(
    request: Request,
    model: LoadedModel,
    blobs: list[bytes],
    single: bool,
    media_type: str,
    metadata: list[dict[str, Any]],
) -> Response:
    """Answer decode results: the file itself for one item, else JSON (base64) or msgpack."""
    headers = {"X-Model-Version": model.version}
    if single:
        return Response(blobs[0], media_type=media_type, headers=headers)
    if response_format(request) == "msgpack":
        items = [
            {"data": blob, "media_type": media_type, **m}
            for blob, m in zip(blobs, metadata, strict=True)
        ]
        body = {"model": model.name, "version": model.version, "items": items}
        return Response(msgpack.packb(body), media_type=MSGPACK, headers=headers)
    items = [
        {"data": base64.b64encode(blob).decode(), "media_type": media_type, **m}
        for blob, m in zip(blobs, metadata, strict=True)
    ]
    return JSONResponse(
        {"model": model.name, "version": model.version, "items": items}, headers=headers
    )


async def run_job(
    request: Request, services: Services, job: Job, items: list[Any], key_bytes: list[bytes]
) -> list[ItemResult]:
    """Run one request's items through the pipeline under its deadline, unless the client leaves."""
    deadline = deadline_of(request, services)
    return await cancel_on_disconnect(
        request, services.pipeline.run(job, items, key_bytes, deadline)
    )


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (its queued items drop)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()
