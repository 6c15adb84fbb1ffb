"""How close a reconstruction is to what the model was given: the figures ``?report=true`` adds
to an encode answer, and the playground shows.

Images: PSNR over the RGB levels and SSIM of the luma; audio: SNR and a log-mel distance. Each
compares the reconstruction with the preprocessed input (cropped or padded and resized; mixed
and resampled), so only the tokenizer's loss counts, not the resizing's.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_LUMA = np.array([0.299, 0.587, 0.114])
_SSIM_WINDOW = 7  # scikit-image's default
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
# floors under an error or a band's energy: identical inputs give a finite figure
_TINY_ENERGY = 1e-12
_TINY_BAND = 1e-10
_MEL_FFT = 1024
_MEL_HOP = 256
_MEL_BANDS = 80


def image_quality(reference: np.ndarray, reconstruction: np.ndarray) -> dict[str, float]:
    """PSNR in dB over the 0..255 levels of every channel, and the mean SSIM of the luma over
    every 7 x 7 window, of two RGB images [H, W, 3] of one size."""
    reference = reference.astype(np.float64)
    reconstruction = reconstruction.astype(np.float64)
    mse = float(np.mean((reference - reconstruction) ** 2))
    return {
        "psnr_db": 10 * math.log10(255**2 / max(mse, _TINY_ENERGY)),
        "ssim": _ssim(reference @ _LUMA, reconstruction @ _LUMA),
    }


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two greyscale images [H, W] in 0..255 over every 7 x 7 window (sample
    variances); 1.0 for an image smaller than a window, which has none."""
    if min(x.shape) < _SSIM_WINDOW:
        return 1.0
    shape = (_SSIM_WINDOW, _SSIM_WINDOW)
    xs, ys = sliding_window_view(x, shape), sliding_window_view(y, shape)
    mean_x, mean_y = xs.mean(axis=(2, 3)), ys.mean(axis=(2, 3))
    var_x, var_y = xs.var(axis=(2, 3), ddof=1), ys.var(axis=(2, 3), ddof=1)
    n = _SSIM_WINDOW * _SSIM_WINDOW
    centred = (xs - mean_x[..., None, None]) * (ys - mean_y[..., None, None])
    covariance = centred.sum(axis=(2, 3)) / (n - 1)
    index = ((2 * mean_x * mean_y + _SSIM_C1) * (2 * covariance + _SSIM_C2)) / (
        (mean_x**2 + mean_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    )
    return float(index.mean())


def audio_quality(
    reference: np.ndarray, reconstruction: np.ndarray, sample_rate: int
) -> dict[str, float]:
    """SNR in dB and the mean |log10 mel| distance (80 bands, 1024-point Hann frames every 256
    samples) of two waves [C, T] at sample_rate Hz, each mixed to mono, over their common
    length."""
    length = min(reference.shape[-1], reconstruction.shape[-1])
    a = reference.astype(np.float64).mean(axis=0)[:length]
    b = reconstruction.astype(np.float64).mean(axis=0)[:length]
    signal, noise = float(np.sum(a**2)), float(np.sum((a - b) ** 2))
    return {
        "snr_db": 10 * math.log10(max(signal, _TINY_ENERGY) / max(noise, _TINY_ENERGY)),
        "mel_distance": _mel_distance(a, b, sample_rate),
    }


def _mel_distance(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    """Mean |log10 mel(a) - log10 mel(b)| over every whole frame; 0.0 when there is none."""
    if len(a) < _MEL_FFT:
        return 0.0
    window, filters = _mel_frames(sample_rate)

    def log_mel(signal: np.ndarray) -> np.ndarray:
        frames = sliding_window_view(signal, _MEL_FFT)[::_MEL_HOP] * window
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        return np.log10(np.maximum(power @ filters.T, _TINY_BAND))

    return float(np.mean(np.abs(log_mel(a) - log_mel(b))))


@cache
def _mel_frames(sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The periodic Hann window [1024] and the triangular mel filters [80, 513], spaced evenly
    on the mel scale from 0 Hz to half the rate."""
    top = 2595 * math.log10(1 + sample_rate / 2 / 700)
    edges = [700 * (10 ** (top * i / (_MEL_BANDS + 1) / 2595) - 1) for i in range(_MEL_BANDS + 2)]
    bins = np.array(edges) * _MEL_FFT / sample_rate
    columns = np.arange(_MEL_FFT // 2 + 1)
    rise = (columns - bins[:-2, None]) / (bins[1:-1, None] - bins[:-2, None])
    fall = (bins[2:, None] - columns) / (bins[2:, None] - bins[1:-1, None])
    filters = np.maximum(0.0, np.minimum(rise, fall))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_MEL_FFT) / _MEL_FFT)
    return window, filters
