"""Live audio streams over the server's WebSockets (docs/streaming.md): send audio as it is
recorded and read each frame's tokens as they come, or send token frames and read audio.

    async with AsyncClient(url) as tok:
        async with tok.stream_encode(model="mimi") as stream:
            await stream.send_audio(pcm)      # int16 or float32 samples [T] or [T, C]
            await stream.end()
            async for tokens in stream:       # uint16 [codebooks, n] as frames complete
                ...
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tokserve_client.results import TokserveError

READY, AUDIO, TOKENS, END, ERROR = 0x00, 0x01, 0x02, 0x03, 0x04
TOKENS_HEADER = struct.Struct("<IHH")
ENCODINGS: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}


class StreamClosed(TokserveError):
    """The server ended a stream early: its close code (4000 + an HTTP status; 4408: read too
    slowly) and its sentence."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


class AudioStream:
    """One live stream. ``ready`` is the server's READY (rate, hop, codebooks, ...); iterate it
    for results: tokens [codebooks, n] (encode) or samples [n * hop, channels] (decode)."""

    def __init__(self, ws: ClientConnection, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.ready = ready
        self.frames_sent = 0
        self.frames = 0  # frames the server said it answered, at END

    async def send_audio(self, samples: np.ndarray) -> None:
        """PCM samples [T] or [T, channels], in the stream's encoding (int16 or float32)."""
        dtype = ENCODINGS[self.ready["encoding"]]
        await self.ws.send(bytes([AUDIO]) + np.ascontiguousarray(samples, dtype=dtype).tobytes())

    async def send_tokens(self, tokens: np.ndarray) -> None:
        """Token frames [codebooks, n], following the ones sent before."""
        dtype = np.dtype("<u2") if self.ready["token_bytes"] == 2 else np.dtype("<i4")
        ids = np.ascontiguousarray(tokens, dtype=dtype)
        header = TOKENS_HEADER.pack(self.frames_sent, ids.shape[0], ids.shape[1])
        await self.ws.send(bytes([TOKENS]) + header + ids.tobytes())
        self.frames_sent += ids.shape[1]

    async def end(self) -> None:
        """No more input: the server answers what is left, then END."""
        await self.ws.send(bytes([END]))

    async def __aiter__(self) -> AsyncIterator[np.ndarray]:
        token_dtype = np.dtype("<u2") if self.ready["token_bytes"] == 2 else np.dtype("<i4")
        channels = self.ready["channels"]
        try:
            async for message in self.ws:
                assert isinstance(message, bytes)
                kind, body = message[0], message[1:]
                if kind == TOKENS:
                    _, rows, frames = TOKENS_HEADER.unpack_from(body)
                    ids = body[TOKENS_HEADER.size :]
                    yield np.frombuffer(ids, dtype=token_dtype).reshape(rows, frames)
                elif kind == AUDIO:
                    pcm = np.frombuffer(body, dtype=ENCODINGS[self.ready["encoding"]])
                    yield pcm.reshape(-1, channels)
                elif kind == END:
                    (self.frames,) = struct.unpack("<I", body)
                elif kind == ERROR:
                    error = json.loads(body)
                    raise StreamClosed(int(error["code"]), str(error["detail"]))
        except ConnectionClosed:
            pass
        if self.ws.close_code not in (1000, 1001):
            raise StreamClosed(self.ws.close_code or 1006, self.ws.close_reason or "closed")


class StreamOpening:
    """``async with``: connect, read READY, yield the AudioStream, close."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key
        self.ws: ClientConnection | None = None

    async def __aenter__(self) -> AudioStream:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.ws = await connect(self.url, additional_headers=headers, max_size=None)
        first = await self.ws.recv()
        assert isinstance(first, bytes)
        if first[0] == ERROR:
            error = json.loads(first[1:])
            await self.ws.close()
            raise StreamClosed(int(error["code"]), str(error["detail"]))
        return AudioStream(self.ws, json.loads(first[1:]))

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()


def stream_url(base_url: str, op: str, options: dict[str, Any]) -> str:
    """The WebSocket URL of /v1/audio/stream/{op} with the options that are set."""
    query = urlencode({k: v for k, v in options.items() if v is not None})
    scheme = "wss://" if base_url.startswith("https://") else "ws://"
    host = base_url.split("://", 1)[-1].rstrip("/")
    return f"{scheme}{host}/v1/audio/stream/{op}?{query}"


def open_stream(
    base_url: str, api_key: str | None, op: str, options: dict[str, Any]
) -> StreamOpening:
    """An ``async with`` for a live stream (see AsyncClient.stream_encode)."""
    return StreamOpening(stream_url(base_url, op, options), api_key)
