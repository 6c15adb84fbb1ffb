"""Live audio streams over the server's WebSockets (docs/streaming.md): send audio as it is
recorded and read each frame's tokens as they come, or send token frames and read audio.

    async with AsyncClient(url) as tok:
        async with tok.stream_encode(model="mimi") as stream:
            await stream.send_audio(pcm)      # int16 or float32 samples [T] or [T, C]
            await stream.end()
            async for tokens in stream:       # uint16 [codebooks, n] as frames complete
                ...

``Client`` opens the same streams blocking (``with tok.stream_decode(...) as stream``). With
``encoding="ogg_opus"`` the audio is an Ogg Opus file's bytes: sent as they are (encode), and
received as whole pages that, joined, are one ``.opus`` file (decode).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from tokserve_client.results import TokserveError

READY, AUDIO, TOKENS, END, ERROR = 0x00, 0x01, 0x02, 0x03, 0x04
TOKENS_HEADER = struct.Struct("<IHH")
ENCODINGS: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
OGG_OPUS = "ogg_opus"  # an Ogg Opus file's bytes, as they are


class StreamClosed(TokserveError):
    """The server ended a stream early: its close code (4000 + an HTTP status; 4408: read too
    slowly) and its sentence."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


class Framing:
    """A stream's messages, built and read the same way by the async and the blocking stream:
    ``ready`` is the server's READY (rate, hop, codebooks, encoding, ...)."""

    def __init__(self, ready: dict[str, Any]) -> None:
        self.ready = ready
        self.frames_sent = 0
        self.frames = 0  # frames the server said it answered, at END

    def audio_message(self, audio: np.ndarray | bytes) -> bytes:
        """AUDIO: PCM samples [T] or [T, channels] in the stream's encoding (int16 or float32),
        or bytes as they are (an Ogg Opus file's next bytes)."""
        if isinstance(audio, bytes):
            return bytes([AUDIO]) + audio
        if self.ready["encoding"] == OGG_OPUS:
            raise TypeError("an ogg_opus stream sends an Ogg Opus file's bytes, not samples")
        dtype = ENCODINGS[self.ready["encoding"]]
        return bytes([AUDIO]) + np.ascontiguousarray(audio, dtype=dtype).tobytes()

    def tokens_message(self, tokens: np.ndarray) -> bytes:
        """TOKENS: frames [codebooks, n], following the ones sent before."""
        dtype = np.dtype("<u2") if self.ready["token_bytes"] == 2 else np.dtype("<i4")
        ids = np.ascontiguousarray(tokens, dtype=dtype)
        header = TOKENS_HEADER.pack(self.frames_sent, ids.shape[0], ids.shape[1])
        self.frames_sent += ids.shape[1]
        return bytes([TOKENS]) + header + ids.tobytes()

    def result(self, message: bytes | str) -> np.ndarray | bytes | None:
        """A server message's result: tokens [codebooks, n], samples [n * hop, channels], Ogg
        pages (bytes); None for END; StreamClosed for ERROR."""
        assert isinstance(message, bytes)
        kind, body = message[0], message[1:]
        if kind == TOKENS:
            token_dtype = np.dtype("<u2") if self.ready["token_bytes"] == 2 else np.dtype("<i4")
            _, rows, frames = TOKENS_HEADER.unpack_from(body)
            ids = body[TOKENS_HEADER.size :]
            return np.frombuffer(ids, dtype=token_dtype).reshape(rows, frames)
        if kind == AUDIO and self.ready["encoding"] == OGG_OPUS:
            return body
        if kind == AUDIO:
            pcm = np.frombuffer(body, dtype=ENCODINGS[self.ready["encoding"]])
            return pcm.reshape(-1, self.ready["channels"])
        if kind == END:
            (self.frames,) = struct.unpack("<I", body)
        elif kind == ERROR:
            error = json.loads(body)
            raise StreamClosed(int(error["code"]), str(error["detail"]))
        return None


def ready_or_refused(first: bytes | str) -> dict[str, Any]:
    """The server's first message: READY's description, or its ERROR raised as StreamClosed."""
    assert isinstance(first, bytes)
    if first[0] == ERROR:
        error = json.loads(first[1:])
        raise StreamClosed(int(error["code"]), str(error["detail"]))
    return dict(json.loads(first[1:]))


