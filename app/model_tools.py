"""``tokserve models add``: put a downloaded or exported tokenizer into the model repository.

The model is loaded once with the same builders the server uses, an encode -> decode round trip
on a synthetic input must succeed, and only then are ``models/NAME/config.json`` and a model
card (README.md) written. The weights stay where they are: config.json points at them with
``source``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import date
from pathlib import Path
from typing import Any, cast

import torch

from app.model_folder import CONFIG_FILE, DTYPES, ModelLoadError
from app.registry import build_backend
from app.tokenizers.adapters import fit_length
from app.tokenizers.base import (
    AudioInfo,
    AudioTokenizer,
    ImageInfo,
    ImageTokenizer,
    Tokenizer,
    TokenizerInfo,
)
from app.tokenizers.exported import Program, load_program
from app.tokenizers.hf import supported_classes
from app.tokenizers.plugins import backend_names, default_config, find_backend

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# the round-trip report of a model without a decoder: what was checked
ENCODE_ONLY = "encode-only (no decoder): token shape and ids ok"
PROGRAM_PAIRS = [("encoder.pt2", "decoder.pt2"), ("encoder.jit", "decoder.jit")]


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``models add`` on a ``tokserve`` parser's subparsers."""
    models = subparsers.add_parser("models", help="manage the model repository")
    actions = models.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add",
        help="add a transformers checkpoint folder or an exported encoder/decoder pair",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("name", help="model name: lower case, digits, '.', '_' or '-'")
    add.add_argument("--from", dest="source", type=Path, required=True, help="the local folder")
    add.add_argument(
        "--backend",
        choices=backend_names(),
        help="default: guessed from the folder (transformers or exported); an installed plugin "
        "backend by name",
    )
    add.add_argument(
        "--class", dest="class_name", help="transformers class; default: the checkpoint's own"
    )
    add.add_argument("--out", type=Path, default=Path("models"), help="model repository folder")
    add.add_argument("--force", action="store_true", help="replace an existing config.json")
    add.add_argument("--bandwidth", type=float, help="EnCodec/X-codec: kbps (default: highest)")
    add.add_argument("--codebooks", type=int, help="DAC/Mimi: codebooks kept (default: all)")
    add.add_argument("--image-size", type=int, help="side in pixels (Emu3; exported images)")
    add.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=option_pair,
        help="a plugin backend's option (VALUE read as JSON, else as text); repeatable",
    )
    exported = add.add_argument_group("exported programs (the calling conventions)")
    exported.add_argument("--modality", choices=["image", "audio"])
    exported.add_argument("--encoder", help="encoder file in the folder (.pt2 or .jit)")
    exported.add_argument("--decoder", help="decoder file in the folder (.pt2 or .jit)")
    exported.add_argument("--vocab-size", type=int, help="token ids per codebook")
    exported.add_argument("--sample-rate", type=int)
    exported.add_argument("--channels", type=int, default=1)
    exported.add_argument("--hop-length", type=int, help="samples per frame")
    exported.add_argument(
        "--lengths",
        action="store_true",
        help="encoder(wave, lengths) and decoder(tokens, frames) mask padding themselves",
    )
    exported.add_argument("--causal", action="store_true", help="frames never see later samples")
    exported.add_argument("--dtype", default="float32", help="the dtype the programs take")
    add.set_defaults(handler=run_add)


def run_add(args: argparse.Namespace) -> int:
    """Load, check, write; a model that cannot be served is one line on stderr and exit 2."""
    try:
        folder, tokenizer, report = add_model(args)
    except (ModelLoadError, ValueError) as exc:
        print(f"tokserve models add: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder / CONFIG_FILE}: {summary(tokenizer.info)}; round trip {report}")
    return 0


def add_model(args: argparse.Namespace) -> tuple[Path, Tokenizer, str]:
    """Build the config, load the model with it, check a round trip, write config.json."""
    if not NAME_PATTERN.match(args.name):
        raise ValueError(f"name {args.name!r}: use lower case letters, digits, '.', '_', '-'")
    source = args.source.expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"--from {source} is not a folder; download or export the model first")
    folder = args.out / args.name
    if (folder / CONFIG_FILE).exists() and not args.force:
        raise ValueError(f"{folder / CONFIG_FILE} exists; pass --force to replace it")
    backend = args.backend or guess_backend(source)
    if backend == "transformers":
        config = transformers_config(args, source)
    elif backend == "exported":
        config = exported_config(args, source)
    else:
        config = plugin_config(args, source, backend)
    tokenizer = build(folder, config)
    report = round_trip(tokenizer)
    config["modality"] = tokenizer.info.modality
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(args.name, config, tokenizer.info, report))
    return folder, tokenizer, report


