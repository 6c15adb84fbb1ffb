"""A bulk job: plan the inputs, skip the shards a resumed job already wrote, tokenize the rest
through an engine (in-process, a running server, or Ray), write shards and the manifest.

The local and server engines share one driver: items are read ahead in threads, a bounded
window of them is in flight at once (so memory stays flat however many there are), and their
rows come back in input order to the shard writer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import platform
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal, Protocol

from app.bulk.inputs import Inputs, Item, Reader, plan_digest, read_or_problem
from app.bulk.progress import Progress
from app.bulk.shards import (
    FIGURES,
    Format,
    JobState,
    Shard,
    arrow_schema,
    row,
    write_manifest,
    write_shard,
)
from app.errors import ProblemError
from app.media import ResizeMode

log = logging.getLogger("tokserve.bulk")

EngineKind = Literal["local", "ray", "server"]
# the model figures a manifest repeats from the model's description
MODEL_FIGURES = (
    "vocab_size",
    "codebooks",
    "grid",
    "image_size",
    "sample_rate",
    "channels",
    "frame_rate",
    "tokens_per_frame",
    "streams",
    "reproducibility",
)
READ_THREADS = 4
# chunks done but not yet written, waiting behind a slower one, in windows of chunks in flight
REORDER_WINDOWS = 4


@dataclass(frozen=True)
class BulkOptions:
    """One bulk job, as ``tokserve bulk`` takes it."""

    inputs: list[str]
    out: Path
    model: str | None = None
    format: Format = "parquet"
    codebooks: int | None = None
    resize: ResizeMode = "crop"
    column: str = "path"
    id_column: str | None = None
    resume: bool = False
    workers: int | None = None
    engine: EngineKind = "local"
    server: str | None = None
    api_key: str | None = None
    ray_address: str | None = None
    rows_per_shard: int = 10_000
    model_dir: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BulkResult:
    """What a finished job wrote: the manifest's counts and where it is."""

    out: Path
    rows: int
    errors: int
    seconds: float
    manifest: dict[str, Any]


class Tokenizer(Protocol):
    """An engine the shared driver feeds: encode ``chunk`` items per call, ``window`` calls in
    flight; each result is the engine's Tokens (or the client's Encoded) or a ProblemError."""

    model: dict[str, Any]  # the model's description, as GET /v1/models gives it
    chunk: int
    window: int

    async def encode(self, blobs: list[bytes | ProblemError]) -> list[Any]: ...

    async def close(self) -> None: ...


def identity(
    options: BulkOptions, model: dict[str, Any], items: int, digest: str
) -> dict[str, Any]:
    """What makes two runs the same job: model and version, inputs and the options that change
    rows. A resumed job must match the one it continues."""
    return {
        "model": model["name"],
        "version": model["version"],
        "inputs": list(options.inputs),
        "items": items,
        "plan_sha256": digest,
        "format": options.format,
        "codebooks": options.codebooks,
        "resize": options.resize if model["modality"] == "image" else None,
        "rows_per_shard": options.rows_per_shard,
    }


class ShardSink:
    """Collects rows in item order and writes shard after shard, recording each in the state."""

    def __init__(self, state: JobState, options: BulkOptions, model: dict[str, Any]) -> None:
        self.state = state
        self.options = options
        self.schema = (
            arrow_schema(model["modality"], _token_type(model))
            if options.format == "parquet"
            else None
        )
        self.rows: list[dict[str, Any]] = []

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.rows.append(r)
            if len(self.rows) == self.options.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        """Write the rows held as the next shard (the last one may be short)."""
        if self.rows:
            number = len(self.state.shards)
            shard = write_shard(
                self.options.out, number, self.rows, self.options.format, self.schema
            )
            self.state.record(shard)
            self.rows = []


def _token_type(model: dict[str, Any]) -> str:
    return "uint16" if model["vocab_size"] <= 2**16 else "uint32"


