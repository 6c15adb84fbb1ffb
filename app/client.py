"""A small Python client for tokserve: media in, numpy token arrays out, and back.

    with Client("http://127.0.0.1:8000") as tok:
        grids = tok.encode_images([open("photo.jpg", "rb").read()])  # [h, w] uint16 arrays
        png = tok.decode_image(grids[0])                               # PNG bytes

Tokens travel as msgpack binary arrays, never as JSON lists.
"""

from __future__ import annotations

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

    def encode_images(
        self, images: list[bytes], model: str | None = None, resize: str = "crop"
    ) -> list[np.ndarray]:
        """Image files -> token grids [h, w]."""
        return self._encode("/v1/images/encode", "images", images, model=model, resize=resize)

    def encode_audio(
        self, clips: list[bytes], model: str | None = None, codebooks: int | None = None
    ) -> list[np.ndarray]:
        """Audio files -> tokens [K, F] (or the first ``codebooks`` rows)."""
        return self._encode("/v1/audio/encode", "audio", clips, model=model, codebooks=codebooks)

    def decode_image(self, tokens: np.ndarray, model: str | None = None, fmt: str = "png") -> bytes:
        """A token grid [h, w] -> the image file."""
        return self._decode("/v1/images/decode", tokens, model, fmt)

    def decode_audio(self, tokens: np.ndarray, model: str | None = None, fmt: str = "wav") -> bytes:
        """Tokens [k, F] -> the audio file."""
        return self._decode("/v1/audio/decode", tokens, model, fmt)

    def _encode(self, path: str, field: str, blobs: list[bytes], **params: Any) -> list[np.ndarray]:
        files = [("files", (f"{field}-{i}", blob)) for i, blob in enumerate(blobs)]
        query = {k: v for k, v in params.items() if v is not None}
        response = self._check(
            self.http.post(path, files=files, params=query, headers={"Accept": MSGPACK})
        )
        items = msgpack.unpackb(response.content)["items"]
        return [
            np.frombuffer(item["tokens"], dtype=np.dtype(item["dtype"]).newbyteorder("<")).reshape(
                item["shape"]
            )
            for item in items
        ]

    def _decode(self, path: str, tokens: np.ndarray, model: str | None, fmt: str) -> bytes:
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
        try:
            detail = str(response.json().get("detail", response.text))
        except ValueError:
            detail = response.text
        raise TokserveError(response.status_code, detail)
