"""SEANet encoder and decoder (as in EnCodec), with per-item length masks.

Items of one batch are zero-padded to a common length. Every convolution wider than one tap
reads only masked inputs, so an item's output never depends on what it was batched with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def length_mask(
    lengths: torch.Tensor, size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B] valid lengths -> [B, 1, size] mask of ones and zeros in ``dtype``."""
    positions = torch.arange(size, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).unsqueeze(1).to(dtype)


class ResidualUnit(nn.Module):
    """x + conv1(act(conv_k(act(x)))), x: [B, C, T]; the caller masks x."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        hidden = channels // 2
        pad = (kernel_size - 1) * dilation // 2
        self.conv_k = nn.Conv1d(channels, hidden, kernel_size, dilation=dilation, padding=pad)
        self.conv_1 = nn.Conv1d(hidden, channels, 1)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_1(self.act(self.conv_k(self.act(x))))


class SEANetEncoder(nn.Module):
    """wave [B, C, T] (T a multiple of the hop) -> latents [B, D, T / hop]."""

    def __init__(
        self,
        channels: int = 1,
        base: int = 16,
        ratios: tuple[int, ...] = (2, 4, 5, 8),
        latent_dim: int = 128,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.ratios = list(ratios)
        self.conv_in = nn.Conv1d(channels, base, kernel_size, padding=kernel_size // 2)
        self.res = nn.ModuleList()
        self.down = nn.ModuleList()
        width = base
        for ratio in self.ratios:
            self.res.append(ResidualUnit(width))
            self.down.append(nn.Conv1d(width, width * 2, 2 * ratio, stride=ratio))
            width *= 2
        self.conv_out = nn.Conv1d(width, latent_dim, 3, padding=1)
        self.act = nn.ELU()

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(wave * length_mask(lengths, wave.shape[-1], wave.dtype))
        for ratio, res, down in zip(self.ratios, self.res, self.down, strict=True):
            x = res(x * length_mask(lengths, x.shape[-1], x.dtype))
            x = self.act(x) * length_mask(lengths, x.shape[-1], x.dtype)
            # kernel 2r, stride r: pad r/2 each side so T -> T / r exactly
            x = down(F.pad(x, ((ratio + 1) // 2, ratio // 2)))
            lengths = torch.div(lengths + ratio - 1, ratio, rounding_mode="floor")
        x = self.act(x) * length_mask(lengths, x.shape[-1], x.dtype)
        return self.conv_out(x)


class SEANetDecoder(nn.Module):
    """latents [B, D, F] -> wave [B, C, F * hop]."""

    def __init__(
        self,
        channels: int = 1,
        base: int = 16,
        ratios: tuple[int, ...] = (2, 4, 5, 8),
        latent_dim: int = 128,
        kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.ratios = list(reversed(ratios))
        width = base * 2 ** len(self.ratios)
        self.conv_in = nn.Conv1d(latent_dim, width, 3, padding=1)
        self.up = nn.ModuleList()
        self.res = nn.ModuleList()
        for ratio in self.ratios:
            self.up.append(nn.ConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio))
            self.res.append(ResidualUnit(width // 2))
            width //= 2
        self.conv_out = nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ELU()

    def forward(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        lengths = frames
        x = self.conv_in(latents * length_mask(lengths, latents.shape[-1], latents.dtype))
        for ratio, up, res in zip(self.ratios, self.up, self.res, strict=True):
            x = self.act(x) * length_mask(lengths, x.shape[-1], x.dtype)
            size = x.shape[-1] * ratio
            # transposed conv yields (F + 1) * r samples; trim r/2 each side
            x = up(x)[..., (ratio + 1) // 2 : (ratio + 1) // 2 + size]
            lengths = lengths * ratio
            x = res(x * length_mask(lengths, size, x.dtype))
        x = self.act(x) * length_mask(lengths, x.shape[-1], x.dtype)
        return self.conv_out(x)
