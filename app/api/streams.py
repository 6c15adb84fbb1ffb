"""WebSocket /v1/audio/stream/encode and /decode: the wire protocol of live streams.

docs/streaming.md is the protocol's definition. Binary messages start with a type byte
(``MessageType``); ``?protocol=json`` speaks the same messages as JSON text for debugging.
Errors are a final ERROR message, then a close frame whose code is 4000 + the HTTP status
that a request would have got (4400, 4401, 4404, 4408, 4413, 4415, 4422, 4429, 4503).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from app.api.deps import given_key, is_valid_key
from app.engine import Engine
from app.ogg_opus import (
    BITRATE_PER_CHANNEL,
    MAX_BITRATE_PER_CHANNEL,
    MIN_BITRATE_PER_CHANNEL,
    OPUS_RATE,
    OggOpusReader,
    OggOpusWriter,
)
from app.streaming import (
    CLOSE_DONE,
    CLOSE_GOING_AWAY,
    Direction,
    Outgoing,
    Stream,
    StreamRefused,
    slow_reader,
)
from app.tokens import token_dtype

router = APIRouter(prefix="/v1/audio/stream", tags=["streams"])

SUBPROTOCOL = "tokserve.v1"
KEY_PREFIX = "key."  # a browser cannot set headers: it offers its key as a subprotocol
ENCODINGS: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
OGG_OPUS = "ogg_opus"  # an Ogg Opus file's bytes: decoded as they come, or encoded
TOKENS_HEADER = struct.Struct("<IHH")  # first frame, rows, frames
END_BODY = struct.Struct("<I")  # frames in all
REFUSAL_TIMEOUT_S = 5.0


class MessageType(enum.IntEnum):
    """The first byte of every binary message."""

    READY = 0x00  # server: UTF-8 JSON describing the stream
    AUDIO = 0x01  # PCM, interleaved, little-endian
    TOKENS = 0x02  # TOKENS_HEADER, then rows x frames ids, row-major
    END = 0x03  # client: no more input; server: END_BODY, all results sent
    ERROR = 0x04  # server: UTF-8 JSON {code, title, detail}, then the close frame


@dataclass(frozen=True)
class StreamOptions:
    """What a client asked for in the query string."""

    model: str
    codebooks: int
    encoding: str
    channels: int  # of the client's PCM
    sample_rate: int  # of the client's PCM (encode; decode answers at the model's)
    protocol: Literal["binary", "json"]
    bitrate: int = 0  # bit/s of the Opus a decode stream answers with encoding=ogg_opus


@router.websocket("/encode")
async def stream_encode(websocket: WebSocket) -> None:
    """Audio chunks in, token frames out, as soon as the codec can emit them."""
    await serve_stream(websocket, "encode")


@router.websocket("/decode")
async def stream_decode(websocket: WebSocket) -> None:
    """Token frames in, audio chunks out."""
    await serve_stream(websocket, "decode")


async def serve_stream(websocket: WebSocket, direction: Direction) -> None:
    """Accept, check the options and limits, then read and write until the stream ends."""
    engine: Engine = websocket.app.state.engine
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    protocol: Literal["binary", "json"] = (
        "json" if websocket.query_params.get("protocol") == "json" else "binary"
    )
    try:
        key = check_key(websocket, engine)
        options = parse_options(websocket, engine, direction)
        stream = engine.streams.open(
            options.model, direction, key, options.codebooks, options.sample_rate
        )
    except StreamRefused as refusal:
        await send_refusal(websocket, refusal, protocol)
        return
    hub = stream.hub
    try:
        await send_message(websocket, protocol, MessageType.READY, ready_body(stream, options))
        reader = asyncio.create_task(read_input(websocket, stream, options))
        try:
            await write_output(websocket, stream, options)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left; nothing more can be sent
    finally:
        hub.close(stream)


def check_key(websocket: WebSocket, engine: Engine) -> str:
    """The stream's API key (headers, or a ``key.<KEY>`` subprotocol); '' when keys are off."""
    keys = engine.settings.api_keys
    if not keys:
        return ""
    given = given_key(websocket)
    for offered in websocket.scope.get("subprotocols", []):
        if offered.startswith(KEY_PREFIX):
            given = offered[len(KEY_PREFIX) :]
    if not is_valid_key(given, keys):
        raise StreamRefused(
            4401,
            "API key required",
            "A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key', "
            f"or offer the subprotocols '{SUBPROTOCOL}' and '{KEY_PREFIX}<key>'.",
        )
    return given


