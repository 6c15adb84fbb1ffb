"""What a call answers: each item's tokens with the model version that made them, or its problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class TokserveError(RuntimeError):
    """An error answered by the server: its status and the problem document's detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Encoded:
    """One item's tokens (``shape``: [h, w] for an image, [codebooks, frames] for audio), the
    model and version that made them, whether the server's cache answered, and the item's
    other figures as the server gives them (audio: codebooks, frames, frame_rate, sample_rate,
    duration_s, ...; images: source_size, crop_box, content_box)."""

    tokens: np.ndarray
    model: str
    version: str
    cached: bool
    shape: tuple[int, ...]
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemError:
    """One item's problem: its index in the call, and the status, detail and title the server
    gave it."""

    index: int
    status: int
    detail: str
    title: str = ""


class ItemsFailed(TokserveError):
    """Some items failed; ``results`` holds, in order, each item's Encoded or ItemError, so the
    items that succeeded need not be sent again."""

    def __init__(self, results: list[Encoded | ItemError]) -> None:
        self.results = results
        self.errors = [r for r in results if isinstance(r, ItemError)]
        listed = "; ".join(f"item {e.index}: {e.status} {e.detail}" for e in self.errors)
        failed = f"{len(self.errors)} of {len(results)} items failed: {listed}"
        super().__init__(self.errors[0].status, failed)
