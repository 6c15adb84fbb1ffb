"""Single-item latency: one 256x256 image, or 10 s of audio, encoded and decoded in-process.

Each model is timed as the server loads it (its config's dtype, resolved for this device) and
in float32, in interleaved rounds, so that a machine whose speed drifts from minute to minute
slows every variant alike. The targets on 2 CPU cores: an image under 100 ms, 10 s of audio
under 500 ms.

    python -m bench.latency [--models image-fsq-256 audio-rvq-24k] [--rounds 5] [--repeats 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from app.config import Settings
from app.registry import LoadedModel, load_model
from app.tokenizers.base import AudioTokenizer, ImageInfo, ImageTokenizer
from app.train.evaluate import median_ms

REPO_ROOT = Path(__file__).resolve().parent.parent
AUDIO_SECONDS = 10
TARGET_MS = {"image": 100.0, "audio": 500.0}


def round_trip(model: LoadedModel) -> Callable[[], object]:
    """A call that encodes and decodes one item of the model's own size, in its dtype."""
    info = model.info
    seeded = torch.Generator().manual_seed(0)
    if isinstance(info, ImageInfo):
        image = cast(ImageTokenizer, model.tokenizer)
        pixels = torch.rand(1, 3, *info.image_size, generator=seeded) * 2 - 1
        pixels = pixels.to(model.device, model.dtype)
        return lambda: image.decode(image.encode(pixels))
    audio = cast(AudioTokenizer, model.tokenizer)
    samples = AUDIO_SECONDS * info.sample_rate
    wave = 0.1 * torch.randn(1, info.channels, samples, generator=seeded)
    wave = wave.to(model.device, model.dtype)
    lengths = torch.tensor([samples], device=model.device)
    return lambda: audio.decode(*audio.encode(wave, lengths))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Per model and dtype: the median of each round, their median, and the target."""
    if args.threads:
        torch.set_num_threads(args.threads)
    variants: dict[str, tuple[LoadedModel, Callable[[], object]]] = {}
    for name in args.models:
        for label, settings in (
            ("served", Settings(device=args.device)),
            ("float32", Settings(device=args.device, dtype="float32")),
        ):
            model = load_model(args.model_dir / name, settings)
            variants[f"{name} {label}"] = (model, round_trip(model))
    rounds: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, (_, run) in variants.items():
            with torch.inference_mode():
                rounds[key].append(median_ms(run, args.repeats))
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "models": {}}
    for key, (model, _) in variants.items():
        modality = model.modality
        median = statistics.median(rounds[key])
        results["models"][key] = {
            "model": model.name,
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device),
            "item": "10 s of audio" if modality == "audio" else "one image",
            "median_ms": round(median, 2),
            "round_medians_ms": [round(value, 2) for value in rounds[key]],
            "target_ms": TARGET_MS[modality],
            "met": median < TARGET_MS[modality],
        }
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["image-fsq-256", "audio-rvq-24k"])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--device", default="cpu", help="TOKSERVE_DEVICE: cpu, cuda, auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the results JSON on stdout."""
    sys.stdout.write(json.dumps(measure(parse_args(argv)), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
