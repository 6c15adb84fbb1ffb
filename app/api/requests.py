"""Reading a request: media items from raw, multipart or base64 JSON bodies, token bodies from
JSON or msgpack, each bounded before it is parsed; and cancelling work when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.config import Settings
from app.engine import Engine
from app.errors import BadRequest, ClientGone, PayloadTooLarge, ProblemError, Unprocessable
from app.media import parse_base64

T = TypeVar("T")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
# token bodies up to this size are parsed on the event loop: well under a millisecond
INLINE_PARSE_BYTES = 64 * 1024


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
    request: Request, engine: Engine, what: str
) -> list[bytes | ProblemError]:
    """Raw media of every item: the body itself, each multipart file, or JSON base64 strings.
    An item that cannot be read (bad base64) holds its problem; JSON is parsed off the loop."""
    content_type = _content_type(request)
    if content_type == "multipart/form-data":
        form = await _read_form(request, engine, what)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        _check_count(len(files), engine.settings.max_items, what)
        blobs: list[bytes | ProblemError] = [await upload.read() for upload in files]
        await form.close()
        return blobs
    if content_type == "application/json":
        body = await request.body()
        return await engine.off_loop(_base64_items, body, engine.settings.max_items, what)
    body = await request.body()
    if not body:
        file = what.removesuffix("s")
        raise BadRequest(f"The request body is empty; send the {file} file's bytes.")
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


class _InMemoryMultiPartParser(MultiPartParser):
    """Keeps file parts in memory, as JSON bodies are: each is read whole right after parsing
    and the body limit bounds them. Starlette spools parts over 1 MB to the temporary directory,
    which concurrent uploads fill (a container's /tmp is a small volume), failing every request."""

    spool_max_size = sys.maxsize


async def _read_form(request: Request, engine: Engine, what: str) -> FormData:
    """The multipart form, parsing at most one part more than the item limit allows."""
    max_items = engine.settings.max_items
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
    """A decode request: token arrays (or, with ``layout``, spans of that layout's ids), and
    whether the client sent one item or a list."""

    model: str | None
    items: list[Any]
    single: bool
    layout: str | None = None


# a model's name (None: the route's default) -> how many levels one item nests, and what it reads
ItemShape = Callable[[str | None], tuple[int, str]]
SPAN_SHAPE = (1, "[int] (one span of the layout's ids, markers included)")


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


async def read_token_request(request: Request, engine: Engine, shape: ItemShape) -> TokenRequest:
    """Parse ``{model, tokens}`` (or ``{layout, ids}``) from JSON or msgpack, off the event
    loop, after checking the body's size against what MAX_DECODE_TOKENS allows; tokens is one
    item (nested as ``shape`` says for the model) or a list of at most MAX_ITEMS items."""
    settings = engine.settings
    limit = token_body_limit(settings)
    body = await _read_at_most(
        request,
        limit,
        f"A decode body may hold {settings.max_decode_tokens} tokens "
        f"(TOKSERVE_MAX_DECODE_TOKENS), so at most {limit} bytes",
    )
    if not body:
        raise BadRequest(f'The body is empty; send {{"model": ..., "tokens": {shape(None)[1]}}}.')
    binary = _content_type(request) in MSGPACK_TYPES
    parse = (body, binary, shape, settings.max_items, limit)
    if len(body) <= INLINE_PARSE_BYTES:  # a thread hop would cost more than the parsing
        return _parse_tokens(*parse)
    return await engine.off_loop(_parse_tokens, *parse)


async def _read_at_most(request: Request, limit: int, why: str) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (by Content-Length or
    while it streams in), so an oversized one is never held whole."""
    declared = request.headers.get("content-length", "")
    # closing spares reading the rest of a body nobody will use
    too_large = PayloadTooLarge(
        f"{why}; send fewer or shorter items per request.", headers={"Connection": "close"}
    )
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
    body: bytes, binary: bool, shape: ItemShape, max_items: int, limit: int
) -> TokenRequest:
    if binary:
        count = _msgpack_item_count(body, shape)
        if count is not None:  # headers only: unpacking 100,000 tiny items holds the GIL ~80 ms
            _check_count(count, max_items, "token items")
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
    if not isinstance(payload, dict) or ("tokens" not in payload and "ids" not in payload):
        raise Unprocessable(
            f'The body must be an object {{"model": ..., "tokens": {shape(None)[1]}}}, or '
            '{"layout": ..., "ids": [int]} for spans of a layout\'s ids.'
        )
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise Unprocessable("'model' must be a string naming a loaded model.")
    layout = _layout_of(payload)
    key = "tokens" if layout is None else "ids"
    item_ndim, text = shape(model) if layout is None else SPAN_SHAPE
    tokens = payload[key]
    if isinstance(tokens, dict) and layout is None:
        return TokenRequest(model, [tokens], True)
    # a list of binary items nests as deep as a sequence of ids does: its maps tell them apart
    binary_items = layout is None and isinstance(tokens, list) and tokens and _is_binary(tokens[0])
    depth = _depth(tokens)
    if depth == item_ndim and not binary_items:
        return TokenRequest(model, [tokens], True, layout)
    if depth == item_ndim + 1 or binary_items:
        _check_count(len(tokens), max_items, "token items")
        return TokenRequest(model, list(tokens), False, layout)
    raise Unprocessable(
        f"'{key}' must be {text} for one item, or a list of those for several "
        f"(got {depth} levels of nesting)."
    )


def _layout_of(payload: dict[str, Any]) -> str | None:
    """The layout whose ids the body holds in place of tokens; None for a body of tokens
    (whose other keys, ids among them, are not read)."""
    if "tokens" in payload:
        return None
    layout = payload.get("layout")
    if not isinstance(layout, str):
        raise Unprocessable(
            "'ids' are read through a layout: add \"layout\": NAME, one of GET /v1/layouts."
        )
    return layout


def _msgpack_item_count(body: bytes, shape: ItemShape) -> int | None:
    """How many items a msgpack decode body's ``tokens`` (or ``ids``) list holds, read from its
    headers alone; None when it holds one item, or is not such a list (the full parse says why)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(body))
    unpacker.feed(body)
    fields: dict[str, Any] = {}  # the model's name; where tokens and ids start
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "model":
                fields[key] = unpacker.unpack()
                continue
            if key in ("tokens", "ids"):
                fields[key] = unpacker.tell()
            unpacker.skip()
    except (ValueError, IndexError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if "tokens" in fields:
        model = fields.get("model")
        rank = shape(model if isinstance(model, str) else None)[0]
        return _msgpack_list_length(body, fields["tokens"], rank)
    if "ids" in fields:
        return _msgpack_list_length(body, fields["ids"], SPAN_SHAPE[0])
    return None


def _msgpack_list_length(body: bytes, offset: int, item_ndim: int) -> int | None:
    """The length of the msgpack array at ``offset`` when it is a list of items nested
    ``item_ndim`` deep; None when it is one item or not such a list."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(body))
    unpacker.feed(body[offset:])
    try:
        count: int = unpacker.read_array_header()
        # a list of items nests one list more than an item does, or holds binary items (maps)
        for depth in range(item_ndim):
            kind = _msgpack_kind(body[offset + unpacker.tell()])
            if kind == "map":
                return count if depth == 0 else None
            if kind != "array" or unpacker.read_array_header() == 0:
                return None
        return count
    except (ValueError, IndexError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None


def _msgpack_kind(first_byte: int) -> str:
    """What a msgpack object is, from its first byte: "array", "map" or "other"."""
    if 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD):
        return "array"
    if 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF):
        return "map"
    return "other"


def _is_binary(item: Any) -> bool:
    return isinstance(item, dict)


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
