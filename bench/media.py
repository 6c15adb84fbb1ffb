"""Benchmark inputs: real photos and recordings cut to the model's size, and cache-busting copies.

A cache-busting copy carries a per-request nonce in a part of the file every decoder skips (a
JPEG comment, a PNG tEXt chunk, a WAV JUNK chunk): the server decodes the same pixels or samples
and does the same work, but the cache key (a hash of the raw bytes) is new.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
AUDIO_SUFFIXES = {".ogg", ".wav", ".flac"}
JPEG_QUALITY = 90


def photos(data_dir: Path, size: tuple[int, int], count: int) -> list[Image.Image]:
    """Up to ``count`` RGB photos from data_dir/images, centre-cropped to size (H, W)."""
    paths = sorted(p for p in (data_dir / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({sorted(IMAGE_SUFFIXES)}) in {data_dir / 'images'}")
    height, width = size
    fitted = []
    for path in paths[:count]:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        fitted.append(ImageOps.fit(rgb, (width, height), Image.Resampling.LANCZOS))
    return fitted


def image_file(image: Image.Image, fmt: str) -> bytes:
    """The image as JPEG (quality 90) or PNG bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def audio_clips(
    data_dir: Path, sample_rate: int, channels: int, seconds: float, count: int
) -> list[np.ndarray]:
    """``count`` distinct clips [T, C] float32 at sample_rate, cut from the longest recordings.

    Clips are taken from evenly spaced offsets of each recording, longest recordings first,
    until there are enough, or fewer where the recordings hold no more; recordings shorter than
    a clip are skipped.
    """
    paths = sorted(
        (p for p in (data_dir / "audio").rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES),
        key=lambda p: (-p.stat().st_size, p.name),
    )
    per_file, fewer = 1, -1
    while True:
        clips = []
        for path in paths:
            clips += _cut(path, sample_rate, channels, seconds, per_file)
            if len(clips) >= count:
                return clips[:count]
        if not clips:
            raise FileNotFoundError(f"no recording of at least {seconds} s in {data_dir / 'audio'}")
        if len(clips) == fewer:  # every recording is cut into as many clips as it holds
            return clips
        per_file, fewer = per_file * 2, len(clips)


def _cut(
    path: Path, sample_rate: int, channels: int, seconds: float, pieces: int
) -> list[np.ndarray]:
    """Up to ``pieces`` clips of one recording at evenly spaced offsets, resampled and mixed."""
    with sf.SoundFile(path) as sound:
        clip_frames = round(seconds * sound.samplerate)
        pieces = min(pieces, sound.frames // max(clip_frames, 1))
        clips = []
        for piece in range(pieces):
            sound.seek((sound.frames - pieces * clip_frames) // 2 + piece * clip_frames)
            samples = sound.read(clip_frames, dtype="float32", always_2d=True)
            if sound.samplerate != sample_rate:
                samples = soxr.resample(samples, sound.samplerate, sample_rate, quality="HQ")
            mono = samples.mean(axis=1, keepdims=True)
            clips.append(np.ascontiguousarray(np.repeat(mono, channels, axis=1), dtype=np.float32))
    return clips


def wav_file(samples: np.ndarray, sample_rate: int) -> bytes:
    """Samples [T, C] as 16-bit PCM WAV bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def unique_copy(blob: bytes, nonce: int) -> bytes:
    """The same JPEG, PNG or WAV with ``nonce`` in a chunk decoders skip: new bytes, same media."""
    payload = f"tokserve-bench {nonce}".encode()
    if blob[:2] == b"\xff\xd8":  # JPEG: a COM segment right after SOI
        return blob[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + blob[2:]
    if blob[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: a tEXt chunk right after IHDR (8 + 25 bytes)
        text = b"tEXt" + b"Comment\x00" + payload
        chunk = struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text))
        return blob[:33] + chunk + blob[33:]
    if blob[:4] == b"RIFF" and blob[8:12] == b"WAVE":  # WAV: a JUNK chunk at the end
        payload += b"\x00" * (len(payload) % 2)
        body = blob[8:] + b"JUNK" + struct.pack("<I", len(payload)) + payload
        return b"RIFF" + struct.pack("<I", len(body)) + body
    raise ValueError("unique_copy takes JPEG, PNG or WAV bytes")
