"""The synchronous client: one keep-alive connection pool, a call's requests in threads."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import numpy as np

from tokserve_client import live, wire
from tokserve_client.results import Encoded
from tokserve_client.retry import RetryPolicy, Tries, stands

T = TypeVar("T")
R = TypeVar("R")


class Client(wire.Calls):
    """Encode and decode over HTTP, blocking.

    A call's list goes in as few requests as the server's limits allow, ``max_concurrency`` of
    them in flight at once; each request is retried by ``retry``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_concurrency: int = 4,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(max_concurrency, retry)
        options = wire.http_options(base_url, api_key, timeout_s)
        self.http = httpx.Client(**options, transport=transport)
        self.base_url = base_url
        self.api_key = api_key

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def models(self) -> list[dict[str, Any]]:
        """Every loaded model's description (name, modality, version, grid or codebooks, ...)."""
        models, self._limits = wire.models_and_limits(
            self._send(self.http.build_request("GET", "/v1/models"))
        )
        return models

    def limits(self) -> dict[str, Any]:
        """The server's request limits (max_items, max_body_bytes, ...), asked once."""
        if self._limits is None:
            self.models()
        assert self._limits is not None
        return self._limits

    def encode_images(
        self,
        images: list[bytes],
        model: str | None = None,
        resize: str = "crop",
        report: bool = False,
    ) -> list[Encoded]:
        """Image files -> one Encoded per image, tokens [h, w]; ItemsFailed if any failed. With
        ``report``, each item's figures hold ``quality`` (PSNR, SSIM) measured by the server."""
        return self._encode(
            "/v1/images/encode", images, model=model, resize=resize, report=wire.flag(report)
        )

    def encode_audio(
        self,
        clips: list[bytes],
        model: str | None = None,
        codebooks: int | None = None,
        report: bool = False,
    ) -> list[Encoded]:
        """Audio files -> one Encoded per clip, tokens [K, F] (or the first ``codebooks``);
        ItemsFailed if any failed. With ``report``, each item's figures hold ``quality`` (SNR,
        mel distance) measured by the server."""
        return self._encode(
            "/v1/audio/encode", clips, model=model, codebooks=codebooks, report=wire.flag(report)
        )

    def decode_image(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "png"
    ) -> bytes:
        """A token grid [h, w] -> the image file (by the model that encoded it, if Encoded)."""
        request = wire.decode_request(self.http, "/v1/images/decode", tokens, model, fmt)
        return wire.checked(self._send(request)).content

    def decode_audio(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "wav"
    ) -> bytes:
        """Tokens [k, F] -> the audio file (by the model that encoded them, if Encoded)."""
        request = wire.decode_request(self.http, "/v1/audio/decode", tokens, model, fmt)
        return wire.checked(self._send(request)).content

    def stream_encode(
        self,
        model: str | None = None,
        codebooks: int | None = None,
        encoding: str = "pcm_s16le",
        channels: int | None = None,
        sample_rate: int | None = None,
    ) -> live.SyncStreamOpening:
        """``with`` a live encode stream, blocking: AsyncClient.stream_encode's stream, whose
        results are read once the audio is sent (or from a second thread)."""
        options = {"model": model, "codebooks": codebooks, "encoding": encoding}
        extra = {"channels": channels, "sample_rate": sample_rate}
        return live.open_sync_stream(self.base_url, self.api_key, "encode", {**options, **extra})

    def stream_decode(
        self,
        model: str | None = None,
        codebooks: int | None = None,
        encoding: str = "pcm_s16le",
        bitrate: int | None = None,
    ) -> live.SyncStreamOpening:
        """``with`` a live decode stream, blocking: AsyncClient.stream_decode's stream, whose
        results are read once the tokens are sent (or from a second thread)."""
        options = {"model": model, "codebooks": codebooks, "encoding": encoding}
        return live.open_sync_stream(
            self.base_url, self.api_key, "decode", {**options, "bitrate": bitrate}
        )

    def _encode(self, path: str, blobs: list[bytes], **params: Any) -> list[Encoded]:
        """Every blob through as few requests as the limits allow; raises ItemsFailed if any
        item failed, once every request was answered."""
        requests = wire.encode_requests(self.http, path, blobs, self.limits(), params)
        answers = self._map(
            lambda r: wire.encode_results(self._send(r.request), r.first, r.count), requests
        )
        return wire.encoded_or_raise(list(itertools.chain.from_iterable(answers)))

    def _map(self, call: Callable[[T], R], items: list[T]) -> list[R]:
        """``call`` over ``items`` in order, at most ``max_concurrency`` at once; the first
        exception raised, the calls not yet started dropped."""
        if len(items) <= 1 or self.max_concurrency == 1:
            return [call(item) for item in items]
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(items)), "tokserve-client")
        try:
            return list(pool.map(call, items))
        finally:
            pool.shutdown(cancel_futures=True)

    def _send(self, request: httpx.Request) -> httpx.Response:
        """``request``'s answer, tried again as the retry policy says."""
        tries = Tries(self.retry, request)
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = self.http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            pause = tries.pause_s(outcome)
            if pause is None:
                return stands(outcome)
            time.sleep(pause)
