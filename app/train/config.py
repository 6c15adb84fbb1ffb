"""Training configuration: one JSON file holds the architecture, the data, losses and optimizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; ``arch`` and ``serving`` go verbatim to config.json."""

    name: str
    modality: str  # "image" | "audio"
    architecture: str  # "fsq_image" | "rvq_audio"
    arch: dict[str, Any]
    serving: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    quantizer: dict[str, float] = field(default_factory=dict)
    # Model parts kept as they are: ["encoder"] (image) or ["encoder", "quantizer"] (audio) keeps
    # every token id, so a better decoder can replace the shipped one without re-tokenizing.
    freeze: list[str] = field(default_factory=list)
    batch_size: int = 16
    steps: int = 100_000
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_minutes: float = 4.0
    log_every: int = 10

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a JSON object; unknown keys are an error so that typos cannot pass."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(
                f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}"
            )
        config = cls(**values)
        config.betas = (float(config.betas[0]), float(config.betas[1]))
        return config

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
