"""`tokserve train` and `tokserve eval`: argparse subcommands for the native tokenizers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on a ``tokserve`` parser's subparsers."""
    train = subparsers.add_parser("train", help="train a native tokenizer (resumable)")
    train.add_argument("modality", choices=["image", "audio"])
    train.add_argument("--data", type=Path, required=True, help="the shared data folder")
    train.add_argument("--config", type=Path, required=True, help="training config JSON")
    train.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/NAME")
    train.add_argument("--runs", type=Path, default=Path("runs"), help="checkpoint root folder")
    train.add_argument("--resume", action="store_true", help="continue from runs/NAME/")
    train.add_argument("--init", type=Path, help="warm-start from an exported model folder")
    train.add_argument("--steps", type=int, help="total steps = cosine length (default: config)")
    train.add_argument(
        "--minutes", type=float, help="wall-clock budget: fit the cosine length to end on time"
    )
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.set_defaults(handler=run_train)

    pack = subparsers.add_parser("pack", help="copy the training split, small, for a GPU machine")
    pack.add_argument("modality", choices=["image", "audio"])
    pack.add_argument("--data", type=Path, required=True, help="the shared data folder")
    pack.add_argument("--config", type=Path, required=True, help="training config JSON")
    pack.add_argument("--out", type=Path, required=True, help="folder to write (data layout)")
    pack.add_argument("--max-mb", type=float, help="audio: at most this many MB per group")
    pack.set_defaults(handler=run_pack)

    evaluate = subparsers.add_parser("eval", help="measure a model folder against JPEG/WebP/Opus")
    evaluate.add_argument("model", type=Path, help="model folder (config.json + model.safetensors)")
    evaluate.add_argument("--data", type=Path, required=True, help="the shared data folder")
    evaluate.add_argument("--limit", type=int, help="at most this many validation items per kind")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> int:
    """Build the trainer from the command line and train."""
    # imported here: training needs the `train` extra, serving must not
    from app.train.config import TrainConfig
    from app.train.trainer import Trainer, pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig.load(args.config)
    if config.modality != args.modality:
        raise SystemExit(f"{args.config} is a {config.modality} config, not {args.modality}")
    if args.steps is not None:
        config.steps = args.steps
    run_dir = args.runs / args.out.name
    trainer = Trainer(
        config, args.data, args.out, run_dir, pick_device(args.device), minutes=args.minutes
    )
    if args.resume and trainer.checkpoint_path.is_file():
        trainer.resume()
    elif args.resume:
        raise SystemExit(f"--resume: no checkpoint at {trainer.checkpoint_path}")
    elif args.init:
        trainer.warm_start(args.init)
    trainer.run()
    return 0


def run_pack(args: argparse.Namespace) -> int:
    """Pack the training split of one modality and say how large it came out."""
    from app.train.config import TrainConfig
    from app.train.pack import pack_audio, pack_images

    config = TrainConfig.load(args.config)
    try:
        if args.modality == "image":
            size = pack_images(config, args.data, args.out)
        else:
            size = pack_audio(config, args.data, args.out, args.max_mb)
    except ValueError as error:
        raise SystemExit(f"{args.config}: {error}") from None
    print(f"{args.out}: {size / 1e6:.1f} MB of {args.modality}; train on it with val_fraction 0")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a model folder on the validation split and print the JSON report."""
    from app.train.evaluate import evaluate_model

    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_model(args.model, args.data, limit=args.limit)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
