"""What a bulk job writes: one row per item, shards of rows, the job's state and its manifest.

Shard ``n`` holds items ``n * rows_per_shard`` up to the next shard's first, whatever engine
computed them, so a resumed job writes exactly the shards an uninterrupted one would. A shard is
written under a temporary name, flushed to disk and renamed; only then is it recorded in the
state file (itself replaced atomically). A job killed at any moment therefore resumes from the
shards the state file lists; anything else in the folder is rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.bulk.inputs import Item
from app.errors import ProblemError

Format = Literal["parquet", "webdataset"]
SUFFIX: dict[str, str] = {"parquet": ".parquet", "webdataset": ".tar"}
STATE_FILE = ".tokserve-bulk.json"
# a failed row's ``error``: ProblemError.record()
ERROR_TYPE = pa.struct([("status", pa.int32()), ("title", pa.string()), ("detail", pa.string())])
MANIFEST_FILE = "manifest.json"
# the item's figures each modality's rows carry, beside id, model, version, tokens and shape
FIGURES: dict[str, tuple[str, ...]] = {
    "image": ("source_size", "crop_box", "content_box", "resize_filter"),
    "audio": (
        "source_sample_rate",
        "source_channels",
        "samples",
        "resampled",
        "downmixed",
        "frames",
        "frame_rate",
        "codebooks",
        "duration_s",
        "tokens_per_frame",
    ),
}


class JobMismatch(RuntimeError):
    """``--resume`` on a folder whose job differs from this one (model version, inputs, options),
    or a new job in a folder that already holds one."""


def row(item: Item, model: str, version: str, result: Any) -> dict[str, Any]:
    """One item's row: its tokens (flat, row-major), shape and figures, or its error.

    ``result`` is anything with ``tokens`` and ``figures`` (the engine's Tokens, the client's
    Encoded), or a ProblemError; ``tokens`` is None and ``error`` set when the item failed.
    """
    base: dict[str, Any] = {"id": item.id, "model": model, "version": version}
    if isinstance(result, ProblemError):
        return {**base, "tokens": None, "shape": None, "error": result.record()}
    tokens = np.asarray(result.tokens)
    figures = {k: v for k, v in result.figures.items() if k != "shape"}
    return {**base, "tokens": tokens, "shape": list(tokens.shape), **figures, "error": None}


def arrow_schema(modality: str, token_type: str) -> Any:
    """The Parquet schema of a modality's rows; tokens are uint16 unless the vocabulary is
    larger."""
    common = [
        ("id", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("tokens", pa.list_(pa.uint16() if token_type == "uint16" else pa.uint32())),
        ("shape", pa.list_(pa.int32())),
    ]
    figures = {
        "image": [
            ("source_size", pa.list_(pa.int32())),
            ("crop_box", pa.list_(pa.float64())),
            ("content_box", pa.list_(pa.int32())),
            ("resize_filter", pa.string()),
        ],
        "audio": [
            ("source_sample_rate", pa.int32()),
            ("source_channels", pa.int32()),
            ("samples", pa.int64()),
            ("resampled", pa.bool_()),
            ("downmixed", pa.bool_()),
            ("frames", pa.int32()),
            ("frame_rate", pa.float64()),
            ("codebooks", pa.int32()),
            ("duration_s", pa.float64()),
            # codebooks at several rates (SNAC): each one's rows of the token array
            ("tokens_per_frame", pa.list_(pa.int32())),
        ],
    }[modality]
    return pa.schema([*common, *figures, ("error", ERROR_TYPE)])


@dataclass(frozen=True)
class Shard:
    """One written shard: its file name, rows, rows with an error, and the file's sha256."""

    name: str
    rows: int
    errors: int
    sha256: str


def shard_name(number: int, fmt: str) -> str:
    return f"part-{number:05d}{SUFFIX[fmt]}"


