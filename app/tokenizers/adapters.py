"""Protocol plumbing shared by backends that wrap someone else's model (transformers, exported).

A wrapped audio codec only has to turn ``F * hop`` samples into F frames and back; this module
pads items to whole frames and decides which items may share a forward pass. A wrapped image
tokenizer only has to accept the pixel range it was trained on; this module maps [-1, 1] to it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from app.model_folder import ModelLoadError
from app.tokenizers.base import AudioInfo

# the weights a package's model class is saved with, beside its config.json of constructor arguments
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_package_model(name: str, source: Path, model_class: Callable[..., Any]) -> Any:
    """A package's model class built from a local checkpoint: config.json (the constructor's
    arguments) and its weights (safetensors, or a state dict loaded with ``weights_only``:
    tensors, no code). ModelLoadError names the model and what is wrong."""
    kind = getattr(model_class, "__name__", "the model")
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{name}: {source} has no readable {kind} config.json ({exc})"
        ) from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{name}: {source}/config.json must hold {kind}'s arguments")
    weights = next((source / f for f in WEIGHT_FILES if (source / f).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{name}: {source} holds none of {list(WEIGHT_FILES)}")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model = model_class(**config)
        model.load_state_dict(state)
    except (OSError, TypeError, RuntimeError, ValueError, AssertionError) as exc:
        raise ModelLoadError(f"{name}: cannot load {kind} from {source}: {exc}") from exc
    return model


class BadOption(ValueError):
    """A config.json option the wrapped model cannot honour; the message says what it accepts."""


def check_options(options: dict[str, Any], allowed: tuple[str, ...], model: str) -> None:
    """Refuse options a wrapped model does not know, naming the ones it does."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise BadOption(f"{model} takes no option {unknown}; its options: {list(allowed)}")


def frames_for(lengths: torch.Tensor, hop: int) -> torch.Tensor:
    """[B] samples -> [B] frames = ceil(samples / hop)."""
    return torch.div(lengths + hop - 1, hop, rounding_mode="floor")


def fit_length(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """wave [..., T] cut or zero-padded on the right to [..., samples]."""
    if wave.shape[-1] >= samples:
        return wave[..., :samples]
    return F.pad(wave, (0, samples - wave.shape[-1]))


def by_frame_count(
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    frames: torch.Tensor,
    in_per_frame: int,
    out_per_frame: int,
) -> torch.Tensor:
    """Call ``run(part, rows)`` once per distinct frame count, on exactly that many frames.

    inputs [B, C, frames.max() * in_per_frame] -> outputs [B, D, frames.max() * out_per_frame],
    zero beyond each item's frames; ``rows`` are the items in ``part``. Each item then sees the
    same input as when sent alone.
    """
    outputs: torch.Tensor | None = None
    for count in torch.unique(frames).tolist():
        rows = torch.nonzero(frames == count).flatten()
        part = run(inputs[rows, :, : count * in_per_frame], rows)
        if outputs is None:
            width = int(frames.max()) * out_per_frame
            outputs = part.new_zeros(inputs.shape[0], part.shape[1], width)
        outputs[rows, :, : count * out_per_frame] = part[..., : count * out_per_frame]
    if outputs is None:
        raise ValueError("by_frame_count needs at least one item")
    return outputs


class FramedAudioCodec(ABC):
    """AudioTokenizer for a codec that maps wave [B, C, F * hop] to tokens [B, K, F] and back.

    Items are zero-padded to whole frames. When ``padding_safe`` (a causal codec, or one that
    masks by length) no item's frames depend on the padding after it, so items of any length
    share one forward pass. Any other codec (bidirectional convolutions, attention, whole-clip
    normalisation) runs only items with the same frame count together, so an item's tokens
    never depend on what it was batched with.
    """

    info: AudioInfo
    device: torch.device
    padding_safe: bool

    @property
    def hop(self) -> int:
        """Samples per frame."""
        return self.info.hop_length

    @abstractmethod
    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """wave [B, C, F * hop], lengths [B] samples -> tokens [B, K, F] (at least F frames)."""

    @abstractmethod
    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """tokens [B, k, F], frames [B] -> wave [B, C, about F * hop]; the caller fits it."""

    def encode(
        self, wave: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wave [B, C, T], lengths [B] -> tokens [B, K, F], frames [B] = ceil(lengths / hop)."""
        frames = frames_for(lengths, self.hop)
        width = int(frames.max())
        wave = fit_length(wave, width * self.hop)
        if self.padding_safe:
            tokens = self.encode_frames(wave, lengths)[..., :width]
        else:
            tokens = by_frame_count(
                lambda part, rows: self.encode_frames(part, lengths[rows]),
                wave,
                frames,
                self.hop,
                1,
            )
        return tokens.long(), frames

    def decode(
        self, tokens: torch.Tensor, frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, k, F], frames [B] -> wave [B, C, F * hop] in [-1, 1], lengths [B]."""
        width = tokens.shape[-1]

        def run(part: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            wave = self.decode_frames(part, frames[rows])
            return fit_length(wave, part.shape[-1] * self.hop)

        if self.padding_safe:
            wave = run(tokens, torch.arange(tokens.shape[0], device=tokens.device))
        else:
            wave = by_frame_count(run, tokens, frames, 1, self.hop)
        return fit_length(wave, width * self.hop).float().clamp(-1, 1), frames * self.hop


@dataclass(frozen=True)
class PixelRange:
    """How a model wants pixels: ``(x * rescale - mean) / std`` for x in 0..255, per channel."""

    rescale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
        return mean, std

    def to_model(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> the model's input range."""
        mean, std = self._stats(pixels)
        return ((pixels + 1) * 127.5 * self.rescale - mean) / std

    def from_model(self, values: torch.Tensor) -> torch.Tensor:
        """The model's output [B, 3, H, W] -> pixels in [-1, 1]."""
        mean, std = self._stats(values)
        return ((values * std + mean) / self.rescale / 127.5 - 1).clamp(-1, 1)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> PixelRange:
        """``{"rescale", "mean", "std"}`` as a transformers image processor has them."""
        check_options(spec, ("rescale", "mean", "std"), "pixels")

        def rgb(value: float | list[float]) -> tuple[float, float, float]:
            values = [float(v) for v in value] if isinstance(value, list) else [float(value)] * 3
            if len(values) != 3:
                raise BadOption(f"pixels mean and std take 1 or 3 numbers, not {value}")
            return values[0], values[1], values[2]

        default = cls()
        return cls(
            rescale=float(spec.get("rescale", default.rescale)),
            mean=rgb(spec.get("mean", list(default.mean))),
            std=rgb(spec.get("std", list(default.std))),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``from_dict`` reads."""
        return {"rescale": self.rescale, "mean": list(self.mean), "std": list(self.std)}
