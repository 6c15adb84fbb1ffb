"""app.quality: the figures ?report=true answers and the playground shows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from app.quality import audio_quality, image_quality


def photo_like(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Smooth RGB levels [H, W, 3] uint8 with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    base = 128 + 60 * np.sin(x / 7.0)[..., None] * np.cos(y / 5.0)[..., None]
    return np.clip(base + rng.normal(0, 8, (*size, 3)), 0, 255).astype(np.uint8)


def speech_like(seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A wave [1, T] float32: harmonics under a syllable-rate envelope, and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.2 * voiced * envelope + noise).astype(np.float32)[None]


def test_psnr_is_20_log10_of_255_over_the_rms_error_of_every_channel() -> None:
    reference = photo_like()
    shifted = reference.astype(np.int16)
    shifted[..., 0] += 3  # 3 levels in one channel of three: MSE 3
    reconstruction = np.clip(shifted, 0, 255).astype(np.uint8)
    mse = np.mean((reference.astype(np.float64) - reconstruction) ** 2)
    assert image_quality(reference, reconstruction)["psnr_db"] == pytest.approx(
        10 * math.log10(255**2 / mse)
    )


def test_identical_images_give_ssim_1_and_a_finite_psnr() -> None:
    reference = photo_like()
    quality = image_quality(reference, reference.copy())
    assert quality["ssim"] == pytest.approx(1.0)
    assert quality["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 1e-12))


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written out window by window: luma, 7 x 7, sample statistics."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = a.astype(np.float64) @ weights, b.astype(np.float64) @ weights
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    indices = []
    for top in range(x.shape[0] - 6):
        for left in range(x.shape[1] - 6):
            u = x[top : top + 7, left : left + 7].ravel()
            v = y[top : top + 7, left : left + 7].ravel()
            cov = np.cov(u, v)  # ddof 1
            mu, mv = u.mean(), v.mean()
            indices.append(
                ((2 * mu * mv + c1) * (2 * cov[0, 1] + c2))
                / ((mu**2 + mv**2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
            )
    return float(np.mean(indices))


def test_ssim_is_the_mean_over_every_7x7_window_of_the_luma() -> None:
    reference, other = photo_like(0, (20, 24)), photo_like(1, (20, 24))
    assert image_quality(reference, other)["ssim"] == pytest.approx(
        reference_ssim(reference, other), rel=1e-9
    )


def test_ssim_falls_as_the_reconstruction_blurs() -> None:
    reference = photo_like()
    padded = np.pad(reference.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sliding_window_view(padded, (3, 3), axis=(0, 1)).mean(axis=(-2, -1))
    noisy = np.clip(reference + np.random.default_rng(2).normal(0, 40, reference.shape), 0, 255)
    mild = image_quality(reference, blurred.astype(np.uint8))["ssim"]
    harsh = image_quality(reference, noisy.astype(np.uint8))["ssim"]
    assert 1.0 > mild > harsh


def test_an_image_smaller_than_the_ssim_window_gives_ssim_1() -> None:
    tiny = photo_like(size=(6, 6))
    assert image_quality(tiny, 255 - tiny)["ssim"] == 1.0


def test_snr_is_the_signal_energy_over_the_error_energy_in_db() -> None:
    reference = speech_like()
    reconstruction = reference * 0.9  # the error is a tenth of the signal: 20 dB
    assert audio_quality(reference, reconstruction, 16000)["snr_db"] == pytest.approx(20.0)


def test_audio_is_compared_over_the_shorter_length_mixed_to_mono() -> None:
    mono = speech_like()
    stereo = np.concatenate([mono * 1.5, mono * 0.5])  # mean: the mono wave
    longer = np.concatenate([mono, np.ones((1, 800), np.float32)], axis=1)
    quality = audio_quality(stereo, longer, 16000)
    assert quality["snr_db"] > 100 and quality["mel_distance"] < 1e-6


def reference_mel_distance(a: np.ndarray, b: np.ndarray, rate: int) -> float:
    """The playground's mel distance written out filter by filter, frame by frame."""
    size, hop, bands = 1024, 256, 80
    mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    top = mel(rate / 2)
    edges = [700 * (10 ** (top * i / (bands + 1) / 2595) - 1) for i in range(bands + 2)]
    bins = [f * size / rate for f in edges]
    filters = []
    for k in range(bands):
        weights = {}
        for column in range(math.floor(bins[k]), min(math.ceil(bins[k + 2]), size // 2) + 1):
            rise = (column - bins[k]) / (bins[k + 1] - bins[k])
            fall = (bins[k + 2] - column) / (bins[k + 2] - bins[k + 1])
            if min(rise, fall) > 0:
                weights[column] = min(rise, fall)
        filters.append(weights)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)
    total, count = 0.0, 0
    for start in range(0, len(a) - size + 1, hop):
        spectra = [np.abs(np.fft.rfft(s[start : start + size] * window)) ** 2 for s in (a, b)]
        for weights in filters:
            levels = [
                math.log10(max(sum(w * p[c] for c, w in weights.items()), 1e-10)) for p in spectra
            ]
            total += abs(levels[0] - levels[1])
            count += 1
    return total / count


def test_mel_distance_is_the_playgrounds_mean_log_mel_difference() -> None:
    reference = speech_like(0.3, 16000)
    noisy = reference + np.random.default_rng(3).normal(0, 0.05, reference.shape)
    expected = reference_mel_distance(reference[0].astype(np.float64), noisy[0], 16000)
    assert audio_quality(reference, noisy, 16000)["mel_distance"] == pytest.approx(
        expected, rel=1e-9
    )


def test_mel_distance_grows_with_the_noise() -> None:
    reference = speech_like()
    rng = np.random.default_rng(4)
    distances = [
        audio_quality(reference, reference + rng.normal(0, level, reference.shape), 16000)
        for level in (0.003, 0.03)
    ]
    assert 0 < distances[0]["mel_distance"] < distances[1]["mel_distance"]
    assert distances[0]["snr_db"] > distances[1]["snr_db"]


def test_audio_shorter_than_one_mel_frame_has_mel_distance_0() -> None:
    reference = speech_like(0.05, 16000)  # 800 samples, under a 1024-point frame
    assert audio_quality(reference, -reference, 16000)["mel_distance"] == 0.0


def test_silence_against_silence_gives_a_finite_snr() -> None:
    silence = np.zeros((1, 16000), np.float32)
    assert audio_quality(silence, silence, 16000)["snr_db"] == pytest.approx(0.0)
