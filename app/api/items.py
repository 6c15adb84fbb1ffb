"""Per-item answers: one request's items run side by side, and each gets its result or its problem.

An item that cannot be read, decoded or computed fails alone. A multi-item request answers
200 when every item succeeded, 207 Multi-Status when some failed (each failed slot holds
``{"error": {status, title, detail}}``), and, when every item failed, the first item's status
with a problem document that lists each item's problem in ``items``. A single item's problem
is the request's.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from app.api.common import MSGPACK, NPY, cancel_on_disconnect, deadline_of, response_format
from app.cache import Fits
from app.errors import ProblemError, Unprocessable
from app.pipeline import ItemResult, Job
from app.registry import LoadedModel
from app.services import Services

MULTI_STATUS = 207

# the first bytes of each file format a decode can answer, to check decoded media from the cache
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/webp": (b"RIFF",),
    "audio/wav": (b"RIFF",),
    "audio/flac": (b"fLaC",),
    "audio/ogg": (b"OggS",),
}


def problem_of(error: ProblemError) -> dict[str, Any]:
    """The problem document of one item, as its slot in a multi-item answer holds it."""
    return {"status": error.status, "title": error.title, "detail": error.detail, **error.extra}


def raw_bytes(blob: bytes) -> bytes:
    """An upload's cache identity: its bytes, as sent."""
    return blob


async def run_items(
    request: Request,
    services: Services,
    job: Job,
    items: Sequence[Any | ProblemError],
    key_of: Callable[[Any], bytes],
    fits: Callable[[int], Fits] | None = None,
) -> list[ItemResult]:
    """Run the items that were read through the pipeline under the request's deadline, unless
    the client leaves; an item that failed to be read keeps its problem in its slot.

    ``key_of`` gives an item's cache identity and ``fits(i)`` what a cached answer to item i
    must look like."""
    ready = [i for i, item in enumerate(items) if not isinstance(item, ProblemError)]
    results: list[ItemResult] = [
        ItemResult(None, error=item) if isinstance(item, ProblemError) else ItemResult(None)
        for item in items
    ]
    if ready:
        deadline = deadline_of(request, services)
        work = services.pipeline.run(
            job,
            [items[i] for i in ready],
            [key_of(items[i]) for i in ready],
            deadline,
            [fits(i) for i in ready] if fits is not None else None,
        )
        for index, result in zip(ready, await cancel_on_disconnect(request, work), strict=True):
            results[index] = result
    return results


def outcome_status(results: Sequence[ItemResult], single: bool) -> int:
    """200 when every item succeeded, 207 when some failed; raises the request's problem when
    all failed (the single item's own, or the first item's status listing every item's)."""
    errors = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
    if not errors:
        return 200
    if single:
        raise errors[0][1]
    if len(errors) < len(results):
        return MULTI_STATUS
    index, first = errors[0]
    raise type(first)(
        f"Every item failed; item {index}: {first.detail}",
        headers=first.headers,
        items=[problem_of(error) for _, error in errors],
    )


def _slot(result: ItemResult, fields: dict[str, Any]) -> dict[str, Any]:
    return fields if result.error is None else {"error": problem_of(result.error)}


def compact(tokens: np.ndarray) -> np.ndarray:
    """One dtype for cached and computed tokens alike: uint16 when the ids fit."""
    return tokens.astype("<u2") if tokens.size and int(tokens.max()) < 2**16 else tokens


