"""Live streams of causal audio models: audio in, tokens out (encode) or tokens in, audio out
(decode), many streams stepped together in one forward per model and direction.

A ``Stream`` is one client's: what it sent and the model has not stepped yet (``pending``), its
model state (``StreamState``) and what is stepped but not yet sent (``outbox``). A ``StreamHub``
(one per model and direction) loops: it takes every stream's whole frames that are ready
(at most ``stream_max_step_frames``), groups streams stepping the same number of frames, runs
each group as one batch on its own model thread, and hands each row its result. ``Streams``
holds the hubs, admits streams within the limits and ends them all on drain. Nothing here
knows of WebSockets: app/api/streams.py speaks the protocol.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import soxr
import torch

from app.config import Settings
from app.media import RESAMPLE_QUALITY
from app.metrics import STREAM_CHUNK_LATENCY, STREAM_STEP_BATCH, STREAMS_DROPPED, STREAMS_OPEN
from app.registry import LoadedModel
from app.tokenizers.base import AudioInfo
from app.tokenizers.causal import CausalStepper, StreamState
from app.tokens import token_dtype

Direction = Literal["encode", "decode"]

# WebSocket close codes: 1000 done, 1001 server going away; 4000 + the HTTP status otherwise.
CLOSE_DONE = 1000
CLOSE_GOING_AWAY = 1001


class StreamRefused(Exception):
    """A stream cannot start or go on: ``code`` (a WebSocket close code) and a sentence saying
    what was wrong and what is accepted."""

    def __init__(self, code: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.title = title
        self.detail = detail


def slow_reader(unsent_s: float, limit_s: float) -> StreamRefused:
    """The refusal of a client that leaves more than ``limit_s`` of results unread."""
    return StreamRefused(
        4408,
        "Client reads too slowly",
        f"{unsent_s:.1f} s of results waited for the client to read them; at most {limit_s:g} s "
        "may wait (TOKSERVE_STREAM_MAX_UNSENT_S). Read the stream as fast as it is produced.",
    )


@dataclass
class Outgoing:
    """One result for the client: tokens [k, n] (encode) or wave [C, n * hop] (decode), its
    first frame, and the arrival time of the newest input it covers (for chunk latency)."""

    data: np.ndarray
    first_frame: int
    arrived: float


@dataclass(eq=False)
class Stream:
    """One client's live stream of one model in one direction."""

    hub: StreamHub
    key: str
    codebooks: int  # rows of tokens: encode answers them, decode takes them
    state: StreamState = field(default_factory=StreamState)
    pending: list[np.ndarray] = field(default_factory=list)  # [C, T] samples or [k, n] tokens
    pending_units: int = 0  # samples (encode) or frames (decode) in pending
    last_arrival: float = 0.0
    ended: bool = False  # the client (or the drain) said no more input comes
    finished: bool = False  # everything stepped and queued for the sender, then its end
    going_away: bool = False  # ended by the server's drain
    frames_in: int = 0  # frames stepped so far
    frames_received: int = 0  # token frames a decode stream was sent
    outbox: asyncio.Queue[Outgoing | None] = field(default_factory=asyncio.Queue)
    unsent_frames: int = 0
    dropped: StreamRefused | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)
    # encode audio sent at another rate: soxr's streaming resampler, whose output is the same
    # whatever the chunks, so the stream's samples equal a whole file's resampled ones
    resampler: soxr.ResampleStream | None = None

    def __post_init__(self) -> None:
        self.room.set()

    @property
    def info(self) -> AudioInfo:
        return self.hub.info

    def buffered_s(self) -> float:
        """Seconds of input waiting to be stepped."""
        if self.hub.direction == "encode":
            return self.pending_units / self.info.sample_rate
        return self.pending_units / self.info.frame_rate

    def push(self, data: np.ndarray) -> None:
        """Queue input: samples [C, T] float32 at the client's rate (encode) or tokens [k, n]
        int64 (decode). Input after the end (a drain ends streams while their clients still
        send) is dropped."""
        if self.dropped is not None or self.ended:
            return
        if self.resampler is not None:
            data = self._resample(data)
        self._queue(data)

    def _resample(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Samples [C, T] at the client's rate -> [C, T'] at the model's, as far as soxr can
        tell yet (``last``: all it still holds)."""
        assert self.resampler is not None
        resampled = self.resampler.resample_chunk(np.ascontiguousarray(samples.T), last=last)
        return np.ascontiguousarray(resampled.T)

    def _queue(self, data: np.ndarray) -> None:
        self.pending.append(data)
        self.pending_units += data.shape[-1]
        self.last_arrival = time.monotonic()
        if self.buffered_s() >= self.hub.settings.stream_max_buffered_s:
            self.room.clear()
        self.hub.wake.set()

    def end(self, going_away: bool = False) -> None:
        """No more input: what is pending is stepped (the last frame zero-padded), then the
        outbox ends."""
        self.going_away = self.going_away or going_away
        if not self.ended:
            if self.resampler is not None and self.dropped is None:
                self._queue(self._resample(np.zeros((self.info.channels, 0), np.float32), True))
            self.ended = True
            self.hub.wake.set()

    def take(self, units: int) -> np.ndarray:
        """The first ``units`` samples or frames of pending, zero-padded at the end if short."""
        data = np.concatenate(self.pending, axis=-1) if len(self.pending) > 1 else self.pending[0]
        chunk, rest = data[..., :units], data[..., units:]
        self.pending = [rest] if rest.shape[-1] else []
        self.pending_units = rest.shape[-1]
        if self.buffered_s() < self.hub.settings.stream_max_buffered_s:
            self.room.set()
        if chunk.shape[-1] < units:
            chunk = np.pad(chunk, [(0, 0), (0, units - chunk.shape[-1])])
        return chunk

    def ready_frames(self) -> int:
        """Whole frames the hub may step now (0: wait for more input)."""
        if self.dropped is not None:
            return 0
        hop = self.hub.unit_per_frame
        whole = self.pending_units // hop
        if self.ended:
            whole = math.ceil(self.pending_units / hop)
        elif not self.state.started and whole < self.hub.first_frames:
            return 0
        most = self.hub.settings.stream_max_step_frames
        # a first step is never cut short of the frames its convolutions read ahead
        return min(whole, most if self.state.started else max(most, self.hub.first_frames))

    def drop(self, refusal: StreamRefused, counted: bool = True) -> None:
        """End the stream at once with ``refusal``: nothing more is stepped or sent.
        ``counted``: the server dropped it (tokserve_streams_dropped_total)."""
        if self.dropped is None and not self.finished:
            self.dropped = refusal
            self.finished = True
            if counted:
                STREAMS_DROPPED.labels(self.hub.name, self.hub.direction, str(refusal.code)).inc()
            self.room.set()
            self.outbox.put_nowait(None)


class StreamHub:
    """The streams of one model in one direction, stepped together on one model thread."""

    def __init__(
        self, model: LoadedModel, stepper: CausalStepper, direction: Direction, settings: Settings
    ) -> None:
        assert isinstance(model.info, AudioInfo)
        self.model = model
        self.name = model.name
        self.info: AudioInfo = model.info
        self.stepper = stepper
        self.direction = direction
        self.settings = settings
        self.streams: set[Stream] = set()
        self.wake = asyncio.Event()
        self.first_frames = stepper.first_frames[direction]
        self.unit_per_frame = self.info.hop_length if direction == "encode" else 1
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stream-{direction}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stream {self.name} {self.direction}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def open(self, key: str, codebooks: int, sample_rate: int) -> Stream:
        """A new stream; encoding, its audio comes at ``sample_rate`` Hz (resampled to the
        model's as it comes, as a whole file is)."""
        stream = Stream(self, key, codebooks)
        if self.direction == "encode" and sample_rate != self.info.sample_rate:
            stream.resampler = soxr.ResampleStream(
                sample_rate, self.info.sample_rate, self.info.channels, "float32", RESAMPLE_QUALITY
            )
        self.streams.add(stream)
        STREAMS_OPEN.labels(self.name, self.direction).inc()
        return stream

    def close(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            STREAMS_OPEN.labels(self.name, self.direction).dec()
            stream.drop(StreamRefused(CLOSE_DONE, "Closed", "The stream is closed."), counted=False)
        stream.resampler = None  # soxr's buffers go with the connection

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            for group in self._groups():
                rows = [
                    (stream, stream.take(frames * self.unit_per_frame)) for stream, frames in group
                ]
                started = [stream.frames_in for stream, _ in rows]
                arrived = [stream.last_arrival for stream, _ in rows]
                STREAM_STEP_BATCH.labels(self.name, self.direction).observe(len(rows))
                try:
                    results = await loop.run_in_executor(self._executor, self._step, rows)
                except Exception as exc:  # a failed forward ends its streams, not the hub
                    for stream, _ in rows:
                        stream.drop(
                            StreamRefused(4503, "Model failed", f"The model's step failed: {exc}")
                        )
                    continue
                for (stream, _), result, first, when in zip(
                    rows, results, started, arrived, strict=True
                ):
                    self._deliver(stream, result, first, when)
            for stream in list(self.streams):
                if stream.ended and not stream.pending_units and not stream.finished:
                    stream.finished = True
                    stream.outbox.put_nowait(None)
            if any(stream.ready_frames() for stream in self.streams):
                self.wake.set()

    def _groups(self) -> Iterator[list[tuple[Stream, int]]]:
        """Ready streams grouped by the frames (and, decoding, the codebooks) they step, at
        most ``stream_max_batch`` to a group."""
        by_shape: dict[tuple[int, int], list[tuple[Stream, int]]] = defaultdict(list)
        for stream in self.streams:
            frames = stream.ready_frames()
            if frames:
                rows = stream.codebooks if self.direction == "decode" else 0
                by_shape[(frames, rows)].append((stream, frames))
        size = self.settings.stream_max_batch
        for group in by_shape.values():
            for start in range(0, len(group), size):
                yield group[start : start + size]

    def _step(self, rows: list[tuple[Stream, np.ndarray]]) -> list[np.ndarray]:
        """One forward over the rows' inputs, on the model thread."""
        device = self.model.device
        states = [stream.state for stream, _ in rows]
        with torch.inference_mode():
            if self.direction == "encode":
                wave = torch.from_numpy(np.stack([data for _, data in rows]))
                tokens = self.stepper.encode_step(wave.to(device, self.model.dtype), states)
                host = tokens.to("cpu", torch.int32).numpy()
                dtype = token_dtype(self.info.vocab_size)
                return [
                    host[row, : stream.codebooks].astype(dtype)
                    for row, (stream, _) in enumerate(rows)
                ]
            codes = torch.from_numpy(np.stack([data for _, data in rows])).to(device)
            decoded = self.stepper.decode_step(codes, states).float().clamp(-1, 1)
            return list(decoded.cpu().numpy())

    def _deliver(self, stream: Stream, result: np.ndarray, first: int, arrived: float) -> None:
        """Hand a step's result to the stream's sender, or drop a stream that reads too slowly."""
        if stream.dropped is not None:
            return
        frames = result.shape[-1] // (self.info.hop_length if self.direction == "decode" else 1)
        stream.frames_in = first + frames
        stream.unsent_frames += frames
        unsent_s = stream.unsent_frames / self.info.frame_rate
        if unsent_s > self.settings.stream_max_unsent_s:
            stream.drop(slow_reader(unsent_s, self.settings.stream_max_unsent_s))
            return
        stream.outbox.put_nowait(Outgoing(result, first, arrived))

    def sent(self, stream: Stream, outgoing: Outgoing) -> None:
        """The sender has sent ``outgoing``: its frames no longer wait; its latency counts."""
        frames = outgoing.data.shape[-1] // (
            self.info.hop_length if self.direction == "decode" else 1
        )
        stream.unsent_frames -= frames
        STREAM_CHUNK_LATENCY.labels(self.name, self.direction).observe(
            time.monotonic() - outgoing.arrived
        )


class Streams:
    """Every streaming hub, the limits on open streams, and the drain that ends them."""

    def __init__(self, settings: Settings, models: list[LoadedModel]) -> None:
        self.settings = settings
        self.hubs: dict[tuple[str, Direction], StreamHub] = {}
        self.draining = False
        for model in models:
            stepper_of = getattr(model.tokenizer, "stepper", None)
            if not isinstance(model.info, AudioInfo) or not model.info.streaming or not stepper_of:
                continue
            for direction in ("encode", "decode"):
                if direction == "decode" and model.info.encode_only:
                    continue
                # each direction owns a stepper: its model thread is the only one touching it
                self.hubs[(model.name, direction)] = StreamHub(
                    model,
                    stepper_of(),
                    direction,
                    settings,
                )

    def streaming_models(self) -> list[str]:
        return sorted({name for name, _ in self.hubs})

    def start(self) -> None:
        for hub in self.hubs.values():
            hub.start()

    def open_count(self, key: str | None = None) -> int:
        return sum(
            1
            for hub in self.hubs.values()
            for stream in hub.streams
            if key is None or stream.key == key
        )

    def open(
        self, model: str, direction: Direction, key: str, codebooks: int, sample_rate: int
    ) -> Stream:
        """A new stream, or StreamRefused when draining or over a limit."""
        if self.draining:
            raise StreamRefused(
                4503,
                "Shutting down",
                "The server is shutting down and opens no new streams; connect to another replica.",
            )
        limit = self.settings.stream_max_streams
        if self.open_count() >= limit:
            raise StreamRefused(
                4429,
                "Too many streams",
                f"The server already serves {limit} streams (TOKSERVE_STREAM_MAX_STREAMS); "
                "retry later or on another replica.",
            )
        per_key = self.settings.stream_max_streams_per_key
        if key and self.open_count(key) >= per_key:
            raise StreamRefused(
                4429,
                "Too many streams for this key",
                f"This API key already has {per_key} open streams "
                "(TOKSERVE_STREAM_MAX_STREAMS_PER_KEY); close one first.",
            )
        return self.hubs[(model, direction)].open(key, codebooks, sample_rate)

    def end_all(self) -> None:
        """Drain: no new streams; every open one ends as if its client had sent the end."""
        self.draining = True
        for hub in self.hubs.values():
            for stream in hub.streams:
                stream.end(going_away=True)

    async def wait_closed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every stream has been closed."""
        deadline = time.monotonic() + timeout_s
        while self.open_count() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self, timeout_s: float) -> None:
        self.end_all()
        await self.wait_closed(timeout_s)
        await asyncio.gather(*(hub.stop() for hub in self.hubs.values()))
