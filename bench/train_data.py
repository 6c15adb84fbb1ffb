"""Training batches per second by number of data workers: is a GPU run bound by making crops?

    python -m bench.train_data --data ../shared/data --config app/train/configs/image-fsq-256.json

Prints JSON: for each worker count, items (crops or 1 s segments) made per second, and the ratio
to one worker. Batches are the training config's batch size, made exactly as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from app.train.config import TrainConfig
from app.train.data import RandomBatches
from app.train.tasks import build_task


def items_per_s(sampler: RandomBatches, batch_size: int, seconds: float) -> float:
    """Items made per second over at least ``seconds`` (after one warm-up batch)."""
    sampler.batch(batch_size)
    made, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        made += sampler.batch(batch_size).shape[0]
    return made / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed per worker count")
    args = parser.parse_args()
    config = TrainConfig.load(args.config)
    results: dict[str, float] = {}
    for workers in args.workers:
        config.data["workers"] = workers
        sampler = build_task(config, args.data, random.Random(config.seed)).sampler
        results[str(workers)] = items_per_s(sampler, config.batch_size, args.seconds)
    base = results[str(args.workers[0])]
    print(
        json.dumps(
            {
                "modality": config.modality,
                "batch_size": config.batch_size,
                "cpu_count": os.cpu_count(),
                "items_per_s": {k: round(v, 1) for k, v in results.items()},
                "speedup": {k: round(v / base, 2) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
