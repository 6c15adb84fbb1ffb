"""Quality and codebook-usage figures shared by the image and audio evaluations."""

from __future__ import annotations

import math

import numpy as np
import torch
from pytorch_msssim import ssim

from app.tokenizers.wave_losses import MelLoss, MultiResolutionSTFTLoss


def psnr(recon: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 images [H, W, 3]."""
    mse = float(np.mean((recon.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def image_ssim(recon: np.ndarray, reference: np.ndarray) -> float:
    """SSIM (Gaussian window 11, on RGB, averaged over channels) of uint8 images [H, W, 3]."""

    def to_tensor(image: np.ndarray) -> torch.Tensor:
        return torch.tensor(image).permute(2, 0, 1)[None].float() / 255

    return float(ssim(to_tensor(recon), to_tensor(reference), data_range=1.0))


def usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Codebook usage of token ids (any shape): codes used, fractions, perplexity.

    A small sample cannot use every code: ``used_of_possible`` divides by min(vocab, tokens).
    """
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size).double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    probs = counts[counts > 0] / total
    perplexity = float(torch.exp(-(probs * probs.log()).sum()))
    return {
        "tokens": int(total),
        "codes_used": used,
        "used_fraction": used / vocab_size,
        "used_of_possible": used / min(vocab_size, int(total)),
        "perplexity": perplexity,
        "perplexity_fraction": perplexity / vocab_size,
    }


def si_snr(recon: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SNR in dB of mono waves [T]."""
    reference = reference - reference.mean()
    recon = recon - recon.mean()
    scale = float(np.dot(recon, reference)) / max(float(np.dot(reference, reference)), 1e-12)
    target = scale * reference
    noise = recon - target
    return 10 * math.log10(
        max(float(np.dot(target, target)), 1e-12) / max(float(np.dot(noise, noise)), 1e-12)
    )


class SpectralDistances:
    """Mel distance (L1 of log10 mel) and multi-resolution STFT distance of mono waves [T]."""

    def __init__(self, sample_rate: int) -> None:
        self.mel = MelLoss(sample_rate)
        self.stft = MultiResolutionSTFTLoss()

    @torch.no_grad()
    def __call__(self, recon: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        r = torch.from_numpy(np.ascontiguousarray(recon, dtype=np.float32))[None, None]
        t = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))[None, None]
        return {"mel_distance": float(self.mel(r, t)), "stft_distance": float(self.stft(r, t))}