def write_shard(
    out: Path, number: int, rows: Sequence[dict[str, Any]], fmt: str, schema: Any
) -> Shard:
    """Write rows as shard ``number`` under a temporary name, flush it, then rename it."""
    name = shard_name(number, fmt)
    data = _parquet_bytes(rows, schema) if fmt == "parquet" else _webdataset_bytes(number, rows)
    temporary = out / f".{name}.tmp"
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, out / name)
    errors = sum(r["error"] is not None for r in rows)
    return Shard(name, len(rows), errors, hashlib.sha256(data).hexdigest())


def _parquet_bytes(rows: Sequence[dict[str, Any]], schema: Any) -> bytes:
    columns = {
        name: [r.get(name) for r in rows] for name in schema.names if name not in ("tokens",)
    }
    token_type = schema.field("tokens").type.value_type.to_pandas_dtype()
    columns["tokens"] = [
        None if r["tokens"] is None else r["tokens"].astype(token_type).ravel() for r in rows
    ]
    table = pa.table({name: columns[name] for name in schema.names}, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _webdataset_bytes(number: int, rows: Sequence[dict[str, Any]]) -> bytes:
    """A tar with ``<key>.tokens.npy`` (absent for failed items) and ``<key>.json`` per row;
    the key is the item's place in the job, its id is in the JSON."""
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for offset, r in enumerate(rows):
            key = f"{number:05d}{offset:06d}"
            meta = {k: v for k, v in r.items() if k != "tokens"}
            members = [(f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
            if r["tokens"] is not None:
                npy = io.BytesIO()
                np.save(npy, r["tokens"])
                members.insert(0, (f"{key}.tokens.npy", npy.getvalue()))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


class JobState:
    """The job's identity and its finished shards, kept in ``DIR/.tokserve-bulk.json``."""

    def __init__(self, out: Path, identity: dict[str, Any], shards: list[Shard]) -> None:
        self.out = out
        self.identity = identity
        self.shards = shards

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any], resume: bool) -> JobState:
        """A new job's state, or with ``resume`` the state of the job in ``out`` — which must be
        this job: same model version, inputs and options."""
        path = out / STATE_FILE
        if not path.exists():
            if any(out.glob("part-*")) or (out / MANIFEST_FILE).exists():
                raise JobMismatch(f"{out} holds shards of another job; choose an empty folder.")
            return cls(out, identity, [])
        if not resume:
            raise JobMismatch(
                f"{out} already holds a job; pass --resume to finish it, or choose another folder."
            )
        saved = json.loads(path.read_text())
        _check_same_job(saved["identity"], identity)
        state = cls(out, identity, [Shard(**s) for s in saved["shards"]])
        state.verify()
        return state

    def verify(self) -> None:
        """Forget every shard from the first whose file is missing or differs from its record,
        and delete leftovers of an interrupted write."""
        for number, shard in enumerate(self.shards):
            path = self.out / shard.name
            if not path.exists() or _sha256(path) != shard.sha256:
                del self.shards[number:]
                break
        for leftover in self.out.glob(".part-*.tmp"):
            leftover.unlink()

    def record(self, shard: Shard) -> None:
        """Add a written shard and save the state atomically."""
        self.shards.append(shard)
        self.save()

    def save(self) -> None:
        path = self.out / STATE_FILE
        temporary = path.with_suffix(".tmp")
        body = {"identity": self.identity, "shards": [asdict(s) for s in self.shards]}
        temporary.write_text(json.dumps(body, indent=1))
        os.replace(temporary, path)


def _check_same_job(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    if saved["version"] != identity["version"]:
        raise JobMismatch(
            f"This folder's job was made by {saved['model']} version {saved['version']}; the "
            f"model now is {identity['model']} version {identity['version']}. Rows of two "
            "versions cannot share one job: resume with the same model, or choose a new folder."
        )
    changed = [key for key in identity if saved.get(key) != identity[key]]
    if changed:
        listed = "; ".join(f"{k}: was {saved.get(k)!r}, now {identity[k]!r}" for k in changed)
        raise JobMismatch(f"--resume with a different job ({listed}); run it as it started.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """``DIR/manifest.json``, replaced atomically."""
    temporary = out / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, out / MANIFEST_FILE)
