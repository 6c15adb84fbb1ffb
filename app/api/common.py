"""What every resource shares: dependencies, reading items from a request, answering tokens."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

import msgpack
import numpy as np
from fastapi import Depends, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.config import Settings
from app.errors import (
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    ProblemError,
    Unauthorized,
    Unprocessable,
)
from app.media import parse_base64
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
    """time.monotonic() by which work must have started: X-Request-Timeout or the default,
    counted from the request's arrival (time spent reading its body counts too)."""
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
    arrived: float = getattr(request.state, "arrived", time.monotonic())
    return arrived + timeout_s


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _check_count(count: int, max_items: int, what: str) -> None:
    if count == 0:
        raise BadRequest(
            f"The request holds no {what}: send raw bytes as the body, multipart files, "
            f'or JSON {{"{what}": [<base64>, ...]}}.'
        )
    if count > max_items:
        raise PayloadTooLarge(
            f"{count} {what} in one request; at most {max_items} (TOKSERVE_MAX_ITEMS) are "
            "accepted: split the list into several requests."
        )


async def read_media_items(
    request: Request, services: Services, what: str
) -> list[bytes | ProblemError]:
    """Raw media of every item: the body itself, each multipart file, or JSON base64 strings.
    An item that cannot be read (bad base64) holds its problem; JSON is parsed off the loop."""
    content_type = _content_type(request)
    if content_type == "multipart/form-data":
        form = await _read_form(request, services, what)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        _check_count(len(files), services.settings.max_items, what)
        blobs: list[bytes | ProblemError] = [await upload.read() for upload in files]
        await form.close()
        return blobs
    if content_type == "application/json":
        body = await request.body()
        return await off_loop(services, _base64_items, body, services.settings.max_items, what)
    body = await request.body()
    if not body:
        raise BadRequest(f"The request body is empty; send the {what[:-1]} file's bytes.")
    return [body]


def _base64_items(body: bytes, max_items: int, what: str) -> list[bytes | ProblemError]:
    """``{what: [<base64>, ...]}`` -> each item's bytes, or its problem if it is not base64."""
    payload = _parse_json(body)
    encoded = payload.get(what) if isinstance(payload, dict) else None
    if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
        raise Unprocessable(
            f'The JSON body must be {{"{what}": ["<base64>", ...]}}: a list of base64 strings.'
        )
    _check_count(len(encoded), max_items, what)
    items: list[bytes | ProblemError] = []
    for index, text in enumerate(encoded):
        try:
            items.append(parse_base64(text, f"{what}[{index}]"))
        except ProblemError as exc:
            items.append(exc)
    return items


async def off_loop(services: Services, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in the media pool: parsing large bodies must not stall the event loop."""
    return await asyncio.get_running_loop().run_in_executor(
        services.media_pool, partial(work, *args)
    )


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


# What a token body may take per token it may carry (TOKSERVE_MAX_DECODE_TOKENS): JSON spends
# at most ~8 bytes on an id and its separator, msgpack 9 on an int; the rest is indentation.
TOKEN_BODY_BYTES_PER_TOKEN = 16
TOKEN_BODY_SLACK_BYTES = 64 * 1024
# msgpack maps hold {model, tokens} or a binary item's {dtype, shape, data}; strings are names
_MSGPACK_MAX_MAP_LEN = 16
_MSGPACK_MAX_STR_LEN = 1024


def token_body_limit(settings: Settings) -> int:
    """Bytes a decode body may have: what MAX_DECODE_TOKENS tokens take, within MAX_BODY_BYTES."""
    tokens = settings.max_decode_tokens * TOKEN_BODY_BYTES_PER_TOKEN + TOKEN_BODY_SLACK_BYTES
    return min(settings.max_body_bytes, tokens)


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


async def read_token_request(
    request: Request, services: Services, item_ndim: int, layout: str
) -> TokenRequest:
    """Parse ``{model, tokens}`` from JSON or msgpack, off the event loop, after checking the
    body's size against what MAX_DECODE_TOKENS allows; tokens is one item or a list of at
    most MAX_ITEMS items."""
    settings = services.settings
    limit = token_body_limit(settings)
    body = await _read_at_most(
        request,
        limit,
        f"A decode body may hold {settings.max_decode_tokens} tokens "
        f"(TOKSERVE_MAX_DECODE_TOKENS), so at most {limit} bytes",
    )
    if not body:
        raise BadRequest(f'The body is empty; send {{"model": ..., "tokens": {layout}}}.')
    binary = _content_type(request) in _FORMAT_TYPES["msgpack"]
    return await off_loop(
        services, _parse_tokens, body, binary, item_ndim, layout, settings.max_items, limit
    )


async def _read_at_most(request: Request, limit: int, why: str) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (by Content-Length or
    while it streams in), so an oversized one is never held whole."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLarge(f"{why}; send fewer or shorter items per request.")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_tokens(
    body: bytes, binary: bool, item_ndim: int, layout: str, max_items: int, limit: int
) -> TokenRequest:
    if binary:
        try:
            payload = msgpack.unpackb(
                body,
                raw=False,
                max_bin_len=limit,
                max_array_len=limit,
                max_map_len=_MSGPACK_MAX_MAP_LEN,
                max_str_len=_MSGPACK_MAX_STR_LEN,
                max_ext_len=0,
            )
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
        _check_count(len(tokens), max_items, "token items")
        return TokenRequest(model, list(tokens), False)
    raise Unprocessable(
        f"'tokens' must be {layout} for one item, or a list of those for several "
        f"(got {depth} levels of nesting)."
    )


def _is_binary(item: Any) -> bool:
    return isinstance(item, dict)


async def token_items(
    services: Services, body: TokenRequest, check: Callable[[Any, str], np.ndarray]
) -> list[np.ndarray | ProblemError]:
    """Each item of a decode request as ``check(item, where)`` makes it, or its own problem;
    off the event loop (a million ids take a while to convert)."""

    def convert() -> list[np.ndarray | ProblemError]:
        arrays: list[np.ndarray | ProblemError] = []
        for index, item in enumerate(body.items):
            try:
                arrays.append(check(item, "tokens" if body.single else f"tokens[{index}]"))
            except ProblemError as exc:
                arrays.append(exc)
        return arrays

    return await off_loop(services, convert)


def token_array(item: Any, where: str, vocab_size: int) -> np.ndarray:
    """One item of a decode request as an int64 array; refuses non-integers and ids out of range."""
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


def check_token_budget(arrays: list[np.ndarray | ProblemError], settings: Settings) -> None:
    """Refuse a decode request whose readable items hold more than MAX_DECODE_TOKENS tokens."""
    total = sum(a.size for a in arrays if isinstance(a, np.ndarray))
    limit = settings.max_decode_tokens
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
