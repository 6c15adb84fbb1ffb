"""Classic codecs at a matched bitrate: Pillow JPEG/WebP by file size, Opus through libsndfile."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import soundfile as sf
from PIL import Image


def image_bytes(image: Image.Image, fmt: str, quality: int) -> bytes:
    """The image encoded as JPEG (optimized Huffman tables) or WebP (method 6)."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=6)
    return buffer.getvalue()


def largest_within(size_of: Callable[[int], int], budget: int, low: int, high: int) -> int:
    """Binary search: the highest setting in [low, high] whose size fits ``budget`` (else low)."""
    best = low
    while low <= high:
        mid = (low + high) // 2
        if size_of(mid) <= budget:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def image_at_bits(image: Image.Image, fmt: str, bits: float) -> tuple[np.ndarray, float, int]:
    """Highest quality whose file fits ``bits`` -> (decoded uint8 [H, W, 3], bits, quality)."""
    budget = int(bits // 8)
    lowest = 1 if fmt == "JPEG" else 0  # Pillow: JPEG quality 1..100, WebP 0..100
    quality = largest_within(lambda q: len(image_bytes(image, fmt, q)), budget, lowest, 100)
    encoded = image_bytes(image, fmt, quality)
    with Image.open(io.BytesIO(encoded)) as decoded:
        pixels = np.asarray(decoded.convert("RGB"))
    return pixels, len(encoded) * 8.0, quality


def opus_bytes(wave: np.ndarray, sample_rate: int, level: float) -> bytes:
    """Ogg/Opus of a mono wave [T]; libsndfile maps compression level 0..1 to ~256..6 kbit/s."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="OGG", subtype="OPUS", compression_level=level)
    return buffer.getvalue()


def opus_at_bitrate(wave: np.ndarray, sample_rate: int, bitrate: float) -> tuple[np.ndarray, float]:
    """Opus at the lowest compression level whose payload bitrate is <= ``bitrate`` (bits/s).

    The Ogg headers (~0.9 kB, the same for every clip) are left out of the measured bitrate so
    that short clips are not penalised; 6 kbit/s is the floor libsndfile reaches (level 1.0),
    so a lower target gets the floor from one encode instead of a search.
    Returns (decoded wave [T], payload bits per second).
    """
    seconds = len(wave) / sample_rate
    header = len(opus_bytes(np.zeros(1, dtype=np.float32), sample_rate, 1.0))

    def payload_bps(encoded: bytes) -> float:
        return (len(encoded) - header) * 8 / seconds

    encoded = opus_bytes(wave, sample_rate, 1.0)
    if payload_bps(encoded) <= bitrate:  # the floor fits: search the lowest level that does
        low, high = 0.0, 1.0
        for _ in range(12):
            mid = (low + high) / 2
            if payload_bps(opus_bytes(wave, sample_rate, mid)) <= bitrate:
                high = mid
            else:
                low = mid
        encoded = opus_bytes(wave, sample_rate, high)
    decoded, _ = sf.read(io.BytesIO(encoded), dtype="float32")
    decoded = decoded[: len(wave)]
    if len(decoded) < len(wave):
        decoded = np.pad(decoded, (0, len(wave) - len(decoded)))
    return decoded, payload_bps(encoded)
