"""A small Python client for tokserve: media in, numpy token arrays out, and back.

    with Client("http://127.0.0.1:8000") as tok:
        grids = tok.encode_images([open("photo.jpg", "rb").read()])  # [Encoded]
        grids[0].tokens                                                # [h, w] uint16
        png = tok.decode_image(grids[0])                               # PNG bytes

Tokens travel as msgpack binary arrays, never as JSON lists. Lists longer than the server's
TOKSERVE_MAX_ITEMS go as several requests. When an item fails, the call raises ItemsFailed,
which still holds every other item's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import numpy as np

MSGPACK = "application/msgpack"


class TokserveError(RuntimeError):
    """An error answered by the server: its status and the problem document's detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


# statuses a single item's request answers for that item alone (its media or tokens are bad)
_ITEM_STATUSES = (400, 413, 415, 422)
# bytes of a multipart request besides its files
_MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Encoded:
    """One item's tokens, the model version that made them and its figures (shape, frames,
    frame_rate, duration_s, ... as the server answers them)."""

    tokens: np.ndarray
    model: str
    version: str
    cached: bool
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemError:
    """One item's problem: the status, detail and title the server gave it."""

    index: int
    status: int
    detail: str
    title: str = ""


class ItemsFailed(TokserveError):
    """Some items failed; ``results`` holds, in order, each item's Encoded or ItemError."""

    def __init__(self, results: list[Encoded | ItemError]) -> None:
        self.results = results
        self.errors = [r for r in results if isinstance(r, ItemError)]
        listed = "; ".join(f"item {e.index}: {e.status} {e.detail}" for e in self.errors)
        failed = f"{len(self.errors)} of {len(results)} items failed: {listed}"
        super().__init__(self.errors[0].status, failed)


class Client:
    """Synchronous client over one keep-alive connection pool."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
        )
        self._limits: dict[str, Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[dict[str, Any]]:
        """Metadata of every loaded model."""
        models: list[dict[str, Any]] = self._check(self.http.get("/v1/models")).json()["models"]
        return models

    def limits(self) -> dict[str, Any]:
        """The server's request limits (max_items, max_body_bytes, ...), asked once."""
        if self._limits is None:
            self._limits = dict(self._check(self.http.get("/v1/models")).json()["limits"])
        return self._limits

    def encode_images(
        self, images: list[bytes], model: str | None = None, resize: str = "crop"
    ) -> list[Encoded]:
        """Image files -> one Encoded per image, tokens [h, w]."""
        return self._encode("/v1/images/encode", images, model=model, resize=resize)

    def encode_audio(
        self, clips: list[bytes], model: str | None = None, codebooks: int | None = None
    ) -> list[Encoded]:
        """Audio files -> one Encoded per clip, tokens [K, F] (or the first ``codebooks``)."""
        return self._encode("/v1/audio/encode", clips, model=model, codebooks=codebooks)

    def decode_image(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "png"
    ) -> bytes:
        """A token grid [h, w] -> the image file (by the model that encoded it, if Encoded)."""
        return self._decode("/v1/images/decode", tokens, model, fmt)

    def decode_audio(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "wav"
    ) -> bytes:
        """Tokens [k, F] -> the audio file (by the model that encoded them, if Encoded)."""
        return self._decode("/v1/audio/decode", tokens, model, fmt)

    def _encode(self, path: str, blobs: list[bytes], **params: Any) -> list[Encoded]:
        """Every blob through as few requests as the limits allow; raises ItemsFailed if any
        item failed, after every request was answered."""
        results: list[Encoded | ItemError] = []
        for chunk in self._chunks(blobs):
            results += self._encode_chunk(path, chunk, len(results), params)
        if any(isinstance(r, ItemError) for r in results):
            raise ItemsFailed(results)
        return [r for r in results if isinstance(r, Encoded)]

    def _chunks(self, blobs: list[bytes]) -> list[list[bytes]]:
        """Consecutive runs of at most max_items blobs whose bytes fit one request body."""
        limits = self.limits()
        max_items, max_bytes = limits["max_items"], limits["max_body_bytes"] - _MULTIPART_OVERHEAD
        chunks: list[list[bytes]] = []
        size = 0
        for blob in blobs:
            if not chunks or len(chunks[-1]) == max_items or size + len(blob) > max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(blob)
            size += len(blob)
        return chunks

    def _encode_chunk(
        self, path: str, blobs: list[bytes], first: int, params: dict[str, Any]
    ) -> list[Encoded | ItemError]:
        files = [("files", (f"item-{first + i}", blob)) for i, blob in enumerate(blobs)]
        query = {k: v for k, v in params.items() if v is not None}
        response = self.http.post(path, files=files, params=query, headers={"Accept": MSGPACK})
        if not response.is_success:
            problem = _problem(response)
            if "items" in problem:  # every item failed, each with its own problem
                return [_item_error(first + i, p) for i, p in enumerate(problem["items"])]
            if len(blobs) == 1 and response.status_code in _ITEM_STATUSES:
                return [_item_error(first, {"status": response.status_code, **problem})]
            self._check(response)
        body = msgpack.unpackb(response.content)
        return [
            _encoded(item, body["model"], body["version"], first + i)
            for i, item in enumerate(body["items"])
        ]

    def _decode(
        self, path: str, tokens: Encoded | np.ndarray, model: str | None, fmt: str
    ) -> bytes:
        if isinstance(tokens, Encoded):
            model, tokens = model or tokens.model, tokens.tokens
        array = np.ascontiguousarray(tokens, dtype="<i4")
        body = {
            "model": model,
            "tokens": {"dtype": "int32", "shape": list(array.shape), "data": array.tobytes()},
        }
        response = self.http.post(
            path,
            content=msgpack.packb(body),
            params={"format": fmt},
            headers={"Content-Type": MSGPACK},
        )
        return self._check(response).content

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        raise TokserveError(response.status_code, str(_problem(response).get("detail")))


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
    figures = {k: v for k, v in item.items() if k not in ("tokens", "dtype", "cached")}
    dtype = np.dtype(item["dtype"]).newbyteorder("<")
    tokens = np.frombuffer(item["tokens"], dtype=dtype).reshape(item["shape"])
    return Encoded(tokens, model, version, bool(item["cached"]), figures)


def _item_error(index: int, problem: dict[str, Any]) -> ItemError:
    """One item's problem document as an ItemError."""
    return ItemError(
        index, int(problem["status"]), str(problem.get("detail")), str(problem.get("title", ""))
    )