def parse_options(websocket: WebSocket, engine: Engine, direction: Direction) -> StreamOptions:
    """The query string's model, codebooks, encoding, sample_rate and channels, checked."""
    query = websocket.query_params
    protocol: Literal["binary", "json"] = "json" if query.get("protocol") == "json" else "binary"
    streaming = engine.streams.streaming_models()
    names = ", ".join(streaming) or "none"
    model = query.get("model") or (streaming[0] if streaming else "")
    endpoint = engine.endpoints.get(model)
    if endpoint is None or endpoint.info.modality != "audio":
        audio = [n for n, e in engine.endpoints.items() if e.info.modality == "audio"]
        raise StreamRefused(
            4404,
            "Unknown model",
            f"No audio model {model!r} is loaded; the audio models are: "
            f"{', '.join(audio) or 'none'} (those that stream: {names}).",
        )
    if (model, direction) not in engine.streams.hubs:
        info = endpoint.info
        why = (
            "it has no decoder"
            if direction == "decode" and info.encode_only
            else "it is not a causal model with streaming state (its frames see later samples, "
            "so its tokens would depend on where the audio was cut)"
        )
        raise StreamRefused(
            4422,
            "Model cannot stream",
            f"Model {model} cannot {direction} a stream: {why}. The models loaded that stream "
            f"are: {names} (GET /v1/models: streaming true).",
        )
    info = engine.streams.hubs[(model, direction)].info
    codebooks = _int_option(query.get("codebooks"), info.codebooks, "codebooks")
    if not 1 <= codebooks <= info.codebooks:
        raise StreamRefused(
            4422,
            "Bad codebooks",
            f"Model {model} has {info.codebooks} codebooks; codebooks={codebooks} must be 1 to "
            f"{info.codebooks}.",
        )
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS and encoding != OGG_OPUS:
        raise StreamRefused(
            4415,
            "Unknown encoding",
            f"encoding={encoding!r} is not one this server speaks; it takes "
            f"{', '.join(ENCODINGS)} (interleaved little-endian PCM), or {OGG_OPUS} (an Ogg Opus "
            "file's bytes).",
        )
    bitrate = opus_bitrate(query.get("bitrate"), encoding, direction, info.channels)
    if encoding == OGG_OPUS and direction == "encode":
        if "sample_rate" in query or "channels" in query:
            raise StreamRefused(
                4422,
                "Ogg Opus says its own format",
                f"encoding={OGG_OPUS} takes its channels from the stream's OpusHead and decodes at "
                f"{OPUS_RATE} Hz; leave sample_rate and channels out.",
            )
        return StreamOptions(model, codebooks, encoding, info.channels, OPUS_RATE, protocol)
    rate = _int_option(query.get("sample_rate"), info.sample_rate, "sample_rate")
    lowest = engine.settings.min_audio_sample_rate
    if direction == "decode" and rate != info.sample_rate:
        raise StreamRefused(
            4422,
            "Bad sample rate",
            f"Model {model} decodes streams to audio at {info.sample_rate} Hz; sample_rate={rate} "
            f"is not accepted. Leave sample_rate out or send {info.sample_rate}.",
        )
    if rate != info.sample_rate and rate < lowest:
        raise StreamRefused(
            4422,
            "Bad sample rate",
            f"sample_rate={rate} is below the {lowest} Hz accepted "
            f"(TOKSERVE_MIN_AUDIO_SAMPLE_RATE); declare the audio's real rate (model {model} "
            f"takes {info.sample_rate} Hz; other rates are resampled).",
        )
    channels = _int_option(query.get("channels"), info.channels, "channels")
    if channels not in (1, info.channels) and info.channels != 1:
        raise StreamRefused(
            4422,
            "Bad channels",
            f"Model {model} takes {info.channels} channels; send mono or {info.channels}-channel "
            "PCM.",
        )
    if direction == "decode":
        channels = info.channels
    return StreamOptions(model, codebooks, encoding, channels, rate, protocol, bitrate)


