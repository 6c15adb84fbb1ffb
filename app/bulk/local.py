"""The in-process bulk engine: the server's Engine (batching, media pool) without HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from app.bulk.job import BulkOptions
from app.config import Settings
from app.engine import Engine
from app.errors import ProblemError
from app.registry import ModelRegistry

# items in flight per batch the model takes: enough that the next batch's files are decoded
# while the model runs the current one
WINDOW_BATCHES = 4
CHUNK = 4


class LocalTokenizer:
    """One model in an Engine of its own; items go one per engine call, so each fails alone
    and the batcher gathers the calls in flight into batches. The driver hands them over in
    chunks of CHUNK, which costs it fewer hops between threads."""

    chunk = CHUNK

    def __init__(self, engine: Engine, name: str, options: BulkOptions) -> None:
        self.engine = engine
        self.options = options
        endpoint = engine.endpoints[name]
        self.model: dict[str, Any] = endpoint.model.describe()
        self.window = max(1, WINDOW_BATCHES * endpoint.model.serving.max_batch_size // CHUNK)

    @classmethod
    async def open(cls, options: BulkOptions) -> LocalTokenizer:
        """Load ``options.model`` alone and start its engine. Without Redis no cache is kept:
        a one-pass job would only fill memory with rows already written."""
        overrides: dict[str, Any] = {"models": [options.model] if options.model else []}
        if options.model_dir:
            overrides["model_dir"] = options.model_dir
        settings = Settings(**overrides)
        if not settings.redis_url:
            settings = settings.model_copy(update={"cache_max_bytes": 0})
        registry = await asyncio.to_thread(ModelRegistry.load, settings)
        if len(registry.models) != 1:
            names = ", ".join(registry.names()) or "none"
            raise ValueError(f"name one model with --model; the model folders hold: {names}.")
        engine = Engine.build(settings, registry, media_threads=options.workers)
        await engine.start()
        return cls(engine, registry.names()[0], options)

    async def encode(self, blobs: list[bytes | ProblemError]) -> list[Any]:
        """Each item's Tokens, or its problem."""
        results = await asyncio.gather(*(self._one(blob) for blob in blobs))
        return list(results)

    async def _one(self, blob: bytes | ProblemError) -> Any:
        name = self.model["name"]
        try:
            if self.model["modality"] == "image":
                answer = await self.engine.encode_images([blob], name, self.options.resize)
            else:
                answer = await self.engine.encode_audio([blob], name, self.options.codebooks)
        except ProblemError as exc:  # the call's own limits, for a call of this item alone
            return exc
        return answer.items[0]

    async def close(self) -> None:
        await self.engine.stop()
