"""Exponential moving average of a model's weights, the copy that gets exported and served."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """Shadow copy of ``model``; parameters are averaged, buffers (e.g. codebooks) copied as is."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move towards ``model``; the decay ramps up over the first steps, (1 + s) / (10 + s)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, param in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(param.detach(), 1 - decay)
        for copy_, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            copy_.copy_(buffer)
