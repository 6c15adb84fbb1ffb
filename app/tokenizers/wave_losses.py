"""Reconstruction losses of waves: multi-resolution STFT, mel L1, compressed complex STFT.

Training minimises them (app/train), and so does the codec's encode-time search
(``RVQAudioCodec.refine``), which is why they live beside the codec rather than in app/train.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from app.tokenizers.stftnet import compress


def weighted_sum(parts: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum of weights[k] * parts[k] (scalar tensors)."""
    total = torch.zeros((), device=next(iter(parts.values())).device)
    for key, value in parts.items():
        total = total + weights[key] * value
    return total


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular filters on the HTK mel scale: [n_mels, n_fft // 2 + 1]."""

    def to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595 * torch.log10(1 + hz / 700)

    def to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700 * (10 ** (mel / 2595) - 1)

    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(torch.linspace(0, float(to_mel(torch.tensor(sample_rate / 2))), n_mels + 2))
    low, center, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - low) / (center - low)
    falling = (high - bins[None]) / (high - center)
    return torch.clamp(torch.minimum(rising, falling), min=0)


def spectrum(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """wave [B, T] -> complex STFT [B, n_fft // 2 + 1, frames] (Hann window)."""
    window = torch.hann_window(n_fft, device=wave.device)
    return torch.stft(wave, n_fft, hop, window=window, return_complex=True)


def magnitude(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """wave [B, T] -> |STFT| [B, n_fft // 2 + 1, frames] (Hann window)."""
    return spectrum(wave, n_fft, hop).abs()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over FFT sizes; waves [B, C, T]."""

    def __init__(self, fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128)) -> None:
        super().__init__()
        self.fft_sizes = fft_sizes

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        recon, target = recon.flatten(0, 1).float(), target.flatten(0, 1).float()
        total = recon.new_zeros(())
        for n_fft in self.fft_sizes:
            r, t = magnitude(recon, n_fft, n_fft // 4), magnitude(target, n_fft, n_fft // 4)
            convergence = torch.linalg.norm(t - r) / torch.linalg.norm(t).clamp(min=1e-5)
            log_l1 = F.l1_loss(torch.log(r.clamp(min=1e-5)), torch.log(t.clamp(min=1e-5)))
            total = total + convergence + log_l1
        return total / len(self.fft_sizes)


class MelLoss(nn.Module):
    """L1 between log-mel spectrograms (n_fft 1024, hop 256, 80 mels) of waves [B, C, T]."""

    filters: torch.Tensor

    def __init__(
        self, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 80
    ) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer(
            "filters", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False
        )

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [B, C, T] -> log10 mel [B * C, n_mels, frames]."""
        spec = magnitude(wave.flatten(0, 1).float(), self.n_fft, self.hop)
        return torch.log10((self.filters @ spec).clamp(min=1e-5))

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.log_mel(recon), self.log_mel(target))


class CompressedSpectrumLoss(nn.Module):
    """MSE of power-compressed complex STFTs and of their magnitudes: a phase-aware target.

    |S| ** 0.3 * exp(i angle S) weighs quiet bins up (as speech enhancement losses do), and the
    complex term supervises phase where the magnitude-only losses cannot.
    """

    def __init__(self, fft_sizes: tuple[int, ...] = (1024, 512), power: float = 0.3) -> None:
        super().__init__()
        self.fft_sizes, self.power = fft_sizes, power

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        recon, target = recon.flatten(0, 1).float(), target.flatten(0, 1).float()
        total = recon.new_zeros(())
        for n_fft in self.fft_sizes:
            r, t = (
                compress(spectrum(wave, n_fft, n_fft // 4), self.power, floor=1e-4)
                for wave in (recon, target)
            )
            complex_mse = F.mse_loss(torch.view_as_real(r), torch.view_as_real(t))
            total = total + complex_mse + F.mse_loss(r.abs(), t.abs())
        return total / len(self.fft_sizes)


class AudioLoss(nn.Module):
    """Weighted multi-resolution STFT + mel L1 + waveform L1 (+ compressed complex STFT)."""

    def __init__(
        self,
        sample_rate: int,
        stft: float = 1.0,
        mel: float = 1.0,
        wave_l1: float = 1.0,
        complex_stft: float = 0.0,
    ) -> None:
        super().__init__()
        self.weights = {"stft": stft, "mel": mel, "wave_l1": wave_l1, "complex": complex_stft}
        self.stft = MultiResolutionSTFTLoss()
        self.mel = MelLoss(sample_rate)
        self.complex = CompressedSpectrumLoss()

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        parts = {
            "stft": self.stft(recon, target),
            "mel": self.mel(recon, target),
            "wave_l1": F.l1_loss(recon.float(), target.float()),
        }
        if self.weights["complex"]:
            parts["complex"] = self.complex(recon, target)
        return weighted_sum(parts, self.weights), {k: float(v.detach()) for k, v in parts.items()}
