"""``tokserve bulk``: tokenize a dataset into Parquet or WebDataset shards."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from app.media import RESIZE_MODES


def bulk(args: argparse.Namespace) -> int:
    """Run or resume the job; 2 when it cannot start, 1 with --fail-on-error and error rows."""
    from app.bulk.inputs import InputError
    from app.bulk.job import BulkOptions, run
    from app.bulk.remote import ModelChanged
    from app.bulk.shards import JobMismatch

    if args.server and args.engine != "local":
        print("tokserve bulk: --server sends the job to a server; drop --engine.", file=sys.stderr)
        return 2
    options = BulkOptions(
        inputs=args.inputs,
        out=Path(args.out),
        model=args.model,
        format=args.format,
        codebooks=args.codebooks,
        resize=args.resize,
        column=args.column,
        id_column=args.id_column,
        resume=args.resume,
        workers=args.workers,
        engine=args.engine,
        server=args.server,
        api_key=args.api_key or os.environ.get("TOKSERVE_API_KEY"),
        ray_address=args.ray_address,
        rows_per_shard=args.rows_per_shard,
        model_dir=args.model_dir.split(":") if args.model_dir else [],
        command=["tokserve", *sys.argv[1:]],
    )
    try:
        result = run(options)
    except (JobMismatch, InputError, ModelChanged, ValueError) as exc:
        print(f"tokserve bulk: {exc}", file=sys.stderr)
        return 2
    if args.fail_on_error and result.errors:
        print(
            f"tokserve bulk: {result.errors} of {result.rows} rows have an error", file=sys.stderr
        )
        return 1
    return 0


def add_subcommands(commands: Any) -> None:
    """Add ``bulk`` to the tokserve command line."""
    cmd = commands.add_parser(
        "bulk",
        help="tokenize a dataset into Parquet or WebDataset shards",
        description=(
            "Tokenize every image or audio file of the inputs into shards of DIR, with a "
            "manifest.json. Bad files become rows with an error; --resume finishes a job that "
            "was interrupted, with the same rows an uninterrupted run gives."
        ),
    )
    cmd.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folder, glob, text file of paths, Parquet/JSONL table or WebDataset .tar",
    )
    cmd.add_argument("--model", required=True, help="the model to tokenize with")
    cmd.add_argument("--out", required=True, metavar="DIR", help="folder for shards and manifest")
    cmd.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    cmd.add_argument("--codebooks", type=int, help="audio: keep the first K codebooks (all)")
    cmd.add_argument("--resize", choices=RESIZE_MODES, default="crop", help="images (crop)")
    cmd.add_argument("--column", default="path", help="table inputs: paths or bytes (path)")
    cmd.add_argument("--id-column", help="table inputs: the rows' ids (file#row)")
    cmd.add_argument("--resume", action="store_true", help="finish the job already in DIR")
    cmd.add_argument(
        "--workers",
        type=int,
        help="local: media threads (one per CPU); server: requests in flight (4); ray: actors",
    )
    cmd.add_argument("--engine", choices=("local", "ray"), default="local")
    cmd.add_argument("--server", metavar="URL", help="send the job to a running tokserve")
    cmd.add_argument("--api-key", help="the server's API key (or TOKSERVE_API_KEY)")
    cmd.add_argument("--ray-address", help="an existing Ray cluster (ray engine); else local")
    cmd.add_argument("--rows-per-shard", type=int, default=10_000)
    cmd.add_argument("--model-dir", help="colon-separated model directories (local and ray)")
    cmd.add_argument(
        "--fail-on-error", action="store_true", help="exit 1 when any row has an error"
    )
    cmd.set_defaults(handler=bulk)
