"""The serving core as a library: loaded models behind typed encode and decode calls.

``Engine`` owns the models, one ``Endpoint`` per model (app/endpoints.py: its runner and its
encode and decode queues), the token cache, single-flight and the media thread pool. HTTP
routes are thin adapters over it; a bulk job or an actor calls the same methods in-process:

    engine = Engine.build(Settings())
    await engine.start()
    answer = await engine.encode_images([open("photo.jpg", "rb").read()])
    answer.items[0].tokens  # [32, 32] uint16, or the item's ProblemError
    await engine.stop()

``SyncEngine`` runs one on a background event loop for code that is not async.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from opentelemetry import trace

from app.cache import TokenCache, create_cache
from app.compute import usable_cpus
from app.config import Settings
from app.drain import Drain
from app.endpoints import Answer, AudioEndpoint, ImageEndpoint, Media, Tokens
from app.errors import ProblemError
from app.media import (
    ResizeMode,
)
from app.pipeline import Pipeline, in_media_pool
from app.registry import ModelRegistry
from app.streaming import Streams
from app.tokenizers.base import ImageInfo
from app.tracing import tokserve_tracer

log = logging.getLogger("tokserve.engine")

T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux: per thread; never lowers it)."""
    if hasattr(os, "setpriority"):
        current = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, max(current, nice))


