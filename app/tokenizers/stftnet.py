"""Frame-rate encoder and decoder on the STFT (Vocos-style): every layer runs at the token rate.

The encoder reads a power-compressed complex STFT whose hop is the codec's hop; the decoder
predicts a log-magnitude and a phase per bin and overlap-adds an inverse STFT. Nothing is
learned at the sample rate, which is what makes this codec cheap to train and to run on a CPU.
Frames only mix inside masked depthwise convolutions and the inverse STFT is normalised per
item, so an item's output never depends on what it was batched with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from app.tokenizers.seanet import length_mask

COMPRESSION = 0.3  # |S| ** 0.3: speech-enhancement style dynamic range compression
MAX_LOG_MAGNITUDE = 10.0  # exp(10) is far above any real STFT bin of a [-1, 1] wave


def compress(spec: torch.Tensor, power: float = COMPRESSION, floor: float = 1e-5) -> torch.Tensor:
    """|S| ** power with S's phase: quiet bins weigh more; ``floor`` bounds the gradient at 0."""
    return spec * spec.abs().clamp(min=floor).pow(power - 1)


class Spectrum(nn.Module):
    """STFT framing with one frame per hop: T samples (a multiple of hop) <-> T / hop frames.

    Each side is zero-padded by (n_fft - hop) / 2, so frame f is centred on hop f + 1/2 and
    padding past an item's end is zeros whether the item is alone or batched.
    """

    window: torch.Tensor

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        if (n_fft - hop) % 2:
            raise ValueError(f"n_fft - hop must be even, got n_fft={n_fft}, hop={hop}")
        self.n_fft, self.hop, self.pad = n_fft, hop, (n_fft - hop) // 2
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def analyse(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [N, T] -> complex spectrum [N, bins, T / hop]."""
        padded = F.pad(wave.float(), (self.pad, self.pad))
        return torch.stft(
            padded,
            self.n_fft,
            self.hop,
            window=self.window.float(),
            center=False,
            return_complex=True,
        )

    def synthesise(self, spec: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """complex spectrum [N, bins, F], frame_mask [N, F] -> wave [N, F * hop].

        Weighted overlap-add; each item's window envelope counts only its own valid frames.
        """
        n, _, frames = spec.shape
        window = self.window.float()  # the FFTs run in float32 even when the model is bf16/fp16
        mask = frame_mask[:, None, :].float()
        chunks = torch.fft.irfft(spec, n=self.n_fft, dim=1) * window[None, :, None] * mask
        size = (1, (frames - 1) * self.hop + self.n_fft)
        fold = {"output_size": size, "kernel_size": (1, self.n_fft), "stride": (1, self.hop)}
        wave = F.fold(chunks, **fold).view(n, -1)
        envelope = F.fold(window.pow(2)[None, :, None] * mask.expand(n, -1, -1), **fold)
        wave = wave / envelope.view(n, -1).clamp(min=1e-8)
        return wave[:, self.pad : self.pad + frames * self.hop]


class ConvNeXtBlock(nn.Module):
    """x + gamma * MLP(LayerNorm(depthwise_conv(x))), x [B, D, F]; frames mix only via the mask."""

    def __init__(self, dim: int, mlp_ratio: int, layer_scale: float, kernel_size: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.Linear(dim, dim * mlp_ratio)
        self.down = nn.Linear(dim * mlp_ratio, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x * mask).transpose(1, 2)
        y = self.down(F.gelu(self.up(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class ConvNeXtStack(nn.Module):
    """[B, in, F] -> pointwise embed -> ConvNeXt blocks -> LayerNorm -> linear -> [B, out, F]."""

    def __init__(
        self, in_channels: int, dim: int, blocks: int, out_channels: int, mlp_ratio: int = 3
    ) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, dim, 1)
        self.norm_in = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, mlp_ratio, layer_scale=1 / blocks) for _ in range(blocks)
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, out_channels)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        mask = length_mask(frames, x.shape[-1], self.embed.weight.dtype)
        x = self.norm_in(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x, mask)
        return self.proj(self.norm_out(x.transpose(1, 2))).transpose(1, 2)


class STFTEncoder(nn.Module):
    """wave [B, C, T] (T a multiple of the hop), lengths [B] -> latents [B, latent_dim, T / hop]."""

    def __init__(
        self, channels: int, hop: int, n_fft: int, dim: int, blocks: int, latent_dim: int
    ) -> None:
        super().__init__()
        self.spectrum = Spectrum(n_fft, hop)
        self.stack = ConvNeXtStack(channels * 2 * self.spectrum.bins, dim, blocks, latent_dim)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch = wave.shape[0]
        wave = wave * length_mask(lengths, wave.shape[-1])
        spec = self.spectrum.analyse(wave.flatten(0, 1))
        spec = compress(spec)
        features = torch.cat([spec.real, spec.imag], dim=1).view(batch, -1, spec.shape[-1])
        features = features.to(self.stack.embed.weight.dtype)
        hop = self.spectrum.hop
        return self.stack(features, torch.div(lengths + hop - 1, hop, rounding_mode="floor"))


class STFTDecoder(nn.Module):
    """latents [B, latent_dim, F], frames [B] -> wave [B, C, F * hop]."""

    def __init__(
        self, channels: int, hop: int, n_fft: int, dim: int, blocks: int, latent_dim: int
    ) -> None:
        super().__init__()
        self.channels = channels
        self.spectrum = Spectrum(n_fft, hop)
        self.stack = ConvNeXtStack(latent_dim, dim, blocks, channels * 2 * self.spectrum.bins)

    def forward(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        batch, _, size = latents.shape
        out = self.stack(latents, frames).float().view(batch * self.channels, 2, -1, size)
        magnitude = out[:, 0].clamp(max=MAX_LOG_MAGNITUDE).exp()
        spec = torch.polar(magnitude, out[:, 1])
        mask = length_mask(frames, size).repeat_interleave(self.channels, dim=0)[:, 0]
        wave = self.spectrum.synthesise(spec, mask)
        return wave.view(batch, self.channels, -1)