def opus_bitrate(value: str | None, encoding: str, direction: Direction, channels: int) -> int:
    """The bit/s a decode stream's Opus encoder is asked for (its default unless given), for a
    model of mono or stereo audio; 0 where no Opus is encoded, which takes no bitrate."""
    if encoding != OGG_OPUS or direction != "decode":
        if value is not None:
            raise StreamRefused(
                4422,
                "Bitrate without Opus",
                f"bitrate sets the Opus of a decode stream with encoding={OGG_OPUS}; this "
                f"{direction} stream with encoding={encoding} takes none. Leave it out.",
            )
        return 0
    if channels > 2:
        raise StreamRefused(
            4422,
            "Opus channels",
            f"The model decodes {channels} channels; encoding={OGG_OPUS} answers mono or stereo "
            "(Opus mapping family 0). Ask for pcm_s16le or pcm_f32le.",
        )
    bitrate = _int_option(value, BITRATE_PER_CHANNEL * channels, "bitrate")
    lowest, highest = MIN_BITRATE_PER_CHANNEL * channels, MAX_BITRATE_PER_CHANNEL * channels
    if not lowest <= bitrate <= highest:
        raise StreamRefused(
            4422,
            "Bad bitrate",
            f"bitrate={bitrate} is outside the {lowest} to {highest} bit/s accepted for "
            f"{channels}-channel Opus ({MIN_BITRATE_PER_CHANNEL} to {MAX_BITRATE_PER_CHANNEL} "
            f"per channel; {BITRATE_PER_CHANNEL * channels} when left out).",
        )
    return bitrate


