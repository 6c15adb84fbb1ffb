"""Training media from the shared data folder: a deterministic split and random crops/segments.

Everything runs in the training process (no worker processes): images are decoded once and kept
downscaled in memory; audio segments are read straight from the Ogg files by seeking. The items
of a batch are made by a thread pool (Pillow and libsndfile release the GIL), each from its own
seed drawn in order from the run's generator, so batches do not depend on the number of threads.
"""

from __future__ import annotations

import hashlib
import os
import random
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
AUDIO_SUFFIXES = {".ogg", ".wav", ".flac", ".opus"}


def name_hash(path: Path) -> int:
    """A stable 64-bit hash of the file name (not the path, so the split survives moves)."""
    return int.from_bytes(hashlib.blake2b(path.name.encode(), digest_size=8).digest(), "big")


def split_files(
    folder: Path, suffixes: set[str], val_fraction: float, validation: bool
) -> list[Path]:
    """Sorted files under folder (recursively) of the train or validation split.

    The validation part is the ``round(fraction * n)`` files (at least one) with the smallest
    name hashes: deterministic, and never empty for a folder of a few long files (music).
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    count = max(1, round(val_fraction * len(files))) if files and val_fraction > 0 else 0
    held_out = set(sorted(files, key=name_hash)[:count])
    return [p for p in files if (p in held_out) == validation]


def resize_short(image: Image.Image, short_side: int) -> Image.Image:
    """Resize (Lanczos) so that the shorter side is ``short_side`` pixels."""
    scale = short_side / min(image.size)
    size = (
        max(short_side, round(image.width * scale)),
        max(short_side, round(image.height * scale)),
    )
    return image.resize(size, Image.Resampling.LANCZOS)


def load_rgb(path: Path, short_side: int) -> Image.Image:
    """An RGB image from disk with its shorter side resized to ``short_side`` pixels."""
    with Image.open(path) as image:
        return resize_short(image.convert("RGB"), short_side)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> pixels [3, H, W] float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def center_square(path: Path, side: int) -> Image.Image:
    """The central side x side square of an image whose shorter side was resized to ``side``."""
    image = load_rgb(path, side)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def whole_image(path: Path, multiple: int) -> Image.Image:
    """An RGB image at its own size, centre-cropped to sides divisible by ``multiple``."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.width - rgb.width % multiple, rgb.height - rgb.height % multiple
    left, top = (rgb.width - width) // 2, (rgb.height - height) // 2
    return rgb.crop((left, top, left + width, top + height))


def default_workers() -> int:
    """Threads that make batch items: the machine's cores, at most 16."""
    return min(16, os.cpu_count() or 1)


class RandomBatches(ABC):
    """Batches of random items made in parallel; subclasses say how one item is made."""

    def __init__(self, rng: random.Random, workers: int | None = None) -> None:
        self.rng = rng
        self.pool = ThreadPoolExecutor(max_workers=workers or default_workers())

    @abstractmethod
    def sample(self, rng: random.Random) -> torch.Tensor:
        """One item, drawing all its randomness from ``rng``."""

    def batch(self, size: int) -> torch.Tensor:
        """``size`` items stacked; the same for any number of workers."""
        seeds = [self.rng.getrandbits(64) for _ in range(size)]
        return torch.stack(list(self.pool.map(lambda s: self.sample(random.Random(s)), seeds)))


class ImageCrops(RandomBatches):
    """Random crops of training images: random scale (short side in [min, max]), crop, flip."""

    def __init__(
        self,
        files: list[Path],
        crop: int,
        short_side: tuple[int, int],
        rng: random.Random,
        workers: int | None = None,
    ) -> None:
        if not files:
            raise ValueError("no training images found")
        super().__init__(rng, workers)
        self.crop = crop
        self.short_side = short_side
        # Kept at the largest scale; smaller scales are taken by resizing a larger crop window.
        self.images = [load_rgb(p, short_side[1]) for p in files]

    def sample(self, rng: random.Random) -> torch.Tensor:
        """One augmented crop: pixels [3, crop, crop] in [-1, 1]."""
        image = self.images[rng.randrange(len(self.images))]
        scale = rng.uniform(self.short_side[0], self.short_side[1]) / self.short_side[1]
        window = min(round(self.crop / scale), image.width, image.height)
        left = rng.randint(0, image.width - window)
        top = rng.randint(0, image.height - window)
        patch = image.crop((left, top, left + window, top + window))
        if window != self.crop:
            patch = patch.resize((self.crop, self.crop), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_pixels(patch)


def read_segment(path: Path, start: int, frames: int) -> np.ndarray:
    """Mono float32 samples [frames] from ``start`` (zero-padded past the end of the file)."""
    with sf.SoundFile(path) as audio:
        audio.seek(min(start, audio.frames))
        samples = audio.read(frames, dtype="float32", always_2d=True).mean(axis=1)
    if samples.shape[0] < frames:
        samples = np.pad(samples, (0, frames - samples.shape[0]))
    return samples


class AudioSegments(RandomBatches):
    """Random fixed-length segments from groups (speech, music) in given shares, random level."""

    def __init__(
        self,
        groups: list[list[Path]],
        sample_rate: int,
        segment_s: float,
        rng: random.Random,
        peak_db: tuple[float, float] = (-18.0, 0.0),
        weights: list[float] | None = None,
        workers: int | None = None,
    ) -> None:
        weights = weights or [1.0] * len(groups)
        if len(weights) != len(groups):
            raise ValueError(f"{len(weights)} group weights for {len(groups)} groups")
        kept = [(g, w) for g, w in zip(groups, weights, strict=True) if g]
        if not kept:
            raise ValueError("no training audio found")
        super().__init__(rng, workers)
        self.groups = [g for g, _ in kept]
        self.weights = [w for _, w in kept]
        self.sample_rate = sample_rate
        self.frames = round(segment_s * sample_rate)
        self.peak_db = peak_db
        self.lengths: dict[Path, int] = {}
        for path in (p for g in self.groups for p in g):
            info = sf.info(str(path))
            if info.samplerate != sample_rate:
                raise ValueError(f"{path} is at {info.samplerate} Hz, not {sample_rate} Hz")
            self.lengths[path] = info.frames

    def pick(self, rng: random.Random) -> tuple[Path, int]:
        """Where a segment starts: a group by weight, a file in it, a start frame."""
        group = rng.choices(self.groups, weights=self.weights)[0]
        path = group[rng.randrange(len(group))]
        return path, rng.randint(0, max(0, self.lengths[path] - self.frames))

    def sample(self, rng: random.Random) -> torch.Tensor:
        """One segment: wave [1, frames] with its peak set to a random level in ``peak_db``."""
        for _ in range(10):
            path, start = self.pick(rng)
            samples = read_segment(path, start, self.frames)
            peak = float(np.abs(samples).max())
            if peak > 1e-3:  # skip silent stretches: nothing to learn there
                break
        samples = samples * (10 ** (rng.uniform(*self.peak_db) / 20) / max(peak, 1e-3))
        if rng.random() < 0.5:
            samples = -samples
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).unsqueeze(0)
