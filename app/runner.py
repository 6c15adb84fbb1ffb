"""Batch functions between the queue and a backend: collate items, one forward, split results.

They run in the model's worker thread (see batching.Batcher). Items arrive as CPU tensors or
numpy arrays of one item each; results leave as numpy arrays of one item each, so neither the
queue nor the API ever touches a device tensor.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import cast

import numpy as np
import torch

from app.registry import LoadedModel
from app.tokenizers.base import AudioTokenizer, ImageTokenizer
from app.tokens import token_dtype

# Audio items are batched with others of a similar length, so that padding wastes at most 25%.
LENGTH_BUCKET_RATIO = 1.25


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error, which a smaller batch may avoid."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _to_device(batch: torch.Tensor, model: LoadedModel) -> torch.Tensor:
    """Host batch -> model device and dtype; pinned memory + non-blocking copy on CUDA."""
    if model.device.type == "cuda":
        batch = batch.pin_memory().to(model.device, non_blocking=True)
    return batch.to(model.device, dtype=model.dtype if batch.is_floating_point() else batch.dtype)


def _host_tokens(tokens: torch.Tensor, model: LoadedModel) -> np.ndarray:
    """Device tokens -> a host array in the model's token dtype, the one every answer keeps."""
    return tokens.to("cpu", torch.int32).numpy().astype(token_dtype(model.info.vocab_size))


def to_rgb8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] (clamped) -> uint8 [B, H, W, 3], rounding half to even."""
    levels = pixels.float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
    return levels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def length_bucket(samples: int) -> int:
    """Group key for an audio item: lengths within a factor of 1.25 share a bucket."""
    return math.ceil(math.log(max(samples, 1), LENGTH_BUCKET_RATIO))


class ImageRunner:
    """encode: pixels [3, H, W] in [-1, 1] -> tokens [h, w]; decode: tokens -> RGB [H, W, 3]."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.tokenizer = cast(ImageTokenizer, model.tokenizer)

    @staticmethod
    def group(pixels: torch.Tensor) -> Hashable:
        """Only images of one size share a batch."""
        return tuple(pixels.shape)

    @staticmethod
    def decode_group(tokens: np.ndarray) -> Hashable:
        """Grids of one shape share a batch."""
        return tuple(tokens.shape)

    @torch.inference_mode()
    def encode_batch(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        pixels = _to_device(torch.stack(items), self.model)
        tokens = self.tokenizer.encode(pixels)
        return list(_host_tokens(tokens, self.model))

    @torch.inference_mode()
    def decode_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        """Token grids -> 8-bit RGB [H, W, 3], converted on the device: one vectorised op per
        batch, and a quarter of the bytes of float pixels to copy back from an accelerator."""
        tokens = _to_device(torch.from_numpy(np.stack(items)).long(), self.model)
        return list(to_rgb8(self.tokenizer.decode(tokens)).cpu().numpy())


class AudioRunner:
    """encode: wave [C, T] -> tokens [K, F]; decode: tokens [k, F] -> wave [C, F * hop]."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.tokenizer = cast(AudioTokenizer, model.tokenizer)

    @staticmethod
    def encode_group(wave: torch.Tensor) -> Hashable:
        return length_bucket(wave.shape[-1])

    @staticmethod
    def decode_group(tokens: np.ndarray) -> Hashable:
        """Only token arrays with the same number of codebooks share a batch."""
        return (tokens.shape[0], length_bucket(tokens.shape[-1]))

    @torch.inference_mode()
    def encode_batch(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        lengths = torch.tensor([wave.shape[-1] for wave in items])
        batch = torch.zeros(len(items), items[0].shape[0], int(lengths.max()))
        for i, wave in enumerate(items):
            batch[i, :, : wave.shape[-1]] = wave
        tokens, frames = self.tokenizer.encode(
            _to_device(batch, self.model), _to_device(lengths, self.model)
        )
        host = _host_tokens(tokens, self.model)
        return [host[i, :, : int(f)] for i, f in enumerate(frames.cpu())]

    @torch.inference_mode()
    def decode_batch(self, items: list[np.ndarray]) -> list[torch.Tensor]:
        frames = torch.tensor([tokens.shape[-1] for tokens in items])
        batch = torch.zeros(len(items), items[0].shape[0], int(frames.max()), dtype=torch.long)
        for i, tokens in enumerate(items):
            batch[i, :, : tokens.shape[-1]] = torch.from_numpy(tokens)
        wave, lengths = self.tokenizer.decode(
            _to_device(batch, self.model), _to_device(frames, self.model)
        )
        wave = wave.float().cpu()
        return [wave[i, :, : int(n)] for i, n in enumerate(lengths.cpu())]
