"""The Tokenizer protocol: what every backend implements, batch-first, on the model's device.

A backend encodes and decodes batches and declares its metadata; queues, caching, media
parsing and HTTP are the service's job, never the backend's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Modality = Literal["image", "audio"]


@dataclass(frozen=True)
class TokenizerInfo:
    """What a client needs to know to produce and consume a model's tokens."""

    modality: Modality
    vocab_size: int  # per codebook
    codebooks: int  # K: 1 for image tokenizers
    # image
    image_size: tuple[int, int] | None = None  # (H, W) the model expects
    grid: tuple[int, int] | None = None  # (h, w) tokens per image
    downsample: int | None = None
    # audio
    sample_rate: int | None = None
    channels: int | None = None
    hop_length: int | None = None
    frame_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata (tuples become lists, empty fields dropped)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images to a grid of token ids and back."""

    info: TokenizerInfo
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W] float in [-1, 1] -> tokens: [B, h, w] int64."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, h, w] int64 -> pixels: [B, 3, H, W] float in [-1, 1]."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    """Waveforms to K codebooks of frame tokens and back; a batch may mix lengths."""

    info: TokenizerInfo
    device: torch.device

    def encode(
        self, wave: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wave: [B, C, T] float, lengths: [B] samples -> tokens [B, K, F] int64, frames [B].

        Item b's tokens are ``tokens[b, :, :frames[b]]`` with frames = ceil(lengths / hop).
        """
        ...

    def decode(
        self, tokens: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B, k, F] (k <= K codebooks), frames: [B] -> wave [B, C, T], lengths [B]."""
        ...


Tokenizer = ImageTokenizer | AudioTokenizer
