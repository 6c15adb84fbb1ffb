"""The Tokenizer protocol: what every backend implements, batch-first, on the model's device.

A backend encodes and decodes batches and declares its metadata (``ImageInfo`` or
``AudioInfo``: the fields of its modality, every one required); queues, caching, media parsing
and HTTP are the service's job, never the backend's. An encode-only tokenizer (a semantic
tokenizer whose decoder is a separate model, or a checkpoint shipped without one) declares
``encode_only``: the service answers its decodes with a 422 and never calls its ``decode``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

Modality = Literal["image", "audio"]


# kw_only lets the fields keep the order GET /v1/models answers them in, defaults or not
@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """What a client needs to know to produce and consume an image model's token grids."""

    modality: ClassVar[Literal["image"]] = "image"
    vocab_size: int
    codebooks: int = 1  # one grid of tokens per image
    image_size: tuple[int, int]  # (H, W) the model expects
    # tokens per image: (h, w) for a grid; (L,) for a one-dimensional sequence (TiTok's
    # learned latent tokens, or the maps of ``scales`` one after another)
    grid: tuple[int, ...]
    downsample: int  # image pixels per side of a grid cell (of the finest map); 0 for none
    encode_only: bool = False  # no decoder: tokens cannot be turned back into images
    # multi-scale token maps (VAR): each map's (h, w), coarse to fine, their tokens one
    # sequence, map after map, in row-major order; grid is then (the sum of h * w,)
    scales: tuple[tuple[int, int], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scales and self.grid != (sum(h * w for h, w in self.scales),):
            raise ValueError(
                f"the token maps {list(self.scales)} are one sequence of "
                f"{sum(h * w for h, w in self.scales)} tokens, not a grid of {list(self.grid)}"
            )

    def streams(self) -> list[dict[str, Any]]:
        """The image's token streams: its grid, its sequence, or each map of its scales with
        the positions of the sequence it fills."""
        if not self.scales:
            name = "grid" if len(self.grid) == 2 else "sequence"
            return [{"name": name, "shape": list(self.grid), "vocab_size": self.vocab_size}]
        streams, start = [], 0
        for index, (height, width) in enumerate(self.scales):
            stop = start + height * width
            streams.append(
                {
                    "name": f"scale {index}",
                    "shape": [height, width],
                    "positions": [start, stop],
                    "vocab_size": self.vocab_size,
                }
            )
            start = stop
        return streams

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata, the modality first; ``extra`` only when it holds something."""
        return {**_json_ready(self.modality, asdict(self)), "streams": self.streams()}


@dataclass(frozen=True, kw_only=True)
class AudioInfo:
    """What a client needs to know to produce and consume an audio model's codes."""

    modality: ClassVar[Literal["audio"]] = "audio"
    vocab_size: int  # per codebook
    codebooks: int  # K
    sample_rate: int  # Hz
    channels: int
    hop_length: int  # samples per frame
    frame_rate: float  # frames per second: sample_rate / hop_length
    encode_only: bool = False  # no decoder: tokens cannot be turned back into audio
    causal: bool = False  # a frame's tokens never depend on later samples
    streaming: bool = False  # served live over /v1/audio/stream/* (a causal model with state)
    # tokens per frame of each codebook, for codebooks at several rates (SNAC: 1, 2, 4);
    # empty: one each. Codebook k's tokens fill rows(k) .. rows(k + 1) of the token array.
    tokens_per_frame: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self, codebooks: int | None = None) -> int:
        """Rows of the token array [rows, F] that hold the first ``codebooks`` codebooks (all
        when None): one per codebook, or each codebook's tokens per frame."""
        per_frame = self.tokens_per_frame or (1,) * self.codebooks
        return sum(per_frame[: self.codebooks if codebooks is None else codebooks])

    def streams(self) -> list[dict[str, Any]]:
        """Each codebook's token stream: its rows of the token array, rate and vocabulary."""
        per_frame = self.tokens_per_frame or (1,) * self.codebooks
        return [
            {
                "name": f"codebook {k}",
                "rows": list(range(self.rows(k), self.rows(k + 1))),
                "tokens_per_frame": per_frame[k],
                "rate": self.frame_rate * per_frame[k],
                "vocab_size": self.vocab_size,
            }
            for k in range(self.codebooks)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata, the modality first; ``extra`` only when it holds something."""
        return {**_json_ready(self.modality, asdict(self)), "streams": self.streams()}


TokenizerInfo = ImageInfo | AudioInfo


def _json_ready(modality: Modality, fields: dict[str, Any]) -> dict[str, Any]:
    extra = fields.pop("extra")
    return {"modality": modality, **fields, **({"extra": extra} if extra else {})}


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images to a grid of token ids and back."""

    info: ImageInfo
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, H, W] float in [-1, 1] -> tokens: [B, *grid] int64."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, *grid] int64 -> pixels: [B, 3, H, W] float in [-1, 1]."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    """Waveforms to K codebooks of frame tokens and back; a batch may mix lengths."""

    info: AudioInfo
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
