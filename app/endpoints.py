"""One Endpoint per served model: its runner and queues, how its items are checked, cached
and described, and the typed results it answers (Tokens, Media, or the item's ProblemError).

The engine builds them and lends them its settings, pipeline and media pool (``Workers``).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from opentelemetry.trace import Tracer
from tokserve_client import pack_streams

from app.batching import Batcher
from app.cache import Fits, canonical_params
from app.config import Settings
from app.errors import PayloadTooLarge, ProblemError, Unprocessable
from app.media import (
    AudioHeader,
    ResizeMode,
    audio_header,
    decode_audio,
    decode_image,
    encode_audio,
    encode_image,
    image_geometry,
)
from app.metrics import ITEM_ERRORS
from app.pipeline import ItemResult, Job, Pipeline, unchanged
from app.quality import audio_quality, image_quality
from app.registry import LoadedModel
from app.runner import AudioRunner, ImageRunner, is_out_of_memory
from app.tokenizers.base import AudioInfo, ImageInfo
from app.tokens import file_fits, key_bytes, raw_bytes, token_array, token_fits

T = TypeVar("T")
IMAGE_MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
# decode items holding up to about this many ids are checked on the caller's thread
INLINE_CHECK_IDS = 16_384
AUDIO_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg"}


@dataclass(frozen=True)
class Tokens:
    """One encoded item: tokens ([h, w] or [K, F], the model's token dtype), whether the cache
    answered, and its figures (shape; for audio codebooks, frames, frame_rate, sample_rate and
    duration_s)."""

    tokens: np.ndarray
    cached: bool
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    """One decoded item: the file's bytes, its media type, whether the cache answered, and its
    figures (width and height, or sample_rate and duration_s)."""

    data: bytes
    media_type: str
    cached: bool
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer(Generic[T]):
    """One call's results, in the order of its items; an item that failed holds its problem."""

    model: str
    version: str
    items: list[T | ProblemError]


class Workers(Protocol):
    """What an endpoint uses of the engine it belongs to."""

    settings: Settings
    pipeline: Pipeline
    tracer: Tracer

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the media pool."""
        ...


def _check_request_seconds(total_s: float, settings: Settings, what: str) -> None:
    """Refuse a call whose items add up to more audio than MAX_REQUEST_AUDIO_SECONDS."""
    limit = settings.max_request_audio_seconds
    if total_s > limit:
        raise PayloadTooLarge(
            f"The request's items {what} {total_s:.1f} s of audio in all; at most {limit:g} s per "
            "request (TOKSERVE_MAX_REQUEST_AUDIO_SECONDS): split them into several requests."
        )


def _check_token_budget(arrays: Sequence[np.ndarray | ProblemError], settings: Settings) -> None:
    """Refuse a decode whose readable items hold more than MAX_DECODE_TOKENS tokens."""
    total = sum(a.size for a in arrays if isinstance(a, np.ndarray))
    limit = settings.max_decode_tokens
    if total > limit:
        raise PayloadTooLarge(
            f"{total} tokens in one request; at most {limit} (TOKSERVE_MAX_DECODE_TOKENS)."
        )


class Endpoint(ABC):
    """One model's encode and decode: a runner per instance of the model, two queues, and how
    its items are checked, cached and described. ``ImageEndpoint`` and ``AudioEndpoint`` fill
    in the modality."""

    runners: dict[str, ImageRunner] | dict[str, AudioRunner]  # instance name -> its runner
    runner: ImageRunner | AudioRunner  # the first instance's: its grouping and in-process use

    def __init__(self, model: LoadedModel, engine: Workers) -> None:
        self.model = model
        self.engine = engine
        self.settings = engine.settings
        self.encoder: Batcher[Any, Any] = self._batcher(
            "encode", {name: r.encode_batch for name, r in self.runners.items()}
        )
        self.decoder: Batcher[Any, Any] = self._batcher(
            "decode", {name: r.decode_batch for name, r in self.runners.items()}
        )

    def _batcher(
        self, op: str, run_batches: dict[str, Callable[[list[Any]], list[Any]]]
    ) -> Batcher[Any, Any]:
        serving = self.model.serving
        return Batcher(
            self.model.name,
            op,
            run_batches,
            max_batch_size=serving.max_batch_size,
            max_wait_ms=serving.max_wait_ms,
            max_queue=serving.max_queue,
            is_oom=is_out_of_memory,
            tracer=self.engine.tracer,
        )

    def answer(self, items: list[T | ProblemError]) -> Answer[T]:
        return Answer(self.model.name, self.model.version, items)

    def check_report(self, report: bool) -> None:
        """Refuse report=true for a model without a decoder: it has no reconstruction."""
        if report and self.model.info.encode_only:
            raise Unprocessable(
                f"Model {self.model.name} is encode-only: it has no decoder, so report=true (the "
                "quality of the tokens' reconstruction) cannot be computed. Encode without "
                "report, or with a model that has a decoder (GET /v1/models: encode_only false)."
            )

    async def _report(
        self,
        sources: Sequence[bytes | ProblemError],
        tokens: Sequence[np.ndarray | ProblemError],
        measure: Callable[[bytes, np.ndarray], dict[str, float]],
        deadline: float | None,
    ) -> list[dict[str, float] | ProblemError]:
        """Each item's tokens decoded by the model (uncached) and ``measure``d against its
        source as the model was given it (in the media pool); an item's problem where its
        tokens or its reconstruction failed."""
        job = Job(
            model=self.model,
            op="decode",
            batcher=self.decoder,
            prepare=unchanged,
            group=self.runner.decode_group,
            finish=_as_array,
            params=canonical_params(report="true"),
            use_cache=False,
        )
        reconstructions = await self._run(job, tokens, key_bytes, lambda _: _never, deadline)

        def measure_all() -> list[dict[str, float] | ProblemError]:
            figures: list[dict[str, float] | ProblemError] = []
            for source, result in zip(sources, reconstructions, strict=True):
                if result.array is None or isinstance(source, ProblemError):
                    figures.append(_problem(result))
                    continue
                quality = measure(source, result.array)
                figures.append({name: round(value, 6) for name, value in quality.items()})
            return figures

        return await self.engine.off_loop(measure_all)

    async def _run(
        self,
        job: Job,
        items: Sequence[Any | ProblemError],
        key_of: Callable[[Any], bytes],
        fits: Callable[[int], Fits],
        deadline: float | None,
    ) -> list[ItemResult]:
        """The items that were read, through the pipeline; the others keep their problem. Each
        failed item is counted (tokserve_item_errors_total)."""
        ready = [i for i, item in enumerate(items) if not isinstance(item, ProblemError)]
        results = [
            ItemResult(None, error=item) if isinstance(item, ProblemError) else ItemResult(None)
            for item in items
        ]
        if ready:
            computed = await self.engine.pipeline.run(
                job,
                [items[i] for i in ready],
                [key_of(items[i]) for i in ready],
                deadline,
                [fits(i) for i in ready],
            )
            for index, result in zip(ready, computed, strict=True):
                results[index] = result
        for result in results:
            if result.error is not None:
                ITEM_ERRORS.labels(self.model.name, job.op, str(result.error.status)).inc()
        return results

    async def _decode(
        self,
        items: Sequence[Any],
        check: Callable[[Any, str], np.ndarray],
        single: bool,
    ) -> list[np.ndarray | ProblemError]:
        """Each item to decode as ``check`` makes it, or its own problem; in the media pool,
        unless they hold so few ids that the thread hop would cost more. An encode-only model
        refuses the whole request before any item is read."""
        info = self.model.info
        if info.encode_only:
            raise Unprocessable(
                f"Model {self.model.name} is encode-only: it has no decoder, so its tokens cannot "
                f"be turned back into {'images' if info.modality == 'image' else 'audio'}. "
                "Decode with a model that has one (GET /v1/models: encode_only false)."
            )

        def convert() -> list[np.ndarray | ProblemError]:
            arrays: list[np.ndarray | ProblemError] = []
            for index, item in enumerate(items):
                if isinstance(item, ProblemError):  # refused already (a span of bad ids)
                    arrays.append(item)
                    continue
                try:
                    arrays.append(check(item, "tokens" if single else f"tokens[{index}]"))
                except ProblemError as exc:
                    arrays.append(exc)
            return arrays

        small = sum(_approximate_ids(item) for item in items) <= INLINE_CHECK_IDS
        arrays = convert() if small else await self.engine.off_loop(convert)
        _check_token_budget(arrays, self.settings)
        return arrays

    async def _to_files(
        self,
        arrays: Sequence[np.ndarray | ProblemError],
        group: Callable[[np.ndarray], Hashable],
        to_file: Callable[[Any], np.ndarray],
        fmt: str,
        media_type: str,
        deadline: float | None,
    ) -> list[ItemResult]:
        """Checked token arrays through the decode queue, each answered as a file's bytes by
        ``to_file`` (in the media pool) and cached as such when TOKSERVE_CACHE_DECODE is on."""
        job = Job(
            model=self.model,
            op="decode",
            batcher=self.decoder,
            prepare=unchanged,
            group=group,
            finish=to_file,
            params=canonical_params(format=fmt),
            use_cache=self.settings.cache_decode,
        )
        fits = file_fits(media_type)
        return await self._run(job, arrays, key_bytes, lambda _: fits, deadline)

    @abstractmethod
    def warm_input(self) -> Any:
        """An encode input of the model's own shape, to warm each instance up with."""

    async def warm_up(self) -> None:
        """One encode (and one decode, where the model has a decoder) on each instance's own
        worker threads, before readiness: a thread's first forward sets up its thread pools."""
        item = self.warm_input()
        tokens = await self.encoder.run_on_each(lambda run_batch: run_batch([item])[0])
        if not self.model.info.encode_only:
            await self.decoder.run_on_each(lambda run_batch: run_batch([np.asarray(tokens[0])]))


class ImageEndpoint(Endpoint):
    """encode: image files -> token grids [h, w]; decode: grids -> PNG, WebP or JPEG files."""

    runners: dict[str, ImageRunner]
    runner: ImageRunner

    def __init__(
        self,
        model: LoadedModel,
        info: ImageInfo,
        engine: Workers,
        instances: dict[str, LoadedModel] | None = None,
    ) -> None:
        self.runners = {
            name: ImageRunner(loaded) for name, loaded in (instances or {"0": model}).items()
        }
        self.runner = next(iter(self.runners.values()))
        super().__init__(model, engine)
        self.info = info
        self.size = info.image_size
        self.grid = list(info.grid)
        self.item_shape = (
            (2, "[[int]] (h rows of w ids)") if len(self.grid) == 2 else (1, "[int] (L ids)")
        )

    async def encode(
        self,
        images: Sequence[bytes | ProblemError],
        resize: ResizeMode,
        deadline: float | None,
        report: bool = False,
    ) -> Answer[Tokens]:
        """Image files (or their problems from reading them) -> one token grid each; with
        ``report``, each also with its reconstruction's PSNR and SSIM (``quality``)."""
        self.check_report(report)
        job = Job(
            model=self.model,
            op="encode",
            batcher=self.encoder,
            prepare=partial(
                decode_image,
                size=self.size,
                resize=resize,
                max_pixels=self.settings.max_image_pixels,
            ),
            group=ImageRunner.group,
            finish=unchanged,
            params=canonical_params(resize=resize),
        )
        fits = token_fits(self.info.vocab_size, tuple(self.grid))
        # the headers are read beside the cache lookup and the forward, not before them
        geometry, results = await asyncio.gather(
            self.engine.off_loop(self._geometry, images, resize),
            self._run(job, images, raw_bytes, lambda _: fits, deadline),
        )
        items: list[Tokens | ProblemError] = [
            Tokens(r.array, r.cached, {"shape": list(r.array.shape), **(where or {})})
            if r.array is not None
            else _problem(r)
            for r, where in zip(results, geometry, strict=True)
        ]
        if report:
            measure = partial(self._image_quality, resize=resize)
            items = _with_quality(
                items, await self._report(images, _tokens(items), measure, deadline)
            )
        return self.answer(items)

    def _image_quality(self, image: bytes, rgb: np.ndarray, resize: ResizeMode) -> dict[str, float]:
        """PSNR and SSIM of a reconstruction [H, W, 3] against the image as the model saw it."""
        pixels = decode_image(image, self.size, resize, self.settings.max_image_pixels)
        levels = np.rint((pixels.numpy() + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        return image_quality(levels, rgb)

    def _geometry(
        self, images: Sequence[bytes | ProblemError], resize: ResizeMode
    ) -> list[dict[str, Any] | None]:
        """Each image's source size, crop box and content box, read from its header: known
        whether or not the cache answers for its tokens."""
        return [
            image_geometry(image, self.size, resize) if isinstance(image, bytes) else None
            for image in images
        ]

    def grid_of(self, item: Any, where: str) -> np.ndarray:
        """One item to decode as an int64 grid of this model's shape."""
        array = token_array(item, where, self.info.vocab_size)
        if list(array.shape) != self.grid:
            what = "grid" if len(self.grid) == 2 else "sequence"
            axes = "rows x columns" if len(self.grid) == 2 else "ids"
            raise Unprocessable(
                f"{where}: {what} {list(array.shape)} does not match model {self.model.name}'s "
                f"{what} {self.grid} ({axes})."
            )
        return array

    async def decode(
        self, grids: Sequence[Any], fmt: str, deadline: float | None, single: bool = False
    ) -> Answer[Media]:
        """Token grids (lists, arrays or binary items) -> one image file each."""
        arrays = await self._decode(grids, self.grid_of, single)
        media_type = IMAGE_MEDIA_TYPES[fmt]

        def to_file(rgb: np.ndarray) -> np.ndarray:
            return np.frombuffer(encode_image(rgb, fmt), dtype=np.uint8)

        group = ImageRunner.decode_group
        results = await self._to_files(arrays, group, to_file, fmt, media_type, deadline)
        height, width = self.size
        figures = {"width": width, "height": height}
        return self.answer(
            [
                Media(r.array.tobytes(), media_type, r.cached, figures)
                if r.array is not None
                else _problem(r)
                for r in results
            ]
        )

    def warm_input(self) -> torch.Tensor:
        height, width = self.size
        return torch.zeros(3, height, width)


class AudioEndpoint(Endpoint):
    """encode: audio files -> tokens [K, F]; decode: [k, F] -> WAV, FLAC or OGG files."""

    runners: dict[str, AudioRunner]
    runner: AudioRunner

    def __init__(
        self,
        model: LoadedModel,
        info: AudioInfo,
        engine: Workers,
        instances: dict[str, LoadedModel] | None = None,
    ) -> None:
        self.runners = {
            name: AudioRunner(loaded) for name, loaded in (instances or {"0": model}).items()
        }
        self.runner = next(iter(self.runners.values()))
        super().__init__(model, engine)
        self.info = info
        self.sample_rate = info.sample_rate
        self.frame_rate = info.frame_rate
        self.hop = info.hop_length
        self.codebooks = info.codebooks
        self.item_shape = (2, "[[int]] (k codebooks of F frames)")
        # a decoder that needs every codebook declares it (exported programs do)
        self.fewest_codebooks = int(info.extra.get("decode_codebooks", 1))

    def check_codebooks(self, codebooks: int | None) -> None:
        """Refuse asking for more codebooks than the model has."""
        if codebooks is not None and not 1 <= codebooks <= self.codebooks:
            raise Unprocessable(
                f"codebooks={codebooks}, but model {self.model.name} has {self.codebooks}; "
                f"ask for 1 to {self.codebooks}."
            )

    async def encode(
        self,
        clips: Sequence[bytes | ProblemError],
        codebooks: int | None,
        deadline: float | None,
        report: bool = False,
    ) -> Answer[Tokens]:
        """Audio files (or their problems from reading them) -> tokens [k, F] each, the first
        ``codebooks`` of the model's (all when None); with ``report``, each also with its
        reconstruction's SNR and mel distance (``quality``)."""
        self.check_codebooks(codebooks)
        self.check_report(report)
        settings = self.settings
        headers = await self.engine.off_loop(_headers, clips, settings.min_audio_sample_rate)
        declared = [h.frames / h.sample_rate if h is not None else None for h in headers]
        _check_request_seconds(sum(s for s in declared if s is not None), settings, "last")
        job = Job(
            model=self.model,
            op="encode",
            batcher=self.encoder,
            prepare=partial(
                _wave_only,
                sample_rate=self.sample_rate,
                channels=self.info.channels,
                max_seconds=settings.max_audio_seconds,
                min_sample_rate=settings.min_audio_sample_rate,
            ),
            group=AudioRunner.encode_group,
            finish=unchanged,
        )

        def fits(index: int) -> Fits:
            # the clip's declared length, to the frame (resampling may round by one either way)
            expected = math.ceil((declared[index] or 0.0) * self.frame_rate)
            frames = (max(1, expected - 1), expected + 1)
            return token_fits(self.info.vocab_size, (self.info.rows(), None), frames=frames)

        results = await self._run(job, clips, raw_bytes, fits, deadline)
        items: list[Tokens | ProblemError] = []
        for result, header in zip(results, headers, strict=True):
            if result.array is None:
                items.append(_problem(result))
                continue
            kept = codebooks or self.codebooks
            tokens = result.array[: self.info.rows(kept)]
            frames = int(tokens.shape[1])
            figures = {
                "shape": list(tokens.shape),
                "codebooks": kept,
                "frames": frames,
                "frame_rate": self.frame_rate,
                "sample_rate": self.sample_rate,
                "duration_s": round(frames / self.frame_rate, 6),
                **(header.preprocessing(self.sample_rate, self.info.channels) if header else {}),
            }
            if self.info.tokens_per_frame:
                figures["tokens_per_frame"] = list(self.info.tokens_per_frame[:kept])
            items.append(Tokens(tokens, result.cached, figures))
        if report:
            reported = await self._report(clips, _tokens(items), self._audio_quality, deadline)
            items = _with_quality(items, reported)
        return self.answer(items)

    def _audio_quality(self, clip: bytes, wave: np.ndarray) -> dict[str, float]:
        """SNR and mel distance of a reconstruction [C, T] against the clip as the model heard
        it."""
        settings = self.settings
        heard, _ = decode_audio(
            clip,
            self.sample_rate,
            self.info.channels,
            settings.max_audio_seconds,
            settings.min_audio_sample_rate,
        )
        return audio_quality(heard.numpy(), wave, self.sample_rate)

    def codes_of(self, item: Any, where: str) -> np.ndarray:
        """One item to decode as int64 codes [rows, F] this model can decode; for codebooks at
        several rates, the codebooks' streams (lists of different lengths) are packed first."""
        if self.info.tokens_per_frame and _is_ragged(item):
            item = self._pack(item, where)
        array = token_array(item, where, self.info.vocab_size)
        fewest, most = self.fewest_codebooks, self.codebooks
        allowed = [self.info.rows(k) for k in range(fewest, most + 1)]
        if array.ndim != 2 or array.shape[0] not in allowed or array.shape[1] < 1:
            raise Unprocessable(
                f"{where} of shape {list(array.shape)} does not fit model {self.model.name}: "
                f"{self._decode_shapes(fewest, most, allowed)} and at least one frame."
            )
        max_seconds = self.settings.max_audio_seconds
        if array.shape[1] * self.hop > max_seconds * self.sample_rate:
            raise PayloadTooLarge(
                f"{where}: {array.shape[1]} frames decode to "
                f"{array.shape[1] * self.hop / self.sample_rate:.3f} s of audio; at most "
                f"{max_seconds:g} s (TOKSERVE_MAX_AUDIO_SECONDS, "
                f"{int(max_seconds * self.sample_rate / self.hop)} frames) per item."
            )
        return array

    def _decode_shapes(self, fewest: int, most: int, rows_allowed: list[int]) -> str:
        """What a decode item may be, in words: ``rows_allowed`` rows for ``fewest`` to ``most``
        codebooks."""
        codebooks = f"{fewest} to {most}" if fewest < most else f"{fewest}"
        if not self.info.tokens_per_frame:
            return f"send [k][F] with {codebooks} codebooks (rows)"
        rows = ", ".join(map(str, rows_allowed))
        return (
            f"send the token array [rows][F] with {rows} rows ({codebooks} codebooks of "
            f"{list(self.info.tokens_per_frame)} tokens per frame), or the codebooks' streams "
            "of those many tokens per frame"
        )

    def _pack(self, streams: list[Any], where: str) -> np.ndarray:
        """Codebooks' streams (tokens_per_frame[k] * F ids each) -> the token array."""
        per_frame = self.info.tokens_per_frame[: len(streams)]
        frames = len(streams[0]) // per_frame[0]
        lengths = [len(stream) for stream in streams]
        if len(streams) > len(self.info.tokens_per_frame) or lengths != [
            r * frames for r in per_frame
        ]:
            raise Unprocessable(
                f"{where} holds streams of {lengths} tokens; model {self.model.name}'s codebooks "
                f"take {list(self.info.tokens_per_frame)} tokens per frame, so F frames are "
                f"{[f'{r}F' for r in self.info.tokens_per_frame]} tokens."
            )
        return pack_streams([np.asarray(stream) for stream in streams], per_frame)

    async def decode(
        self, codes: Sequence[Any], fmt: str, deadline: float | None, single: bool = False
    ) -> Answer[Media]:
        """Codes [k, F] (lists, arrays or binary items) -> one audio file each."""
        arrays = await self._decode(codes, self.codes_of, single)
        seconds = [
            a.shape[1] * self.hop / self.sample_rate if isinstance(a, np.ndarray) else 0.0
            for a in arrays
        ]
        _check_request_seconds(sum(seconds), self.settings, "decode to")
        media_type = AUDIO_MEDIA_TYPES[fmt]
        sample_rate = self.sample_rate

        def to_file(wave: torch.Tensor) -> np.ndarray:
            return np.frombuffer(encode_audio(wave, sample_rate, fmt), dtype=np.uint8)

        group = AudioRunner.decode_group
        results = await self._to_files(arrays, group, to_file, fmt, media_type, deadline)
        return self.answer(
            [
                Media(
                    r.array.tobytes(),
                    media_type,
                    r.cached,
                    {"sample_rate": sample_rate, "duration_s": round(duration_s, 6)},
                )
                if r.array is not None
                else _problem(r)
                for r, duration_s in zip(results, seconds, strict=True)
            ]
        )

    def warm_input(self) -> torch.Tensor:
        return torch.zeros(self.info.channels, self.sample_rate)


def _approximate_ids(item: Any) -> int:
    """About how many ids an item to decode holds, without reading them all: an array's size,
    a binary item's bytes over two, rows times the first row's length for nested lists."""
    if isinstance(item, np.ndarray):
        return item.size
    if isinstance(item, dict):
        data = item.get("data")
        return len(data) // 2 if isinstance(data, bytes | str) else 0
    if isinstance(item, list) and item and isinstance(item[0], list):
        return len(item) * len(item[0])
    return len(item) if isinstance(item, list) else 1


def _is_ragged(item: Any) -> bool:
    """Whether a decode item is a list of lists of different lengths (codebooks' streams)."""
    return (
        isinstance(item, list)
        and all(isinstance(row, list) for row in item)
        and len({len(row) for row in item}) > 1
    )


def _as_array(output: np.ndarray | torch.Tensor) -> np.ndarray:
    """A decoder's output (RGB levels, or a wave tensor) as a NumPy array."""
    return output.numpy() if isinstance(output, torch.Tensor) else output


def _never(_: np.ndarray) -> bool:
    """No stored array answers a report's decode."""
    return False


def _tokens(items: Sequence[Tokens | ProblemError]) -> list[np.ndarray | ProblemError]:
    return [item.tokens if isinstance(item, Tokens) else item for item in items]


def _with_quality(
    items: Sequence[Tokens | ProblemError], reported: Sequence[dict[str, float] | ProblemError]
) -> list[Tokens | ProblemError]:
    """Each encoded item with its ``quality`` figures, or the problem that kept them."""
    return [
        quality
        if isinstance(quality, ProblemError)
        else Tokens(item.tokens, item.cached, {**item.figures, "quality": quality})
        if isinstance(item, Tokens)
        else item
        for item, quality in zip(items, reported, strict=True)
    ]


def _problem(result: ItemResult) -> ProblemError:
    assert result.error is not None  # an ItemResult holds an array or its problem
    return result.error


def _wave_only(
    blob: bytes, sample_rate: int, channels: int, max_seconds: float, min_sample_rate: int
) -> torch.Tensor:
    return decode_audio(blob, sample_rate, channels, max_seconds, min_sample_rate)[0]


def _headers(clips: Sequence[bytes | ProblemError], min_rate: int) -> list[AudioHeader | None]:
    """Each clip's header (rate, frames, channels); None where unreadable or refused anyway
    (below the minimum rate: that clip fails alone)."""
    headers = [audio_header(clip) if isinstance(clip, bytes) else None for clip in clips]
    return [h if h is not None and h.sample_rate >= min_rate else None for h in headers]