def tokens_response(
    request: Request,
    model: LoadedModel,
    results: Sequence[ItemResult],
    figures: Sequence[dict[str, Any]],
    single: bool = False,
) -> Response:
    """Answer encode results: each item's tokens with ``figures`` (its metadata), or its
    problem. npy holds one array, so there any failed item fails the request."""
    fmt = response_format(request)
    status = outcome_status(results, single)
    headers = {"X-Model-Version": model.version}
    arrays = [r.array for r in results if r.array is not None]
    if fmt == "npy":
        if status == MULTI_STATUS:
            index, error = next((i, r.error) for i, r in enumerate(results) if r.error)
            raise type(error)(
                f"Item {index}: {error.detail} (application/x-npy holds one array, so a failed "
                "item fails the request; ask for msgpack or JSON to get the other items)",
                headers=error.headers,
            )
        if len({a.shape for a in arrays}) != 1:
            raise Unprocessable(
                "Accept: application/x-npy needs items of one shape; use msgpack or JSON."
            )
        buffer = io.BytesIO()
        stacked = np.stack([compact(a) for a in arrays])
        np.save(buffer, stacked[0] if len(arrays) == 1 else stacked)
        return Response(buffer.getvalue(), media_type=NPY, headers=headers)
    items = []
    for result, extra in zip(results, figures, strict=True):
        tokens = compact(result.array) if result.array is not None else None
        if tokens is not None and fmt == "msgpack":
            fields = {
                "tokens": tokens.tobytes(),
                "dtype": tokens.dtype.name,
                "shape": list(tokens.shape),
                **extra,
                "cached": result.cached,
            }
        elif tokens is not None:
            fields = {"tokens": tokens.tolist(), **extra, "cached": result.cached}
        else:
            fields = {}
        items.append(_slot(result, fields))
    body = {"model": model.name, "version": model.version, "items": items}
    if fmt == "msgpack":
        return Response(msgpack.packb(body), status, headers=headers, media_type=MSGPACK)
    return JSONResponse(body, status, headers=headers)


def media_response(
    request: Request,
    model: LoadedModel,
    results: Sequence[ItemResult],
    single: bool,
    media_type: str,
    figures: Sequence[dict[str, Any]],
) -> Response:
    """Answer decode results: the file itself for one item, else JSON (base64) or msgpack
    items, each the file with its ``figures`` or its problem."""
    status = outcome_status(results, single)
    headers = {"X-Model-Version": model.version}
    if single:
        assert results[0].array is not None  # outcome_status raised its problem otherwise
        return Response(results[0].array.tobytes(), media_type=media_type, headers=headers)
    binary = response_format(request) == "msgpack"
    items = []
    for result, extra in zip(results, figures, strict=True):
        fields: dict[str, Any] = {}
        if result.array is not None:
            blob = result.array.tobytes()
            data = blob if binary else base64.b64encode(blob).decode()
            fields = {"data": data, "media_type": media_type, **extra, "cached": result.cached}
        items.append(_slot(result, fields))
    body = {"model": model.name, "version": model.version, "items": items}
    if binary:
        return Response(msgpack.packb(body), status, headers=headers, media_type=MSGPACK)
    return JSONResponse(body, status, headers=headers)


def token_fits(model: LoadedModel, rows: int, frames: tuple[int, int] | None = None) -> Fits:
    """What cached tokens for ``model`` must be: integers in its vocabulary, ``rows`` rows
    (grid rows or codebooks) and, for a grid, its columns; for audio the frame count within
    ``frames`` (low, high)."""
    info = model.info
    columns = (info.grid or (0, 0))[1] if model.modality == "image" else None

    def fits(array: np.ndarray) -> bool:
        if array.dtype.kind not in "iu" or array.ndim != 2 or array.shape[0] != rows:
            return False
        if columns is not None and array.shape[1] != columns:
            return False
        if frames is not None and not frames[0] <= array.shape[1] <= frames[1]:
            return False
        return bool(array.size) and int(array.min()) >= 0 and int(array.max()) < info.vocab_size

    return fits


def file_fits(media_type: str) -> Fits:
    """What a cached decode must be: the bytes of a file of ``media_type``."""
    magic = _MAGIC[media_type]

    def fits(array: np.ndarray) -> bool:
        return array.dtype == np.uint8 and array.ndim == 1 and array[:8].tobytes().startswith(magic)

    return fits