def option_pair(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of --option: VALUE as JSON when it parses (numbers, lists), else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, not {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def plugin_config(args: argparse.Namespace, source: Path, backend: str) -> dict[str, Any]:
    """config.json for an installed plugin backend: its own ``configure``, or the default
    (the source folder and the --option values)."""
    plugin = find_backend(backend)
    configure = plugin.configure or default_config
    return {"name": args.name, "backend": backend, **configure(source, dict(args.option))}


def model_card(name: str, config: dict[str, Any], info: TokenizerInfo, report: str) -> str:
    """README.md for an added model: where it comes from, its tokens, the round-trip check."""
    if "class" in config:
        kind = config["class"]
    elif "program" in config:
        kind = ", ".join(str(config["program"][part]) for part in ("encoder", "decoder"))
    else:
        kind = find_backend(config["backend"]).summary or config["backend"]
    weights = "the model folder's own"
    if "source" in config:
        weights = f"`{config['source']}` (not copied; config.json points at them)"
    rows = [
        ("backend", f"{config['backend']} (`{kind}`)"),
        ("weights", weights),
        ("tokens", summary(info)),
        ("bit rate", bit_rate(info)),
        ("round trip on a synthetic input", report),
        ("options", f"`{json.dumps(config.get('options', {}))}`"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"# {name}\n\nAdded with `tokserve models add` on {date.today().isoformat()}.\n\n"
        f"| | |\n|---|---|\n{table}\n\nLicence, training data and measured quality are the "
        "checkpoint's own: see its original model card.\n"
    )


def bit_rate(info: TokenizerInfo) -> str:
    """What the tokens cost: kbit/s for audio, bits per pixel for images."""
    bits = math.log2(info.vocab_size)
    if isinstance(info, AudioInfo):
        return f"{bits * info.rows() * info.frame_rate / 1000:g} kbit/s"
    height, width = info.image_size
    return f"{bits * info.codebooks * math.prod(info.grid) / (height * width):.3g} bits per pixel"


def guess_backend(source: Path) -> str:
    """An exported pair if the folder holds one, else a transformers checkpoint."""
    has_pair = any((source / enc).is_file() for enc, _ in PROGRAM_PAIRS)
    return "exported" if has_pair else "transformers"


def build(folder: Path, config: dict[str, Any]) -> Tokenizer:
    """The model on the CPU in float32, through the registry's builder, as the server loads it."""
    return build_backend(folder, config, config["backend"], torch.device("cpu"), torch.float32)


def transformers_config(args: argparse.Namespace, source: Path) -> dict[str, Any]:
    """config.json for a save_pretrained folder; the class defaults to the checkpoint's own."""
    try:
        checkpoint = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source} has no readable config.json: {exc}") from exc
    class_name = args.class_name
    if class_name is None:
        known = [c for c in checkpoint.get("architectures", []) if c in supported_classes()]
        if not known:
            raise ValueError(
                f"{source} holds {checkpoint.get('architectures')}; pass --class, one of "
                f"{supported_classes()}"
            )
        class_name = known[0]
    options: dict[str, Any] = {}
    if args.bandwidth is not None:
        options["bandwidth"] = args.bandwidth
    if args.codebooks is not None:
        options["codebooks"] = args.codebooks
    if args.image_size is not None:
        options["image_size"] = args.image_size
    pixels = processor_pixels(source)
    if pixels and class_name.endswith("VQVAE"):
        options["pixels"] = pixels
    return {
        "name": args.name,
        "backend": "transformers",
        "class": class_name,
        "source": str(source),
        "options": options,
    }


def processor_pixels(source: Path) -> dict[str, Any]:
    """The pixel range of the folder's preprocessor_config.json, if it has one."""
    try:
        processor = json.loads((source / "preprocessor_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    pixels: dict[str, Any] = {}
    if processor.get("do_rescale", True) and "rescale_factor" in processor:
        pixels["rescale"] = processor["rescale_factor"]
    if processor.get("do_normalize", True) and "image_mean" in processor:
        pixels["mean"] = processor["image_mean"]
        pixels["std"] = processor.get("image_std", 1.0)
    return pixels


def exported_config(args: argparse.Namespace, source: Path) -> dict[str, Any]:
    """config.json for an encoder/decoder pair; shapes the flags leave out are measured."""
    encoder, decoder = args.encoder, args.decoder
    if encoder is None or decoder is None:
        pairs = [pair for pair in PROGRAM_PAIRS if (source / pair[0]).is_file()]
        if not pairs:
            raise ValueError(f"{source} has no encoder.pt2 or encoder.jit; pass --encoder")
        encoder, decoder = encoder or pairs[0][0], decoder or pairs[0][1]
    if args.modality is None or args.vocab_size is None:
        raise ValueError("an exported pair needs --modality and --vocab-size")
    program: dict[str, Any] = {
        "encoder": encoder,
        "decoder": decoder,
        "vocab_size": args.vocab_size,
        "dtype": args.dtype,
    }
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    try:
        program.update(measure(load_program(source / encoder, torch.device("cpu")), args))
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"cannot run {source / encoder}: {exc}") from exc
    return {
        "name": args.name,
        "backend": "exported",
        "modality": args.modality,
        "source": str(source),
        "program": program,
    }


@torch.inference_mode()
def measure(encoder: Program, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of an exported encoder the flags do not give, from one call on zeros."""
    dtype = DTYPES[args.dtype]
    if args.modality == "image":
        if args.image_size is None:
            raise ValueError("an exported image pair needs --image-size")
        output = encoder(torch.zeros(1, 3, args.image_size, args.image_size, dtype=dtype))
        tokens = output[0] if isinstance(output, tuple | list) else output
        rows = tokens.shape[1] if tokens.dim() == 3 else math.isqrt(tokens[0].numel())
        return {"image_size": args.image_size, "downsample": args.image_size // rows}
    if args.sample_rate is None or args.hop_length is None:
        raise ValueError("an exported audio pair needs --sample-rate and --hop-length")
    wave = torch.zeros(1, args.channels, 4 * args.hop_length, dtype=dtype)
    output = encoder(wave, torch.tensor([wave.shape[-1]])) if args.lengths else encoder(wave)
    tokens = output[0] if isinstance(output, tuple | list) else output
    return {
        "sample_rate": args.sample_rate,
        "channels": args.channels,
        "hop_length": args.hop_length,
        "codebooks": int(tokens.shape[1]),
        "lengths": args.lengths,
        "causal": args.causal,
    }


@torch.inference_mode()
def round_trip(tokenizer: Tokenizer) -> str:
    """Encode and decode a synthetic input; check every shape and id, report the fidelity (an
    encode-only model: the encode alone)."""
    info = tokenizer.info
    if isinstance(info, ImageInfo):
        image = cast(ImageTokenizer, tokenizer)
        height, width = info.image_size
        ys = torch.linspace(-1, 1, height)[:, None]
        xs = torch.linspace(-1, 1, width)[None, :]
        pixels = torch.stack([xs.expand(height, width), ys.expand(height, width), xs * ys])[None]
        tokens = image.encode(pixels.to(image.device))
        check(tuple(tokens.shape) == (1, *info.grid), f"tokens {tuple(tokens.shape)}")
        check_ids(tokens, info)
        if info.encode_only:
            return ENCODE_ONLY
        decoded = image.decode(tokens).float().cpu()
        check(decoded.shape == pixels.shape, f"decoded pixels {tuple(decoded.shape)}")
        error = (decoded - pixels).pow(2).mean().item()
        return f"ok, PSNR {10 * math.log10(4 / max(error, 1e-12)):.1f} dB"
    audio = cast(AudioTokenizer, tokenizer)
    rate, hop = info.sample_rate, info.hop_length
    time_s = torch.arange(rate // 2) / rate
    chirp = 0.5 * torch.sin(2 * math.pi * (220 + 440 * time_s) * time_s)
    wave = chirp.expand(1, info.channels, len(chirp))
    lengths = torch.tensor([len(chirp)], device=audio.device)
    tokens, frames = audio.encode(wave.to(audio.device), lengths)
    expected = (1, info.rows(), math.ceil(len(chirp) / hop))
    check(tuple(tokens.shape) == expected, f"tokens {tuple(tokens.shape)}, not {expected}")
    check(int(frames[0]) == expected[2], f"{int(frames[0])} frames, not {expected[2]}")
    check_ids(tokens, info)
    if info.encode_only:
        return ENCODE_ONLY
    decoded, samples = audio.decode(tokens, frames)
    check(int(samples[0]) == expected[2] * hop, f"decoded {int(samples[0])} samples")
    restored = fit_length(decoded.float().cpu()[..., : int(samples[0])], len(chirp))
    noise = (restored - wave).pow(2).mean().item()
    return f"ok, SNR {10 * math.log10(wave.pow(2).mean().item() / max(noise, 1e-12)):.1f} dB"


def check(condition: bool, what: str) -> None:
    """Fail the round trip, saying what came out wrong."""
    if not condition:
        raise ModelLoadError(f"round trip check failed: {what}")


def check_ids(tokens: torch.Tensor, info: TokenizerInfo) -> None:
    """Every id within the vocabulary the model declares."""
    low, high = int(tokens.min()), int(tokens.max())
    check(low >= 0 and high < info.vocab_size, f"ids {low}..{high} outside 0..{info.vocab_size}")


def summary(info: TokenizerInfo) -> str:
    """One line of the figures a client needs."""
    if isinstance(info, ImageInfo):
        return (
            f"image {info.image_size}, grid {info.grid}, downsample {info.downsample}, "
            f"vocab {info.vocab_size}"
        )
    return (
        f"audio {info.sample_rate} Hz x {info.channels}, hop {info.hop_length} "
        f"({info.frame_rate:g} frames/s), {info.codebooks} codebooks of {info.vocab_size}"
        + (f", {list(info.tokens_per_frame)} tokens per frame" if info.tokens_per_frame else "")
    )
