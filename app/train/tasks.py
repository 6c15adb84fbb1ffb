"""What is trained: the model, its batches, and its loss, per modality."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from app.tokenizers.audio import RVQAudioCodec
from app.tokenizers.image import FSQImageTokenizer
from app.tokenizers.wave_losses import AudioLoss
from app.train.config import TrainConfig
from app.train.data import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    AudioSegments,
    ImageCrops,
    RandomBatches,
    split_files,
)
from app.train.losses import ImageLoss
from app.train.rvq import EMAResidualVQ


class Task(Protocol):
    """A model with its data and loss; the trainer only sees this."""

    model: nn.Module
    sampler: RandomBatches  # makes the training batches
    unit: str  # what throughput counts: "img" or "audio_s"

    def items(self, batch: torch.Tensor) -> float: ...

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def warm_started(self) -> None: ...

    def to(self, device: torch.device) -> None: ...


class ImageTask:
    """FSQ image tokenizer on random crops; L1 + MSE + MS-SSIM, optionally a code-spread term.

    FSQ needs no quantizer loss to train; ``quantizer.entropy`` (a weight) adds the collision
    entropy gap of the batch's codes, so that more of the vocabulary is used.
    """

    unit = "img"

    def __init__(self, config: TrainConfig, data_dir: Path, rng: random.Random) -> None:
        data = config.data
        files = split_files(
            data_dir / "images", IMAGE_SUFFIXES, data.get("val_fraction", 0.1), validation=False
        )
        short_side = data.get("short_side", [256, 384])
        self.sampler: RandomBatches = ImageCrops(
            files,
            data.get("crop", 128),
            (short_side[0], short_side[1]),
            rng,
            workers=data.get("workers"),
        )
        self.tokenizer = FSQImageTokenizer(**config.arch)
        self.model: nn.Module = self.tokenizer
        self.criterion = ImageLoss(**config.loss)
        self.entropy = config.quantizer.get("entropy", 0.0)
        self.temperature = config.quantizer.get("temperature", 0.25)

    def items(self, batch: torch.Tensor) -> float:
        return float(batch.shape[0])

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """pixels [B, 3, H, W] -> (loss, its parts)."""
        tokenizer = self.tokenizer
        latents = tokenizer.latents(batch)
        total, parts = self.criterion(tokenizer.decoder(tokenizer.quantizer(latents)), batch)
        if self.entropy:
            gap = tokenizer.quantizer.collision_entropy_gap(latents, self.temperature)
            parts["entropy_gap"] = float(gap.detach())
            total = total + self.entropy * gap
        return total, parts

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def warm_started(self) -> None:
        return None

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.criterion.to(device)


class AudioTask:
    """RVQ codec on random segments; STFT + mel + L1, commitment, quantizer dropout."""

    unit = "audio_s"

    def __init__(self, config: TrainConfig, data_dir: Path, rng: random.Random) -> None:
        data = config.data
        val_fraction = data.get("val_fraction", 0.1)
        groups = [
            split_files(data_dir / "audio" / group, AUDIO_SUFFIXES, val_fraction, validation=False)
            for group in data.get("groups", ["speech", "music"])
        ]
        codec = RVQAudioCodec(**config.arch)
        self.model: nn.Module = codec
        self.codec = codec
        self.sampler: RandomBatches = AudioSegments(
            groups,
            codec.sample_rate,
            data.get("segment_s", 1.0),
            rng,
            weights=data.get("group_weights"),
            workers=data.get("workers"),
        )
        self.criterion = AudioLoss(codec.sample_rate, **config.loss)
        quantizer = config.quantizer
        self.rvq = EMAResidualVQ(
            codec.quantizer,
            decay=quantizer.get("decay", 0.99),
            dead_threshold=quantizer.get("dead_threshold", 0.05),
        )
        self.commitment = quantizer.get("commitment", 1.0)
        self.dropout = quantizer.get("dropout", 0.5)
        self.update_codebooks = "quantizer" not in config.freeze
        self.rng = rng

    def items(self, batch: torch.Tensor) -> float:
        return batch.shape[0] * batch.shape[-1] / self.codec.sample_rate

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """wave [B, 1, T] (T a multiple of the hop) -> (loss, its parts)."""
        self.rvq.train(self.model.training and self.update_codebooks)
        codebooks = self.codec.quantizer.codebooks
        n_q = self.rng.randint(1, codebooks) if self.rng.random() < self.dropout else codebooks
        lengths = torch.full((batch.shape[0],), batch.shape[-1], device=batch.device)
        latents = self.codec.encoder(batch, lengths)
        quantized, _, commitment = self.rvq(latents, n_q)
        frames = self.codec.frames_for(lengths)
        recon = self.codec.decoder(quantized, frames)
        total, parts = self.criterion(recon, batch)
        parts["commit"] = float(commitment.detach())
        return total + self.commitment * commitment, parts

    def state_dict(self) -> dict[str, Any]:
        """The codebooks' EMA statistics (not part of the served weights)."""
        return {"rvq": self.rvq.state_dict(), "restarts": list(self.rvq.restarts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rvq.load_state_dict(state["rvq"])
        self.rvq.restarts = list(state["restarts"])

    def warm_started(self) -> None:
        """Codebooks came from exported weights: restart their EMA statistics at average counts."""
        self.rvq.adopt_codebooks()

    def to(self, device: torch.device) -> None:
        self.model.to(device)
        self.criterion.to(device)
        self.rvq.to(device)


def build_task(config: TrainConfig, data_dir: Path, rng: random.Random) -> Task:
    """The task for the config's modality."""
    if config.modality == "image":
        return ImageTask(config, data_dir, rng)
    if config.modality == "audio":
        return AudioTask(config, data_dir, rng)
    raise ValueError(f"unknown modality {config.modality!r}; expected 'image' or 'audio'")