class Job:
    """One job's plan, state and shard writer; engines feed it rows in item order."""

    def __init__(
        self, options: BulkOptions, model: dict[str, Any], progress: Progress | None
    ) -> None:
        self.started = time.monotonic()
        self.options = options
        self.model = model
        self.inputs = Inputs(options.inputs, model["modality"], options.column, options.id_column)
        count, digest = plan_digest(self.inputs.plan())
        self.state = JobState.open(
            options.out, identity(options, model, count, digest), options.resume
        )
        self.state.save()
        self.sink = ShardSink(self.state, options, model)
        self.done = sum(shard.rows for shard in self.state.shards)
        self.progress = progress or Progress(count)
        self.progress.start(self.done, sum(shard.errors for shard in self.state.shards))

    def remaining(self) -> Iterator[Item]:
        """The items not yet in a written shard, in order."""
        return itertools.islice(self.inputs.plan(), self.done, None)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Rows of the next items in order; writes each shard as it fills."""
        self.sink.add(rows)
        self.progress.advance(len(rows), sum(r["error"] is not None for r in rows))

    def finish(self) -> BulkResult:
        """Write the last shard and the manifest."""
        self.sink.flush()
        seconds = time.monotonic() - self.started
        manifest = build_manifest(self.options, self.model, self.state.shards, seconds)
        write_manifest(self.options.out, manifest)
        self.progress.finish(self.options.out)
        counts = manifest["counts"]
        return BulkResult(self.options.out, counts["rows"], counts["errors"], seconds, manifest)


def run(options: BulkOptions, progress: Progress | None = None) -> BulkResult:
    """Run (or resume) a bulk job to the end; returns its counts. Raises JobMismatch when
    ``out`` holds another job, InputError when an input cannot be planned."""
    options.out.mkdir(parents=True, exist_ok=True)
    if options.engine == "ray":
        from app.bulk.ray_engine import describe_model, ray_rows

        job = Job(options, describe_model(options), progress)
        for rows in ray_rows(job.remaining(), options, job.model):
            job.add(rows)
        return job.finish()
    return asyncio.run(_run_async(options, progress))


async def _run_async(options: BulkOptions, progress: Progress | None) -> BulkResult:
    tokenizer = await open_tokenizer(options)
    try:
        job = await asyncio.to_thread(Job, options, tokenizer.model, progress)
        async for rows in drive(tokenizer, job.remaining()):
            await asyncio.to_thread(job.add, rows)
        return await asyncio.to_thread(job.finish)
    finally:
        await tokenizer.close()


async def drive(tokenizer: Tokenizer, items: Iterator[Item]) -> AsyncIterator[list[dict[str, Any]]]:
    """Rows of ``items`` in order. ``tokenizer.window`` chunks are in flight at once: a chunk
    done behind a slow one (a long clip) frees its place for the next, and waits, up to
    REORDER_WINDOWS windows of them, for its turn to be written. Each chunk's bytes are read in
    threads while earlier chunks are tokenized."""
    reader = Reader()
    model, version = tokenizer.model["name"], tokenizer.model["version"]
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="bulk-read")
    places = asyncio.Semaphore(tokenizer.window)

    async def tokenize(chunk: list[Item]) -> list[dict[str, Any]]:
        try:
            reads = [loop.run_in_executor(pool, read_or_problem, reader, i.locator) for i in chunk]
            blobs = await asyncio.gather(*reads)
            results = await tokenizer.encode(list(blobs))
            return [row(i, model, version, r) for i, r in zip(chunk, results, strict=True)]
        finally:
            places.release()

    pending: deque[asyncio.Task[list[dict[str, Any]]]] = deque()
    try:
        while chunk := list(itertools.islice(items, tokenizer.chunk)):
            while pending and (
                pending[0].done() or len(pending) >= REORDER_WINDOWS * tokenizer.window
            ):
                yield await pending.popleft()
            await places.acquire()
            pending.append(asyncio.create_task(tokenize(chunk)))
        while pending:
            yield await pending.popleft()
    finally:
        for task in pending:
            task.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


async def open_tokenizer(options: BulkOptions) -> Tokenizer:
    """The local engine, or a client of the server at ``options.server``."""
    if options.server:
        from app.bulk.remote import ServerTokenizer

        return await asyncio.to_thread(ServerTokenizer.connect, options)
    from app.bulk.local import LocalTokenizer

    return await LocalTokenizer.open(options)


def build_manifest(
    options: BulkOptions, model: dict[str, Any], shards: list[Shard], seconds: float
) -> dict[str, Any]:
    """The job's record: the model and its figures, the command, inputs, options, counts and
    every shard with its rows and sha256."""
    return {
        "model": model["name"],
        "version": model["version"],
        "modality": model["modality"],
        **{k: model[k] for k in MODEL_FIGURES if k in model},
        "token_dtype": _token_type(model),
        "columns": ["id", "model", "version", "tokens", "shape", *FIGURES[model["modality"]]],
        "command": options.command or sys.argv,
        "tokserve_version": package_version("tokserve"),
        "python": platform.python_version(),
        "inputs": list(options.inputs),
        "options": {
            "format": options.format,
            "codebooks": options.codebooks,
            "resize": options.resize if model["modality"] == "image" else None,
            "rows_per_shard": options.rows_per_shard,
            "engine": "server" if options.server else options.engine,
        },
        "counts": {
            "rows": sum(s.rows for s in shards),
            "errors": sum(s.errors for s in shards),
        },
        "seconds": round(seconds, 3),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": [
            {"name": s.name, "rows": s.rows, "errors": s.errors, "sha256": s.sha256} for s in shards
        ],
    }