def _int_option(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise StreamRefused(
            4400, f"Bad {name}", f"{name} must be a whole number, not {value!r}."
        ) from None


def ready_body(stream: Stream, options: StreamOptions) -> dict[str, Any]:
    """The READY message: what the client needs to frame its input and read the output."""
    info = stream.info
    hub = stream.hub
    return {
        "model": hub.name,
        "version": hub.model.version,
        "op": hub.direction,
        "sample_rate": info.sample_rate,
        "input_sample_rate": options.sample_rate,
        "channels": options.channels,
        "hop_length": info.hop_length,
        "frame_rate": info.frame_rate,
        "codebooks": options.codebooks,
        "vocab_size": info.vocab_size,
        "token_bytes": token_dtype(info.vocab_size).itemsize,
        "encoding": options.encoding,
        "first_frames": hub.first_frames,
    }


async def read_input(websocket: WebSocket, stream: Stream, options: StreamOptions) -> None:
    """Client messages into the stream, reading only while it has room (backpressure); a
    malformed one ends the stream with its refusal."""
    limit = stream.hub.settings.stream_max_message_bytes
    idle_s = stream.hub.settings.stream_idle_timeout_s
    ogg = OggOpusReader() if options.encoding == OGG_OPUS else None
    try:
        while not stream.ended and stream.dropped is None:
            await stream.room.wait()
            try:
                message = await asyncio.wait_for(websocket.receive(), idle_s)
            except TimeoutError:
                raise StreamRefused(
                    4408,
                    "Idle stream",
                    f"No message came for {idle_s:g} s (TOKSERVE_STREAM_IDLE_TIMEOUT_S); an idle "
                    "stream is closed. Send END when done.",
                ) from None
            if message["type"] == "websocket.disconnect":
                stream.drop(StreamRefused(CLOSE_DONE, "Client left", "closed"), counted=False)
                return
            kind, body = parse_message(message, options.protocol, limit)
            if kind == MessageType.END:
                stream.end()
            elif kind == MessageType.AUDIO and ogg is not None:
                # off the event loop: a 1 MiB message of Opus is minutes of audio to decode
                samples = await asyncio.to_thread(ogg_samples, ogg, audio_bytes(body))
                stream.push(mixed(samples, stream.info.channels))
            elif kind == MessageType.AUDIO and stream.hub.direction == "encode":
                stream.push(audio_samples(body, options, stream))
            elif kind == MessageType.TOKENS and stream.hub.direction == "decode":
                stream.push(token_frames(body, options, stream))
            else:
                raise StreamRefused(
                    4400,
                    "Unexpected message",
                    f"A {stream.hub.direction} stream takes "
                    f"{'AUDIO' if stream.hub.direction == 'encode' else 'TOKENS'} and END "
                    f"messages, not {kind.name}.",
                )
    except StreamRefused as refusal:
        stream.drop(refusal, counted=False)


def parse_message(
    message: Mapping[str, Any], protocol: Literal["binary", "json"], limit: int
) -> tuple[MessageType, Any]:
    """A received WebSocket message -> its type and body (bytes; JSON: the decoded object)."""
    data, text = message.get("bytes"), message.get("text")
    size = len(data) if data is not None else len((text or "").encode())
    if size > limit:
        raise StreamRefused(
            4413,
            "Message too large",
            f"A message of {size} bytes; at most {limit} are accepted "
            "(TOKSERVE_STREAM_MAX_MESSAGE_BYTES). Send smaller chunks.",
        )
    if protocol == "binary":
        if data is None or not data:
            raise StreamRefused(
                4400,
                "Binary messages only",
                "This stream speaks the binary protocol: send binary messages whose first byte "
                "is the message type (docs/streaming.md), or connect with ?protocol=json.",
            )
        try:
            kind = MessageType(data[0])
        except ValueError:
            raise StreamRefused(
                4400,
                "Unknown message type",
                f"Message type {data[0]:#04x} is not one of AUDIO 0x01, TOKENS 0x02, END 0x03.",
            ) from None
        return kind, data[1:]
    try:
        parsed = json.loads(text if text is not None else (data or b"").decode())
        kind = MessageType[str(parsed["type"]).upper()]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StreamRefused(
            4400,
            "Bad JSON message",
            'JSON messages are objects with a "type" of "audio" (with "data": base64 PCM), '
            '"tokens" (with "tokens": rows of ids) or "end".',
        ) from None
    return kind, parsed


def audio_samples(body: Any, options: StreamOptions, stream: Stream) -> np.ndarray:
    """An AUDIO body (PCM bytes, or JSON with base64 "data") -> samples [C, T] float32 in the
    model's channels, mixed as a whole-file encode mixes them."""
    body = audio_bytes(body)
    dtype = ENCODINGS[options.encoding]
    width = dtype.itemsize * options.channels
    if len(body) % width:
        raise StreamRefused(
            4400,
            "Partial sample",
            f"AUDIO holds {len(body)} bytes, not whole samples of {options.channels} channel(s) "
            f"of {options.encoding} ({width} bytes each).",
        )
    samples = np.frombuffer(body, dtype=dtype).reshape(-1, options.channels)
    if dtype.kind == "i":
        samples = samples.astype(np.float32) / 32768.0
    elif not np.isfinite(samples).all():
        raise StreamRefused(
            4422, "Bad samples", "The audio holds NaN or infinite samples; send finite ones."
        )
    return mixed(samples, stream.info.channels)


def audio_bytes(body: Any) -> bytes:
    """An AUDIO body's bytes: binary as sent, JSON's base64 "data" decoded."""
    if not isinstance(body, dict):
        return bytes(body)
    try:
        return base64.b64decode(str(body["data"]), validate=True)
    except (KeyError, binascii.Error):
        raise StreamRefused(
            4400, "Bad audio message", 'An audio message carries "data": base64 audio bytes.'
        ) from None


def ogg_samples(reader: OggOpusReader, data: bytes) -> np.ndarray:
    """The samples [T, C] that the next bytes of an Ogg Opus stream complete."""
    try:
        return reader.feed(data)
    except (av.FFmpegError, ValueError) as exc:
        raise StreamRefused(
            4415, "Bad Opus packet", f"libopus could not decode a packet of the stream: {exc}."
        ) from None


def mixed(samples: np.ndarray, model_channels: int) -> np.ndarray:
    """Samples [T, C] -> [model_channels, T] float32, mixed as a whole-file encode mixes them:
    averaged to mono, or mono repeated."""
    if samples.shape[1] != model_channels:
        if model_channels == 1:
            samples = samples.mean(axis=1, keepdims=True)
        else:
            samples = np.repeat(samples, model_channels, axis=1)
    return np.ascontiguousarray(samples.T, dtype=np.float32)


def token_frames(body: Any, options: StreamOptions, stream: Stream) -> np.ndarray:
    """A TOKENS body (header and ids, or JSON "tokens") -> ids [rows, n] int64, checked."""
    info = stream.info
    rows = options.codebooks
    if isinstance(body, dict):
        try:
            tokens = np.asarray(body["tokens"], dtype=np.int64)
        except (KeyError, ValueError, TypeError, OverflowError):
            tokens = np.zeros((0, 0), dtype=np.int64)
    else:
        if len(body) < TOKENS_HEADER.size:
            raise StreamRefused(4400, "Short TOKENS", "TOKENS begins with a 8-byte header.")
        first, rows_sent, frames = TOKENS_HEADER.unpack_from(body)
        dtype = token_dtype(info.vocab_size)
        ids = body[TOKENS_HEADER.size :]
        if rows_sent != rows or len(ids) != rows * frames * dtype.itemsize:
            raise StreamRefused(
                4400,
                "Bad TOKENS size",
                f"TOKENS declares {rows_sent} rows x {frames} frames; this stream takes {rows} "
                f"rows, and the body must hold rows x frames ids of {dtype.itemsize} bytes.",
            )
        if first != stream.frames_received:
            raise StreamRefused(
                4400,
                "Frames out of order",
                f"TOKENS starts at frame {first}; the stream expects frame "
                f"{stream.frames_received} next.",
            )
        tokens = np.frombuffer(ids, dtype=dtype).reshape(rows, frames).astype(np.int64)
    if tokens.ndim != 2 or tokens.shape[0] != rows or not tokens.shape[1]:
        raise StreamRefused(
            4422,
            "Bad tokens",
            f"Tokens are {rows} rows (codebooks) of at least one frame of ids.",
        )
    if tokens.min() < 0 or tokens.max() >= info.vocab_size:
        raise StreamRefused(
            4422,
            "Tokens out of range",
            f"Token ids must be 0 to {info.vocab_size - 1}; got {tokens.min()} to {tokens.max()}.",
        )
    stream.frames_received += tokens.shape[1]
    return tokens


async def write_output(websocket: WebSocket, stream: Stream, options: StreamOptions) -> None:
    """Results to the client as they come, then END and a close (1000, or 1001 on drain), or
    the stream's refusal."""
    limit_s = stream.hub.settings.stream_max_unsent_s
    opus = (
        OggOpusWriter(stream.info.sample_rate, options.channels, options.bitrate)
        if options.encoding == OGG_OPUS and stream.hub.direction == "decode"
        else None
    )
    if opus is not None:
        await send_audio(websocket, options.protocol, 0, opus.headers())
    while True:
        outgoing = await stream.outbox.get()
        if outgoing is None:
            break
        if stream.dropped is not None:
            continue  # a dropped stream's results are not sent
        try:
            # a send that waits this long has a client that does not read
            await asyncio.wait_for(send_result(websocket, stream, options, outgoing, opus), limit_s)
        except TimeoutError:
            stream.drop(slow_reader(limit_s, limit_s))
            continue
        stream.hub.sent(stream, outgoing)
    if stream.dropped is not None and stream.dropped.code != CLOSE_DONE:
        await send_refusal(websocket, stream.dropped, options.protocol)
        return
    if stream.dropped is not None:
        return  # the client left
    frames = stream.frames_in
    if opus is not None:
        await send_audio(websocket, options.protocol, frames, await asyncio.to_thread(opus.finish))
    body = {"frames": frames} if options.protocol == "json" else END_BODY.pack(frames)
    await send_message(websocket, options.protocol, MessageType.END, body)
    if stream.going_away:
        await websocket.close(
            CLOSE_GOING_AWAY, f"server shutting down; stream ended at frame {frames}"
        )
    else:
        await websocket.close(CLOSE_DONE, "end of stream")


async def send_result(
    websocket: WebSocket,
    stream: Stream,
    options: StreamOptions,
    outgoing: Outgoing,
    opus: OggOpusWriter | None,
) -> None:
    """One TOKENS (encode) or AUDIO (decode) message; none where Opus completed no packet."""
    data = outgoing.data
    if stream.hub.direction == "encode":
        if options.protocol == "json":
            body: Any = {"frame": outgoing.first_frame, "tokens": data.tolist()}
        else:
            header = TOKENS_HEADER.pack(outgoing.first_frame, data.shape[0], data.shape[1])
            body = header + np.ascontiguousarray(data).tobytes()
        await send_message(websocket, options.protocol, MessageType.TOKENS, body)
        return
    samples = data.T  # [n * hop, C]: interleaved
    if opus is not None:
        # off the event loop (PyAV lets go of the GIL in libopus): about 1 ms per 80 ms here
        audio = await asyncio.to_thread(opus.write, samples)
        if not audio:
            return
    elif options.encoding == "pcm_s16le":
        audio = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2").tobytes()
    else:
        audio = samples.astype("<f4").tobytes()
    await send_audio(websocket, options.protocol, outgoing.first_frame, audio)


async def send_audio(
    websocket: WebSocket, protocol: Literal["binary", "json"], frame: int, audio: bytes
) -> None:
    """One AUDIO message: its bytes, or JSON with the first frame they hold and base64 "data"."""
    body: Any = audio
    if protocol == "json":
        body = {"frame": frame, "data": base64.b64encode(audio).decode()}
    await send_message(websocket, protocol, MessageType.AUDIO, body)


async def send_message(
    websocket: WebSocket, protocol: Literal["binary", "json"], kind: MessageType, body: Any
) -> None:
    """A message of ``kind``: the type byte and the body (bytes, or a dict as JSON), or JSON
    text with "type"."""
    if protocol == "json":
        await websocket.send_text(json.dumps({"type": kind.name.lower(), **body}))
    elif isinstance(body, dict):
        await websocket.send_bytes(bytes([kind]) + json.dumps(body).encode())
    else:
        await websocket.send_bytes(bytes([kind]) + body)


async def send_refusal(
    websocket: WebSocket, refusal: StreamRefused, protocol: Literal["binary", "json"]
) -> None:
    """ERROR with the whole sentence, then the close frame with its code and title."""
    body = {"code": refusal.code, "title": refusal.title, "detail": refusal.detail}
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, TimeoutError):
        # bounded: a client that reads nothing must not hold the connection open
        async with asyncio.timeout(REFUSAL_TIMEOUT_S):
            await send_message(websocket, protocol, MessageType.ERROR, body)
            await websocket.close(refusal.code, refusal.title)
