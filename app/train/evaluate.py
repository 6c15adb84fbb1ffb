"""`tokserve eval`: a model on the validation split, beside JPEG/WebP or Opus at its bitrate."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
from pesq import PesqError, pesq
from pystoi import stoi

from app.config import Settings
from app.registry import load_model
from app.tokenizers.audio import RVQAudioCodec
from app.tokenizers.image import FSQImageTokenizer
from app.train.codecs import image_at_bits, opus_at_bitrate
from app.train.data import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    center_square,
    read_segment,
    split_files,
    to_pixels,
    whole_image,
)
from app.train.metrics import SpectralDistances, image_ssim, psnr, si_snr, usage

VAL_FRACTION = 0.1
PESQ_RATE = 16000


def median_ms(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``run()`` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def spread(files: list[Path], limit: int | None) -> list[Path]:
    """At most ``limit`` files taken evenly across the sorted list (sources are name-prefixed)."""
    if limit is None or len(files) <= limit:
        return files
    return [files[i * len(files) // limit] for i in range(limit)]


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric rows (keys missing from a row are averaged over the others)."""
    keys = sorted({k for row in rows for k in row})
    return {k: float(np.mean([row[k] for row in rows if k in row])) for k in keys}


@torch.no_grad()
def evaluate_image(
    model: FSQImageTokenizer, data_dir: Path, limit: int | None = None
) -> dict[str, Any]:
    """PSNR/SSIM/bpp of the tokenizer and of JPEG and WebP at the tokens' bits, codebook usage."""
    files = spread(split_files(data_dir / "images", IMAGE_SUFFIXES, VAL_FRACTION, True), limit)
    side = model.image_size
    vocab = model.quantizer.vocab_size
    dtype = next(model.parameters()).dtype
    rows: dict[str, list[dict[str, float]]] = {"tokenizer": [], "jpeg": [], "webp": []}
    all_tokens, full_size_tokens = [], []
    for path in files:
        whole = to_pixels(whole_image(path, multiple=8))[None].to(dtype)
        full_size_tokens.append(model.encode(whole))
        image = center_square(path, side)
        reference = np.asarray(image)
        tokens = model.encode(to_pixels(image)[None].to(dtype))
        all_tokens.append(tokens)
        recon = model.decode(tokens)[0].float().permute(1, 2, 0).numpy()
        recon_u8 = np.clip(np.round((recon + 1) * 127.5), 0, 255).astype(np.uint8)
        bits = tokens.numel() * math.log2(vocab)
        rows["tokenizer"].append(
            {
                "psnr": psnr(recon_u8, reference),
                "ssim": image_ssim(recon_u8, reference),
                "bpp": bits / (side * side),
            }
        )
        for fmt, key in (("JPEG", "jpeg"), ("WEBP", "webp")):
            decoded, codec_bits, quality = image_at_bits(image, fmt, bits)
            rows[key].append(
                {
                    "psnr": psnr(decoded, reference),
                    "ssim": image_ssim(decoded, reference),
                    "bpp": codec_bits / (side * side),
                    "quality": float(quality),
                }
            )
    return {
        "images": len(files),
        "image_size": side,
        "tokens_per_image": int(all_tokens[0].numel()) if all_tokens else 0,
        "vocab_size": vocab,
        **{key: mean_of(values) for key, values in rows.items()},
        "codebook_usage": usage(torch.cat([t.flatten() for t in all_tokens]), vocab),
        # the same images whole: ~10x the tokens, enough to tell rare codes from dead ones
        "codebook_usage_full_size": usage(
            torch.cat([t.flatten() for t in full_size_tokens]), vocab
        ),
        "encode_decode_ms": median_ms(
            lambda: model.decode(model.encode(torch.zeros(1, 3, side, side, dtype=dtype)))
        ),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def validation_clips(
    data_dir: Path, sample_rate: int, limit: int | None, clip_s: float = 10.0
) -> dict[str, list[np.ndarray]]:
    """Validation audio: whole speech clips, and up to three ``clip_s`` windows per music track."""
    clips: dict[str, list[np.ndarray]] = {}
    speech = split_files(data_dir / "audio" / "speech", AUDIO_SUFFIXES, VAL_FRACTION, True)
    clips["speech"] = [read_segment(p, 0, sf.info(str(p)).frames) for p in spread(speech, limit)]
    music = []
    window = int(clip_s * sample_rate)
    for path in split_files(data_dir / "audio" / "music", AUDIO_SUFFIXES, VAL_FRACTION, True):
        frames = sf.info(str(path)).frames
        for fraction in (0.2, 0.5, 0.8):
            start = int(fraction * max(0, frames - window))
            music.append(read_segment(path, start, min(window, frames)))
    clips["music"] = music[:limit] if limit is not None else music
    return clips


def audio_metrics(
    recon: np.ndarray,
    reference: np.ndarray,
    sample_rate: int,
    spectral: SpectralDistances,
    speech: bool,
) -> dict[str, float]:
    """Mel/STFT distance and SI-SNR; PESQ (wide band, 16 kHz) and STOI on speech."""
    row = {**spectral(recon, reference), "si_snr": si_snr(recon, reference)}
    if speech:
        ref16 = soxr.resample(reference, sample_rate, PESQ_RATE)
        deg16 = soxr.resample(recon, sample_rate, PESQ_RATE)
        with contextlib.suppress(PesqError):  # raised for clips where it finds no utterance
            row["pesq_wb"] = float(pesq(PESQ_RATE, ref16, deg16, "wb"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["stoi"] = float(stoi(reference, recon, sample_rate, extended=False))
    return row


@torch.no_grad()
def evaluate_audio(
    model: RVQAudioCodec,
    data_dir: Path,
    limit: int | None = None,
    codebook_counts: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Per group (speech, music) and codebook count (K and K/2 by default): codec and Opus."""
    rate = model.sample_rate
    total = model.quantizer.codebooks
    counts = codebook_counts or tuple(sorted({total, max(1, total // 2)}, reverse=True))
    spectral = SpectralDistances(rate)
    clips = validation_clips(data_dir, rate, limit)
    bits_per_frame = math.log2(model.quantizer.codebook_size)
    frame_rate = rate / model.hop_length
    report: dict[str, Any] = {
        "sample_rate": rate,
        "frame_rate": frame_rate,
        "vocab_size": model.quantizer.codebook_size,
        "clips": {group: len(items) for group, items in clips.items()},
        "seconds": {group: sum(len(c) for c in items) / rate for group, items in clips.items()},
    }
    dtype = next(model.parameters()).dtype
    all_codes = []
    for n_q in counts:
        bitrate = n_q * bits_per_frame * frame_rate
        section: dict[str, Any] = {"bitrate": bitrate}
        for group, items in clips.items():
            codec_rows, opus_rows = [], []
            for reference in items:
                wave = torch.from_numpy(reference)[None, None].to(dtype)
                lengths = torch.tensor([reference.shape[0]])
                codes, frames = model.encode(wave, lengths, n_q)
                if n_q == max(counts):
                    all_codes.append(codes[0])
                recon = model.decode(codes, frames)[0][0, 0, : reference.shape[0]].float().numpy()
                codec_rows.append(
                    audio_metrics(recon, reference, rate, spectral, group == "speech")
                )
                opus, opus_bps = opus_at_bitrate(reference, rate, bitrate)
                opus_rows.append(
                    {
                        **audio_metrics(opus, reference, rate, spectral, group == "speech"),
                        "bitrate": opus_bps,
                    }
                )
            section[group] = {"codec": mean_of(codec_rows), "opus": mean_of(opus_rows)}
        report[f"codebooks_{n_q}"] = section
    codes_all = torch.cat(all_codes, dim=1) if all_codes else torch.zeros(0, 0, dtype=torch.long)
    report["codebook_usage"] = [
        usage(codes_all[k], model.quantizer.codebook_size) for k in range(codes_all.shape[0])
    ]
    ten_s = torch.zeros(1, model.channels, 10 * rate, dtype=dtype)
    lengths = torch.tensor([10 * rate])
    report["encode_decode_10s_ms"] = median_ms(
        lambda: model.decode(*model.encode(ten_s, lengths)), repeats=3
    )
    report["dtype"] = str(dtype).removeprefix("torch.")
    report["threads"] = torch.get_num_threads()
    return report


def evaluate_model(model_dir: Path, data_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Load a model folder as the server runs it on CPU and evaluate it on its modality's
    validation split."""
    loaded = load_model(model_dir, Settings(device="cpu"))
    model, architecture = loaded.tokenizer, loaded.config.get("architecture")
    if not isinstance(model, FSQImageTokenizer | RVQAudioCodec):
        raise ValueError(f"{model_dir}: no evaluation for architecture {architecture!r}")
    report: dict[str, Any] = {
        "model": loaded.name,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if isinstance(model, FSQImageTokenizer):
        return {**report, **evaluate_image(model, data_dir, limit)}
    return {**report, **evaluate_audio(model, data_dir, limit)}
