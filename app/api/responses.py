"""Answering: content negotiation (JSON, msgpack, npy) and the per-item rules of an answer.

An item that cannot be read, decoded or computed fails alone. A multi-item request answers
200 when every item succeeded, 207 Multi-Status when some failed (each failed slot holds
``{"error": {status, title, detail}}``), and, when every item failed, the first item's status
with a problem document that lists each item's problem in ``items``. A single item's problem
is the request's.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgpack
import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from app.endpoints import Answer, Media, Tokens
from app.errors import ProblemError, Unprocessable

MSGPACK = "application/msgpack"
NPY = "application/x-npy"
MULTI_STATUS = 207
ResponseFormat = Literal["json", "msgpack", "npy"]
# an item's tokens -> what ?layout=NAME adds to it: its span of ids, or its windows' spans
LayoutFields = Callable[[np.ndarray], dict[str, Any]]
# the media types that name each format, in Accept
_FORMAT_TYPES: dict[ResponseFormat, tuple[str, ...]] = {
    "msgpack": (MSGPACK, "application/x-msgpack"),
    "npy": (NPY,),
    "json": ("application/json",),
}


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


def problem_of(error: ProblemError) -> dict[str, Any]:
    """The problem document of one item, as its slot in a multi-item answer holds it."""
    return {"status": error.status, "title": error.title, "detail": error.detail, **error.extra}


def outcome_status(items: Sequence[Any], single: bool) -> int:
    """200 when every item succeeded, 207 when some failed; raises the request's problem when
    all failed (the single item's own, or the first item's status listing every item's)."""
    errors = [(i, item) for i, item in enumerate(items) if isinstance(item, ProblemError)]
    if not errors:
        return 200
    if single:
        raise errors[0][1]
    if len(errors) < len(items):
        return MULTI_STATUS
    index, first = errors[0]
    raise type(first)(
        f"Every item failed; item {index}: {first.detail}",
        headers=first.headers,
        items=[problem_of(error) for _, error in errors],
    )


def tokens_response(
    request: Request,
    answer: Answer[Tokens],
    single: bool = False,
    in_layout: LayoutFields | None = None,
) -> Response:
    """Answer encode results: each item's tokens with its figures (and, with ``in_layout``, its
    ids in a layout), or its problem. npy holds one array, so there any failed item fails
    the request."""
    fmt = response_format(request)
    status = outcome_status(answer.items, single)
    headers = {"X-Model-Version": answer.version}
    if fmt == "npy":
        return _npy(answer, status, headers)
    items: list[dict[str, Any]] = []
    for item in answer.items:
        if isinstance(item, ProblemError):
            items.append({"error": problem_of(item)})
        else:
            laid_out = in_layout(item.tokens) if in_layout else {}
            if fmt == "msgpack":
                tokens = {"tokens": item.tokens.tobytes(), "dtype": item.tokens.dtype.name}
            else:
                tokens = {"tokens": item.tokens.tolist()}
            items.append({**tokens, **item.figures, **laid_out, "cached": item.cached})
    return _items_response(answer, items, fmt == "msgpack", status, headers)


def _npy(answer: Answer[Tokens], status: int, headers: dict[str, str]) -> Response:
    if status == MULTI_STATUS:
        index, error = next(
            (i, item) for i, item in enumerate(answer.items) if isinstance(item, ProblemError)
        )
        raise type(error)(
            f"Item {index}: {error.detail} (application/x-npy holds one array, so a failed "
            "item fails the request; ask for msgpack or JSON to get the other items)",
            headers=error.headers,
        )
    arrays = [item.tokens for item in answer.items if isinstance(item, Tokens)]
    if len({a.shape for a in arrays}) != 1:
        raise Unprocessable(
            "Accept: application/x-npy needs items of one shape; use msgpack or JSON."
        )
    buffer = io.BytesIO()
    stacked = np.stack(arrays)
    np.save(buffer, stacked[0] if len(arrays) == 1 else stacked)
    return Response(buffer.getvalue(), media_type=NPY, headers=headers)


def media_response(request: Request, answer: Answer[Media], single: bool) -> Response:
    """Answer decode results: the file itself for one item, else JSON (base64) or msgpack
    items, each the file with its figures or its problem."""
    status = outcome_status(answer.items, single)
    headers = {"X-Model-Version": answer.version}
    first = answer.items[0]
    if single and isinstance(first, Media):
        return Response(first.data, media_type=first.media_type, headers=headers)
    binary = response_format(request) == "msgpack"
    items: list[dict[str, Any]] = []
    for item in answer.items:
        if isinstance(item, ProblemError):
            items.append({"error": problem_of(item)})
            continue
        data = item.data if binary else base64.b64encode(item.data).decode()
        items.append(
            {"data": data, "media_type": item.media_type, **item.figures, "cached": item.cached}
        )
    return _items_response(answer, items, binary, status, headers)


def _items_response(
    answer: Answer[Any],
    items: list[dict[str, Any]],
    binary: bool,
    status: int,
    headers: dict[str, str],
) -> Response:
    body = {"model": answer.model, "version": answer.version, "items": items}
    if binary:
        return Response(msgpack.packb(body), status, headers=headers, media_type=MSGPACK)
    return JSONResponse(body, status, headers=headers)
