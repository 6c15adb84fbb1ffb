"""Residual vector quantization: K codebooks, each quantizing what the previous ones left.

Codebooks are buffers (updated by EMA during training, see app/train/); decoding the first
k < K codebooks gives a coarser reconstruction, which is what quantizer dropout trains for.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualVQ(nn.Module):
    """z [B, D, F] <-> codes [B, K, F]."""

    embed: torch.Tensor  # [K, N, D]

    def __init__(self, codebooks: int = 8, codebook_size: int = 1024, dim: int = 128) -> None:
        super().__init__()
        self.codebooks = codebooks
        self.codebook_size = codebook_size
        self.dim = dim
        self.register_buffer("embed", torch.randn(codebooks, codebook_size, dim) * 0.1)

    def nearest(self, residual: torch.Tensor, k: int) -> torch.Tensor:
        """residual [N, D] -> index [N] of the closest entry in codebook k.

        |r - e|^2 = |r|^2 + |e|^2 - 2 r.e, and |r|^2 is the same for every entry, so the argmin
        of |e|^2 - 2 r.e (one fused matrix multiply-add) picks the same entry at half the cost.
        """
        embed = self.embed[k].to(residual.dtype)
        return torch.addmm(embed.pow(2).sum(1), residual, embed.t(), alpha=-2).argmin(dim=1)

    def encode(self, z: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """z [B, D, F] -> codes [B, n_q, F] int64 (all K codebooks by default)."""
        n_q = n_q or self.codebooks
        batch, _, frames = z.shape
        residual = z.permute(0, 2, 1).reshape(-1, self.dim).float()
        codes = []
        for k in range(n_q):
            index = self.nearest(residual, k)
            residual = residual - self.embed[k][index]
            codes.append(index.view(batch, frames))
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, k, F] (k <= K) -> z [B, D, F] as the sum of the first k codebooks' entries."""
        z = torch.zeros(codes.shape[0], codes.shape[2], self.dim, device=codes.device)
        for k in range(codes.shape[1]):
            z = z + self.embed[k][codes[:, k]]
        return z.permute(0, 2, 1)

    def straight_through(self, z: torch.Tensor, n_q: int) -> torch.Tensor:
        """z [B, D, F] quantized by its first n_q codebooks, with the gradient passed to z as if
        quantizing were the identity (for the encode-time search; training has its own path)."""
        quantized = self.decode(self.encode(z.detach(), n_q))
        return z + (quantized - z).detach()
