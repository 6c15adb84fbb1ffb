"""The lifespan objects a request needs, built once at start-up and reached through app.state."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.batching import Batcher
from app.cache import TokenCache
from app.config import Settings
from app.pipeline import Pipeline
from app.registry import LoadedModel, ModelRegistry
from app.runner import AudioRunner, ImageRunner


@dataclass
class Services:
    """Everything owned by the app's lifespan: models, their batchers, the cache, thread pools."""

    settings: Settings
    registry: ModelRegistry
    cache: TokenCache
    pipeline: Pipeline
    media_pool: ThreadPoolExecutor
    runners: dict[str, ImageRunner | AudioRunner] = field(default_factory=dict)
    batchers: dict[tuple[str, str], Batcher[Any, Any]] = field(default_factory=dict)
    ready: bool = False
    draining: bool = False

    def batcher(self, model: LoadedModel, op: str) -> Batcher[Any, Any]:
        """The queue for one model and operation."""
        return self.batchers[(model.name, op)]