class Engine:
    """Models, their endpoints, the cache, single-flight and the media pool, owned together from
    ``start`` to ``stop``; typed encode and decode calls for routes, bulk jobs and actors."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        cache: TokenCache,
        media_pool: ThreadPoolExecutor,
        media_share: int,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.media_pool = media_pool
        # the spans of the pipeline's stages and the queues' forwards; no-op unless configured
        self.tracer = tracer or tokserve_tracer(None)
        self.pipeline = Pipeline(cache, media_pool, media_share, self.tracer)
        self.endpoints: dict[str, ImageEndpoint | AudioEndpoint] = {}
        for model in registry.models.values():
            info = model.info
            instances = registry.instances[model.name]
            self.endpoints[model.name] = (
                ImageEndpoint(model, info, self, instances)
                if isinstance(info, ImageInfo)
                else AudioEndpoint(model, info, self, instances)
            )
        self.streams = Streams(settings, list(registry.models.values()))
        self.ready = False
        self.drain = Drain(settings.drain_timeout_s)

    @classmethod
    def build(
        cls,
        settings: Settings,
        registry: ModelRegistry | None = None,
        media_threads: int | None = None,
        tracer: trace.Tracer | None = None,
    ) -> Engine:
        """Load the models (unless given), open the cache and the media pool: ``media_threads``
        (a thread per usable CPU, at least 2, unless given), at TOKSERVE_REQUEST_NICE. One call
        may take half the media threads, so the others' files are decoded meanwhile. Spans go
        to ``tracer``, by default the global provider's."""
        media_threads = media_threads or max(2, usable_cpus())
        media_pool = ThreadPoolExecutor(
            max_workers=media_threads,
            thread_name_prefix="media",
            initializer=lower_priority,
            initargs=(settings.request_nice,),
        )
        return cls(
            settings,
            registry if registry is not None else ModelRegistry.load(settings),
            create_cache(settings),
            media_pool,
            media_share=max(1, media_threads // 2),
            tracer=tracer,
        )

    async def start(self) -> None:
        """Start every queue's worker, and warm each model up unless TOKSERVE_WARMUP is off."""
        for endpoint in self.endpoints.values():
            await endpoint.encoder.start()
            await endpoint.decoder.start()
        self.streams.start()
        if self.settings.warmup:
            await self.warm_up()
        self.ready = True
        log.info("ready: %s", ", ".join(self.registry.names()) or "no models")

    async def warm_up(self) -> None:
        """Run each model instance once on its own worker threads, so the first request pays
        no lazy initialisation."""
        for name, endpoint in self.endpoints.items():
            start = time.perf_counter()
            await endpoint.warm_up()
            log.info("warmed up %s in %.0f ms", name, 1000 * (time.perf_counter() - start))

    async def stop(self) -> None:
        """Let queued work finish within what is left of the drain time, then release all."""
        self.ready = False
        self.drain.begin()
        await self.streams.stop(self.drain.left_s())
        drain_s = self.drain.left_s()
        queues = [b for e in self.endpoints.values() for b in (e.encoder, e.decoder)]
        await asyncio.gather(*(batcher.stop(drain_s) for batcher in queues))
        await self.pipeline.flush()
        await self.cache.close()
        self.media_pool.shutdown(wait=False, cancel_futures=True)

    def image(self, model: str | None = None) -> ImageEndpoint:
        """The named image model's endpoint, or the first image model's."""
        endpoint = self.endpoints[self.registry.get(model, "image").name]
        assert isinstance(endpoint, ImageEndpoint)
        return endpoint

    def audio(self, model: str | None = None) -> AudioEndpoint:
        """The named audio model's endpoint, or the first audio model's."""
        endpoint = self.endpoints[self.registry.get(model, "audio").name]
        assert isinstance(endpoint, AudioEndpoint)
        return endpoint

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the media pool: large parsing must not stall the event loop."""
        return await in_media_pool(self.media_pool, partial(work, *args))

    async def encode_images(
        self,
        images: Sequence[bytes | ProblemError],
        model: str | None = None,
        resize: ResizeMode = "crop",
        deadline: float | None = None,
        report: bool = False,
    ) -> Answer[Tokens]:
        """Image files -> token grids [h, w]; ``deadline`` in time.monotonic() seconds;
        ``report``: each with its reconstruction's ``quality`` figures."""
        return await self.image(model).encode(images, resize, deadline, report)

    async def decode_images(
        self,
        grids: Sequence[Any],
        model: str | None = None,
        fmt: str = "png",
        deadline: float | None = None,
    ) -> Answer[Media]:
        """Token grids [h, w] -> image files (png, webp or jpeg)."""
        return await self.image(model).decode(grids, fmt, deadline)

    async def encode_audio(
        self,
        clips: Sequence[bytes | ProblemError],
        model: str | None = None,
        codebooks: int | None = None,
        deadline: float | None = None,
        report: bool = False,
    ) -> Answer[Tokens]:
        """Audio files -> tokens [k, F] (the first ``codebooks``; all when None); ``report``:
        each with its reconstruction's ``quality`` figures."""
        return await self.audio(model).encode(clips, codebooks, deadline, report)

    async def decode_audio(
        self,
        codes: Sequence[Any],
        model: str | None = None,
        fmt: str = "wav",
        deadline: float | None = None,
    ) -> Answer[Media]:
        """Codes [k, F] -> audio files (wav, flac or ogg)."""
        return await self.audio(model).decode(codes, fmt, deadline)


class SyncEngine:
    """An Engine on its own event loop thread, for code that is not async:

    with SyncEngine(Settings()) as engine:
        grid = engine.encode_images([photo]).items[0].tokens
    """

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.engine = Engine.build(settings, registry)
        self._call(self.engine.start())

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drain and stop the engine, then its loop."""
        self._call(self.engine.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def encode_images(self, images: Sequence[bytes], **options: Any) -> Answer[Tokens]:
        """Engine.encode_images, waited for."""
        return self._call(self.engine.encode_images(images, **options))

    def decode_images(self, grids: Sequence[Any], **options: Any) -> Answer[Media]:
        """Engine.decode_images, waited for."""
        return self._call(self.engine.decode_images(grids, **options))

    def encode_audio(self, clips: Sequence[bytes], **options: Any) -> Answer[Tokens]:
        """Engine.encode_audio, waited for."""
        return self._call(self.engine.encode_audio(clips, **options))

    def decode_audio(self, codes: Sequence[Any], **options: Any) -> Answer[Media]:
        """Engine.decode_audio, waited for."""
        return self._call(self.engine.decode_audio(codes, **options))
