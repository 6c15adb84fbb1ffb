"""The lifespan objects a request needs, built once at start-up and reached through app.state."""

from __future__ import annotations

import time
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
    draining_since: float | None = None  # time.monotonic() of SIGTERM

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_drain(self) -> None:
        """Readiness fails from now on; the drain time counts from the first call."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def drain_left_s(self) -> float:
        """What remains of TOKSERVE_DRAIN_TIMEOUT_S for the queues, after in-flight requests."""
        spent = time.monotonic() - (self.draining_since or time.monotonic())
        return max(0.0, self.settings.drain_timeout_s - spent)

    def batcher(self, model: LoadedModel, op: str) -> Batcher[Any, Any]:
        """The queue for one model and operation."""
        return self.batchers[(model.name, op)]