def check_closed(code: int | None, reason: str | None) -> None:
    """StreamClosed unless the server closed the stream normally (1000, or 1001 on drain)."""
    if code not in (1000, 1001):
        raise StreamClosed(code or 1006, reason or "closed")


class AudioStream(Framing):
    """One live stream, awaited; iterate it for results: tokens [codebooks, n] (encode), or
    samples [n * hop, channels] (decode; with ogg_opus, bytes of whole Ogg pages)."""

    def __init__(self, ws: ClientConnection, ready: dict[str, Any]) -> None:
        super().__init__(ready)
        self.ws = ws

    async def send_audio(self, audio: np.ndarray | bytes) -> None:
        """PCM samples [T] or [T, channels] in the stream's encoding (int16 or float32), or
        the next bytes of an Ogg Opus file (encoding="ogg_opus")."""
        await self.ws.send(self.audio_message(audio))

    async def send_tokens(self, tokens: np.ndarray) -> None:
        """Token frames [codebooks, n], following the ones sent before."""
        await self.ws.send(self.tokens_message(tokens))

    async def end(self) -> None:
        """No more input: the server answers what is left, then END."""
        await self.ws.send(bytes([END]))

    async def __aiter__(self) -> AsyncIterator[np.ndarray | bytes]:
        try:
            async for message in self.ws:
                result = self.result(message)
                if result is not None:
                    yield result
        except ConnectionClosed:
            pass
        check_closed(self.ws.close_code, self.ws.close_reason)


class SyncAudioStream(Framing):
    """One live stream, blocking: send, ``end()``, then iterate the results as AudioStream's.
    Results wait on the server while the client sends; to read while sending a long stream,
    iterate in a second thread (a connection sends and receives from two threads at once)."""

    def __init__(self, ws: SyncConnection, ready: dict[str, Any]) -> None:
        super().__init__(ready)
        self.ws = ws

    def send_audio(self, audio: np.ndarray | bytes) -> None:
        """PCM samples [T] or [T, channels] in the stream's encoding (int16 or float32), or
        the next bytes of an Ogg Opus file (encoding="ogg_opus")."""
        self.ws.send(self.audio_message(audio))

    def send_tokens(self, tokens: np.ndarray) -> None:
        """Token frames [codebooks, n], following the ones sent before."""
        self.ws.send(self.tokens_message(tokens))

    def end(self) -> None:
        """No more input: the server answers what is left, then END."""
        self.ws.send(bytes([END]))

    def __iter__(self) -> Iterator[np.ndarray | bytes]:
        try:
            for message in self.ws:
                result = self.result(message)
                if result is not None:
                    yield result
        except ConnectionClosed:
            pass
        check_closed(self.ws.close_code, self.ws.close_reason)


class StreamOpening:
    """``async with``: connect, read READY, yield the AudioStream, close."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key
        self.ws: ClientConnection | None = None

    async def __aenter__(self) -> AudioStream:
        self.ws = await connect(
            self.url, additional_headers=key_header(self.api_key), max_size=None
        )
        try:
            return AudioStream(self.ws, ready_or_refused(await self.ws.recv()))
        except StreamClosed:
            await self.ws.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()


class SyncStreamOpening:
    """``with``: connect, read READY, yield the SyncAudioStream, close."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key
        self.connection = contextlib.ExitStack()

    def __enter__(self) -> SyncAudioStream:
        connecting = sync_connect(
            self.url, additional_headers=key_header(self.api_key), max_size=None
        )
        ws: SyncConnection = self.connection.enter_context(connecting)
        try:
            return SyncAudioStream(ws, ready_or_refused(ws.recv()))
        except StreamClosed:
            self.connection.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.connection.close()


def key_header(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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


def open_sync_stream(
    base_url: str, api_key: str | None, op: str, options: dict[str, Any]
) -> SyncStreamOpening:
    """A ``with`` for a live stream (see Client.stream_encode)."""
    return SyncStreamOpening(stream_url(base_url, op, options), api_key)
