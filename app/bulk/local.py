"""The in-process bulk engine: the server's Engine (batching, media pool) without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from app.bulk.job import BulkOptions
from app.config import Settings
from app.endpoints import Tokens
from app.engine import Engine
from app.errors import ProblemError
from app.media import ResizeMode
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
        """Load ``options.model`` alone and start its engine."""
        settings = bulk_settings(options.model, options.model_dir)
        registry = await asyncio.to_thread(ModelRegistry.load, settings)
        if len(registry.models) != 1:
            names = ", ".join(registry.names()) or "none"
            raise ValueError(f"name one model with --model; the model folders hold: {names}.")
        engine = Engine.build(settings, registry, media_threads=options.workers)
        await engine.start()
        return cls(engine, registry.names()[0], options)

    async def encode(self, blobs: list[bytes | ProblemError]) -> list[Any]:
        """Each item's Tokens, or its problem."""
        options = self.options
        return await encode_each(self.engine, self.model, blobs, options.resize, options.codebooks)

    async def close(self) -> None:
        await self.engine.stop()


def bulk_settings(model: str | None, model_dir: list[str] | None) -> Settings:
    """The environment's settings with only ``model`` loaded. Without Redis no cache is kept:
    a pass over a dataset would only fill memory with tokens already written."""
    overrides: dict[str, Any] = {"models": [model] if model else []}
    if model_dir:
        overrides["model_dir"] = model_dir
    settings = Settings(**overrides)
    if not settings.redis_url:
        settings = settings.model_copy(update={"cache_max_bytes": 0})
    return settings


async def encode_each(
    engine: Engine,
    model: dict[str, Any],
    blobs: Sequence[bytes | ProblemError],
    resize: ResizeMode,
    codebooks: int | None,
) -> list[Tokens | ProblemError]:
    """Each blob in an engine call of its own, all in flight at once: an item fails alone (a
    call's limits, such as its total audio, are the item's), and the batcher gathers the calls
    into model batches. A blob that is already a problem stays one."""

    async def one(blob: bytes | ProblemError) -> Tokens | ProblemError:
        try:
            if model["modality"] == "image":
                answer = await engine.encode_images([blob], model["name"], resize)
            else:
                answer = await engine.encode_audio([blob], model["name"], codebooks)
        except ProblemError as exc:
            return exc
        return answer.items[0]

    return list(await asyncio.gather(*(one(blob) for blob in blobs)))
