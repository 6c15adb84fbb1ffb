"""The HTTP exchanges, without I/O: how a call splits into requests, each request's build, and
what its response means. The sync and async clients share all of it and only send.

Tokens travel as msgpack binary arrays, never as JSON lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
import numpy as np

from tokserve_client.results import Encoded, ItemError, ItemsFailed, TokserveError
from tokserve_client.retry import RetryPolicy

MSGPACK = "application/msgpack"
# statuses a single item's request answers for that item alone (its media or tokens are bad)
ITEM_STATUSES = (400, 413, 415, 422)
# bytes of a multipart request besides its files
MULTIPART_OVERHEAD = 64 * 1024

# what a client builds its requests with: httpx.Client and httpx.AsyncClient alike
Builder = httpx.Client | httpx.AsyncClient


class Calls:
    """What Client and AsyncClient hold alike besides their connection pool: how many of a
    call's requests go at once, the retry policy, and the server's limits once asked."""

    def __init__(self, max_concurrency: int, retry: RetryPolicy | None) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self._limits: dict[str, Any] | None = None


@dataclass(frozen=True)
class EncodeRequest:
    """One request of an encode call: items ``first`` to ``first + count - 1`` of the call."""

    first: int
    count: int
    request: httpx.Request


def chunks(blobs: list[bytes], limits: dict[str, Any]) -> list[tuple[int, list[bytes]]]:
    """Consecutive runs of at most the server's ``max_items`` blobs whose bytes fit its
    ``max_body_bytes``, each with the index of its first blob. A blob too large alone still
    gets a request of its own: the server's 413 then names that item."""
    max_items = int(limits["max_items"])
    max_bytes = int(limits["max_body_bytes"]) - MULTIPART_OVERHEAD
    runs: list[tuple[int, list[bytes]]] = []
    size = 0
    for index, blob in enumerate(blobs):
        if not runs or len(runs[-1][1]) == max_items or size + len(blob) > max_bytes:
            runs.append((index, []))
            size = 0
        runs[-1][1].append(blob)
        size += len(blob)
    return runs


def flag(value: bool) -> str | None:
    """A boolean query parameter as the server reads it: "true", or left out."""
    return "true" if value else None


def encode_requests(
    http: Builder, path: str, blobs: list[bytes], limits: dict[str, Any], params: dict[str, Any]
) -> list[EncodeRequest]:
    """The multipart requests that encode ``blobs`` at ``path`` within ``limits``, answered in
    msgpack; ``params`` that are None are left out of the query."""
    query = {k: v for k, v in params.items() if v is not None}
    return [
        EncodeRequest(
            first,
            len(run),
            http.build_request(
                "POST",
                path,
                files=[("files", (f"item-{first + i}", blob)) for i, blob in enumerate(run)],
                params=query,
                headers={"Accept": MSGPACK},
            ),
        )
        for first, run in chunks(blobs, limits)
    ]


def encode_results(response: httpx.Response, first: int, count: int) -> list[Encoded | ItemError]:
    """Each item's Encoded or ItemError from the answer to an EncodeRequest; TokserveError when
    the request failed as a whole."""
    if not response.is_success:
        problem = _problem(response)
        if "items" in problem:  # every item failed, each with its own problem
            return [_item_error(first + i, p) for i, p in enumerate(problem["items"])]
        if count == 1 and response.status_code in ITEM_STATUSES:
            return [_item_error(first, {"status": response.status_code, **problem})]
        raise _error(response)
    body = msgpack.unpackb(response.content)
    return [
        _encoded(item, body["model"], body["version"], first + i)
        for i, item in enumerate(body["items"])
    ]


def encoded_or_raise(results: list[Encoded | ItemError]) -> list[Encoded]:
    """Every item's Encoded; ItemsFailed, holding all ``results``, when any item failed."""
    if any(isinstance(r, ItemError) for r in results):
        raise ItemsFailed(results)
    return [r for r in results if isinstance(r, Encoded)]


def decode_request(
    http: Builder, path: str, tokens: Encoded | np.ndarray, model: str | None, fmt: str
) -> httpx.Request:
    """The msgpack request that decodes one token array into a ``fmt`` file (by the model that
    encoded it when ``tokens`` is Encoded and ``model`` is None)."""
    if isinstance(tokens, Encoded):
        model, tokens = model or tokens.model, tokens.tokens
    array = np.ascontiguousarray(tokens, dtype="<i4")
    body = {
        "model": model,
        "tokens": {"dtype": "int32", "shape": list(array.shape), "data": array.tobytes()},
    }
    return http.build_request(
        "POST",
        path,
        content=msgpack.packb(body),
        params={"format": fmt},
        headers={"Content-Type": MSGPACK},
    )


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; else TokserveError with its status and problem detail."""
    if response.is_success:
        return response
    raise _error(response)


def _error(response: httpx.Response) -> TokserveError:
    return TokserveError(response.status_code, str(_problem(response).get("detail")))


def _problem(response: httpx.Response) -> dict[str, Any]:
    """The problem document of an error response, or its text as the detail."""
    try:
        problem = response.json()
    except ValueError:
        return {"detail": response.text}
    return problem if isinstance(problem, dict) else {"detail": response.text}


def _encoded(item: dict[str, Any], model: str, version: str, index: int) -> Encoded | ItemError:
    """One msgpack item of an encode answer: its tokens and figures, or its problem."""
    if "error" in item:
        return _item_error(index, item["error"])
    figures = {k: v for k, v in item.items() if k not in ("tokens", "dtype", "cached", "shape")}
    dtype = np.dtype(item["dtype"]).newbyteorder("<")
    shape = tuple(item["shape"])
    tokens = np.frombuffer(item["tokens"], dtype=dtype).reshape(shape)
    return Encoded(tokens, model, version, bool(item["cached"]), shape, figures)


def _item_error(index: int, problem: dict[str, Any]) -> ItemError:
    """One item's problem document as an ItemError."""
    return ItemError(
        index, int(problem["status"]), str(problem.get("detail")), str(problem.get("title", ""))
    )


def http_options(base_url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    """The httpx client settings both clients open their connection pool with."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url, "headers": headers, "timeout": timeout_s}


def models_and_limits(response: httpx.Response) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``/v1/models``'s answer: each loaded model's description, and the server's limits."""
    body = checked(response).json()
    return list(body["models"]), dict(body["limits"])
