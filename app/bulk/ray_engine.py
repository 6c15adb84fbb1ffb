"""The Ray bulk engine: the job's items through a Ray Data pipeline on a Ray cluster (or a
local one), their rows back to the driver in item order, where job.py writes the shards.

The plan goes into the object store in blocks of PLAN_BLOCK items (the driver keeps only their
references); tasks read each item's bytes where they run, so the inputs must be visible to
every node at the same paths; an actor pool of TokenizeBatch (one model each, a GPU each where
the cluster has GPUs) tokenizes them; the rows stream back batch by batch, never all at once.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import numpy as np
import pyarrow as pa
import ray
import ray.data

from app.bulk.batch import TokenizeBatch, actor_settings
from app.bulk.inputs import Item, Locator, Reader, read_or_problem
from app.bulk.job import BulkOptions
from app.bulk.local import WINDOW_BATCHES
from app.bulk.remote import ModelChanged
from app.bulk.shards import ERROR_TYPE, row
from app.compute import usable_cpus
from app.endpoints import Tokens
from app.errors import ProblemError
from app.registry import ModelRegistry
from app.tokens import token_dtype

# items per block of the plan in the object store
PLAN_BLOCK = 256
# items a read task reads per call: a batch of large files stays a block of reasonable size
READ_BATCH = 16
LOCATOR_TYPE = pa.struct(
    [
        ("kind", pa.string()),
        ("path", pa.string()),
        ("group", pa.int64()),
        ("row", pa.int64()),
        ("column", pa.string()),
    ]
)

# One per worker process: a Parquet input's row group is read once for all its rows there.
_reader = Reader()


def connect(options: BulkOptions) -> None:
    """Join the cluster at ``--ray-address`` (or RAY_ADDRESS, as in a Ray job), else start a
    local one of the job's own on this machine's CPUs, even where ``ray start`` runs one;
    once per process, and without Ray's logs on stderr."""
    if ray.is_initialized():
        return
    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=usable_cpus(), **quiet)
    # Ray Data's progress and notices: the job shows its own progress; warnings stay
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class Placement(NamedTuple):
    """Each actor's GPUs and CPUs (Ray gives it as many torch threads), and how many actors."""

    gpus: int
    cpus: int
    actors: int


def placement(options: BulkOptions) -> Placement:
    """A GPU per actor, as many actors as the cluster has GPUs; without GPUs, a CPU per actor
    and one CPU left for the driver and the reads. ``--workers`` sets the number of actors."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return Placement(1, 1, options.workers or gpus)
    return Placement(0, 1, options.workers or max(1, int(resources.get("CPU", 1)) - 1))


def describe_model(options: BulkOptions) -> dict[str, Any]:
    """The model's description (GET /v1/models'), from a worker with an actor's resources: a
    model whose tokens depend on the hardware has the version of the workers' hardware."""
    connect(options)
    place = placement(options)
    describe = ray.remote(_describe).options(num_gpus=place.gpus, num_cpus=place.cpus)
    found: list[dict[str, Any]] = ray.get(describe.remote(options.model, options.model_dir))
    if len(found) != 1:
        names = ", ".join(m["name"] for m in found) or "none"
        raise ValueError(f"name one model with --model; the model folders hold: {names}.")
    return found[0]


def _describe(model: str | None, model_dir: list[str]) -> list[dict[str, Any]]:
    registry = ModelRegistry.load(actor_settings(model, model_dir))
    return [loaded.describe() for loaded in registry.models.values()]


def ray_rows(
    items: Iterator[Item], options: BulkOptions, model: dict[str, Any]
) -> Iterator[list[dict[str, Any]]]:
    """Rows of ``items`` in order, a block at a time: the same rows the local engine makes.
    Raises ModelChanged when a worker loads another version of the model than ``model``."""
    connect(options)
    plan = _chunks(items, PLAN_BLOCK)
    first = next(plan, None)
    if first is None:
        return
    blocks: list[Any] = [ray.put(_plan_block(chunk)) for chunk in itertools.chain([first], plan)]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    place = placement(options)
    tokenized = (
        ray.data.from_arrow_refs(blocks)
        .map_batches(_read, batch_format="pyarrow", batch_size=READ_BATCH)
        .map_batches(
            TokenizeBatch,
            batch_format="pyarrow",
            batch_size=WINDOW_BATCHES * model["max_batch_size"],
            fn_constructor_kwargs={
                "model": model["name"],
                "resize": options.resize,
                "codebooks": options.codebooks,
                "model_dir": options.model_dir,
            },
            compute=ray.data.ActorPoolStrategy(size=place.actors),
            num_gpus=place.gpus,
            num_cpus=place.cpus,
        )
    )
    dtype = token_dtype(model["vocab_size"])
    expected = first[0].index
    for batch in tokenized.iter_batches(batch_size=None, batch_format="pyarrow"):
        table = cast(pa.Table, batch)
        indices = table.column("index").to_pylist()
        if indices != list(range(expected, expected + len(indices))):
            raise RuntimeError(f"Ray returned items {indices[:3]}... where {expected} was due.")
        expected += len(indices)
        if indices:
            yield _rows(table, model, dtype)


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _plan_block(chunk: list[Item]) -> pa.Table:
    return pa.table(
        {
            "index": pa.array([i.index for i in chunk], pa.int64()),
            "id": pa.array([i.id for i in chunk], pa.string()),
            "locator": pa.array([i.locator._asdict() for i in chunk], LOCATOR_TYPE),
        }
    )


def _read(batch: pa.Table) -> pa.Table:
    """The plan's rows with each item's ``bytes``, or the ``error`` that reading it gave."""
    blobs = [
        read_or_problem(_reader, Locator(**locator))
        for locator in batch.column("locator").to_pylist()
    ]
    errors = [b.record() if isinstance(b, ProblemError) else None for b in blobs]
    data = [b if isinstance(b, bytes) else None for b in blobs]
    return batch.append_column("bytes", pa.array(data, pa.binary())).append_column(
        "error", pa.array(errors, ERROR_TYPE)
    )


def _rows(table: pa.Table, model: dict[str, Any], dtype: np.dtype[Any]) -> list[dict[str, Any]]:
    """The driver's rows of a tokenized batch, built by shards.row as the local engine's are."""
    name, version = model["name"], model["version"]
    tokens = table.column("tokens").to_numpy(zero_copy_only=False)
    rows = []
    for r, flat in zip(table.drop_columns(["tokens"]).to_pylist(), tokens, strict=True):
        if r["version"] != version:
            raise ModelChanged(
                f"A Ray worker loaded {name} version {r['version']}; this job uses version "
                f"{version}. Rows of two versions cannot share one job: run every worker on the "
                "same hardware and software (a host-reproducible model's version depends on them)."
            )
        result: Tokens | ProblemError = (
            ProblemError.from_record(**r["error"])
            if r["error"] is not None
            else Tokens(
                np.asarray(flat, dtype).reshape(r["shape"]), False, json.loads(r["figures"])
            )
        )
        rows.append(row(Item(r["index"], r["id"], Locator(**r["locator"])), name, version, result))
    return rows
