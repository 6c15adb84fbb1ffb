"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple").

Each latent channel is bounded and rounded to one of ``levels[i]`` values; the product of the
levels is the vocabulary. There is no codebook to learn and none can collapse.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    """Quantize ``z: [B, D, ...]`` with ``D = len(levels)`` channels to integer indices and back."""

    _levels: torch.Tensor
    _basis: torch.Tensor

    def __init__(self, levels: list[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels = list(levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1, *self.levels[:-1]], dtype=torch.int64), dim=0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    def _view(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (z.dim() - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """z squashed into each channel's range of levels; rounding it gives the digits."""
        levels = self._view(self._levels, z)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents in [-1, 1] with a straight-through gradient; z: [B, D, ...]."""
        bounded = self.bound(z.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_width = self._view(self._levels, z) // 2
        return rounded / half_width

    def collision_entropy_gap(
        self, z: torch.Tensor, temperature: float = 0.25, sample: int = 1024
    ) -> torch.Tensor:
        """Bits by which the batch's codes fall short of a uniform spread over the vocabulary.

        Each channel is softly assigned to its levels (softmax of -distance^2 / temperature), so
        two positions share a code with probability prod_d <soft_d(n), soft_d(m)>. The mean of
        that over pairs of distinct positions is the codes' collision probability; the gap is
        log2(vocab) plus its log2 (Renyi-2 entropy's shortfall), which a few heavily used codes
        dominate. Up to ``sample`` positions of z: [B, D, ...] are used. Returns a scalar.
        """
        bounded = self.bound(z.float()).transpose(0, 1).flatten(1)  # [D, N]
        if bounded.shape[1] > sample:
            # drawn on the CPU generator, whose state training checkpoints (resume is exact)
            keep = torch.randperm(bounded.shape[1])[:sample]
            bounded = bounded[:, keep.to(z.device)]
        positions = bounded.shape[1]
        same_code = torch.ones(positions, positions, device=z.device)
        for channel, levels in enumerate(self.levels):
            grid = torch.arange(levels, device=z.device, dtype=bounded.dtype) - levels // 2
            soft = torch.softmax(-((bounded[channel, :, None] - grid) ** 2) / temperature, dim=-1)
            same_code = same_code * (soft @ soft.T)
        collisions = (same_code.sum() - same_code.diagonal().sum()) / (positions * (positions - 1))
        return math.log2(self.vocab_size) + torch.log2(collisions)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, D, ...] -> indices [B, ...] int64 in [0, vocab_size)."""
        levels = self._view(self._levels, z)
        digits = torch.round(self.bound(z.float())) + levels // 2
        basis = self._view(self._basis, z)
        return (digits.long() * basis).sum(dim=1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: [B, ...] -> quantized latents [B, D, ...] in [-1, 1]."""
        z_shape = indices.unsqueeze(1)
        basis = self._view(self._basis, z_shape)
        levels = self._view(self._levels, z_shape).long()
        digits = (z_shape // basis) % levels
        half_width = levels // 2
        return (digits - half_width).float() / half_width
