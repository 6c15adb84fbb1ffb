"""Training-side residual VQ: straight-through codes, commitment loss, EMA codebooks, restarts.

The inference module (app/tokenizers/rvq.py) only holds the codebooks in its ``embed`` buffer
[K, N, D]; this wrapper keeps the EMA statistics beside it and writes updated codebooks into
that buffer, so exported weights need nothing from here.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from app.tokenizers.rvq import ResidualVQ


class EMAResidualVQ(nn.Module):
    """Quantize latents z [B, D, F] with the first n_q codebooks of ``quantizer``; train them."""

    cluster_size: torch.Tensor  # [K, N] EMA of how often each code is chosen per batch
    embed_sum: torch.Tensor  # [K, N, D] EMA of the sum of residuals assigned to each code
    initialized: torch.Tensor  # [K] bool

    def __init__(
        self,
        quantizer: ResidualVQ,
        decay: float = 0.99,
        dead_threshold: float = 0.05,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.eps = eps
        shape = quantizer.embed.shape  # [K, N, D]
        self.register_buffer("cluster_size", torch.zeros(shape[0], shape[1]))
        self.register_buffer("embed_sum", quantizer.embed.detach().clone())
        self.register_buffer("initialized", torch.zeros(shape[0], dtype=torch.bool))
        self.restarts = [0] * shape[0]

    @property
    def embed(self) -> torch.Tensor:
        """The served codebooks [K, N, D] (the quantizer's buffer, updated in place)."""
        return cast(torch.Tensor, self.quantizer.embed)

    def forward(self, z: torch.Tensor, n_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, F] -> (quantized [B, D, F] straight-through, codes [B, n_q, F], commitment).

        In training mode the used codebooks are updated by EMA after quantizing.
        """
        batch, dim, frames = z.shape
        flat = z.permute(0, 2, 1).reshape(-1, dim).float()
        residual = flat.detach()
        quantized = torch.zeros_like(residual)
        codes = []
        for k in range(n_q):
            if self.training and not bool(self.initialized[k]):
                self._initialize(k, residual)
            index = self.quantizer.nearest(residual, k)
            chosen = self.embed[k][index]
            if self.training:
                self._update(k, residual, index)
            quantized = quantized + chosen
            residual = residual - chosen
            codes.append(index.view(batch, frames))
        commitment = F.mse_loss(flat, quantized.detach())
        straight = flat + (quantized - flat).detach()
        out = straight.view(batch, frames, dim).permute(0, 2, 1).to(z.dtype)
        return out, torch.stack(codes, dim=1), commitment

    @torch.no_grad()
    def _initialize(self, k: int, residual: torch.Tensor) -> None:
        """Codebook k starts as random residual vectors of the first batch that reaches it."""
        size = self.quantizer.codebook_size
        picks = torch.randint(0, residual.shape[0], (size,), device=residual.device)
        mean_count = residual.shape[0] / size
        self.embed[k].copy_(residual[picks])
        self.embed_sum[k].copy_(residual[picks] * mean_count)
        self.cluster_size[k].fill_(mean_count)
        self.initialized[k] = True

    @torch.no_grad()
    def _update(self, k: int, residual: torch.Tensor, index: torch.Tensor) -> None:
        """EMA of counts and sums (Laplace-smoothed), then restart codes that went unused.

        ``dead_threshold`` is an EMA count per batch; a restarted code gets the mean count so it
        has a few hundred steps to be chosen before it can be restarted again.
        """
        onehot = F.one_hot(index, self.quantizer.codebook_size).type(residual.dtype)  # [N_vec, N]
        self.cluster_size[k].mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum[k].mul_(self.decay).add_(onehot.t() @ residual, alpha=1 - self.decay)
        total = self.cluster_size[k].sum()
        size = (self.cluster_size[k] + self.eps) / (total + self.quantizer.codebook_size * self.eps)
        self.embed[k].copy_(self.embed_sum[k] / (size * total).unsqueeze(1))
        dead = self.cluster_size[k] < self.dead_threshold
        count = int(dead.sum())
        if count:
            picks = torch.randint(0, residual.shape[0], (count,), device=residual.device)
            self.embed[k][dead] = residual[picks]
            mean_count = residual.shape[0] / self.quantizer.codebook_size
            self.embed_sum[k][dead] = residual[picks] * mean_count
            self.cluster_size[k][dead] = mean_count
            self.restarts[k] += count

    @torch.no_grad()
    def adopt_codebooks(self, mean_count: float = 0.5) -> None:
        """Treat the quantizer's current codebooks as trained (warm start from exported weights)."""
        self.cluster_size.fill_(mean_count)
        self.embed_sum.copy_(self.embed * mean_count)
        self.initialized.fill_(True)
