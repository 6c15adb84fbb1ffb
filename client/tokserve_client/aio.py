"""The asyncio client: one keep-alive connection pool, a call's requests as tasks."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import numpy as np

from tokserve_client import live, wire
from tokserve_client.results import Encoded, ItemError
from tokserve_client.retry import RetryPolicy, Tries, stands


class AsyncClient(wire.Calls):
    """Encode and decode over HTTP, awaited: the same calls, answers and errors as Client.

    A call's list goes in as few requests as the server's limits allow, ``max_concurrency`` of
    them in flight at once; each request is retried by ``retry``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_concurrency: int = 4,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(max_concurrency, retry)
        options = wire.http_options(base_url, api_key, timeout_s)
        self.http = httpx.AsyncClient(**options, transport=transport)
        self.base_url = base_url
        self.api_key = api_key

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def models(self) -> list[dict[str, Any]]:
        """Every loaded model's description (name, modality, version, grid or codebooks, ...)."""
        response = await self._send(self.http.build_request("GET", "/v1/models"))
        models, self._limits = wire.models_and_limits(response)
        return models

    async def limits(self) -> dict[str, Any]:
        """The server's request limits (max_items, max_body_bytes, ...), asked once."""
        if self._limits is None:
            await self.models()
        assert self._limits is not None
        return self._limits

    async def encode_images(
        self,
        images: list[bytes],
        model: str | None = None,
        resize: str = "crop",
        report: bool = False,
    ) -> list[Encoded]:
        """Image files -> one Encoded per image, tokens [h, w]; ItemsFailed if any failed. With
        ``report``, each item's figures hold ``quality`` (PSNR, SSIM) measured by the server."""
        return await self._encode(
            "/v1/images/encode", images, model=model, resize=resize, report=wire.flag(report)
        )

    async def encode_audio(
        self,
        clips: list[bytes],
        model: str | None = None,
        codebooks: int | None = None,
        report: bool = False,
    ) -> list[Encoded]:
        """Audio files -> one Encoded per clip, tokens [K, F] (or the first ``codebooks``);
        ItemsFailed if any failed. With ``report``, each item's figures hold ``quality`` (SNR,
        mel distance) measured by the server."""
        return await self._encode(
            "/v1/audio/encode", clips, model=model, codebooks=codebooks, report=wire.flag(report)
        )

    async def decode_image(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "png"
    ) -> bytes:
        """A token grid [h, w] -> the image file (by the model that encoded it, if Encoded)."""
        request = wire.decode_request(self.http, "/v1/images/decode", tokens, model, fmt)
        return wire.checked(await self._send(request)).content

    async def decode_audio(
        self, tokens: Encoded | np.ndarray, model: str | None = None, fmt: str = "wav"
    ) -> bytes:
        """Tokens [k, F] -> the audio file (by the model that encoded them, if Encoded)."""
        request = wire.decode_request(self.http, "/v1/audio/decode", tokens, model, fmt)
        return wire.checked(await self._send(request)).content

    async def _encode(self, path: str, blobs: list[bytes], **params: Any) -> list[Encoded]:
        """Every blob through as few requests as the limits allow, ``max_concurrency`` at once;
        raises ItemsFailed if any item failed, once every request was answered."""
        requests = wire.encode_requests(self.http, path, blobs, await self.limits(), params)
        places = asyncio.Semaphore(self.max_concurrency)

        async def answer(request: wire.EncodeRequest) -> list[Encoded | ItemError]:
            async with places:
                response = await self._send(request.request)
            return wire.encode_results(response, request.first, request.count)

        tasks = [asyncio.ensure_future(answer(request)) for request in requests]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return wire.encoded_or_raise(list(itertools.chain.from_iterable(answers)))

    def stream_encode(
        self,
        model: str | None = None,
        codebooks: int | None = None,
        encoding: str = "pcm_s16le",
        channels: int | None = None,
        sample_rate: int | None = None,
    ) -> live.StreamOpening:
        """``async with`` a live encode stream of a causal model: send audio as it comes (at
        ``sample_rate``, the model's by default; the server resamples another; or, with
        ``encoding="ogg_opus"``, an Ogg Opus file's bytes), iterate token frames
        [codebooks, n] as they complete."""
        options = {"model": model, "codebooks": codebooks, "encoding": encoding}
        extra = {"channels": channels, "sample_rate": sample_rate}
        return live.open_stream(self.base_url, self.api_key, "encode", {**options, **extra})

    def stream_decode(
        self,
        model: str | None = None,
        codebooks: int | None = None,
        encoding: str = "pcm_s16le",
        bitrate: int | None = None,
    ) -> live.StreamOpening:
        """``async with`` a live decode stream: send token frames [codebooks, n], iterate audio
        samples [n * hop, channels] in ``encoding``; with ``encoding="ogg_opus"``, bytes of
        whole Ogg pages (joined: one .opus file) at ``bitrate`` bit/s (the server's default:
        32000 per channel)."""
        options = {"model": model, "codebooks": codebooks, "encoding": encoding}
        return live.open_stream(
            self.base_url, self.api_key, "decode", {**options, "bitrate": bitrate}
        )

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """``request``'s answer, tried again as the retry policy says."""
        tries = Tries(self.retry, request)
        while True:
            try:
                outcome: httpx.Response | httpx.TransportError = await self.http.send(request)
            except httpx.TransportError as exc:
                outcome = exc
            pause = tries.pause_s(outcome)
            if pause is None:
                return stands(outcome)
            await asyncio.sleep(pause)
