"""Tokenize a Ray Data batch: ``TokenizeBatch``, the callable class the Ray bulk engine runs in
its actors, public for teams with Ray pipelines of their own:

    ds = ray.data.read_binary_files("s3://bucket/photos/")  # a "bytes" column
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"model": "image-fsq-256"},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=32,
    )

Each actor holds the model in an engine of its own, as ``tokserve bulk --engine local`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from app.bulk.local import bulk_settings, encode_each
from app.bulk.shards import ERROR_TYPE
from app.config import Settings
from app.endpoints import Tokens
from app.engine import SyncEngine
from app.errors import BadRequest, ProblemError
from app.media import ResizeMode
from app.tokens import token_dtype


def actor_settings(model: str | None, model_dir: list[str] | None) -> Settings:
    """``bulk_settings`` with one instance of the model: Ray runs an actor per CPU (or GPU), and
    gives each actor as many torch threads."""
    return bulk_settings(model, model_dir).model_copy(update={"instances": 1})


class _ItemEngine(SyncEngine):
    """A SyncEngine that encodes a batch's items as the local bulk engine does."""

    def encode_each(
        self,
        blobs: Sequence[bytes | ProblemError],
        model: dict[str, Any],
        resize: ResizeMode,
        codebooks: int | None,
    ) -> list[Tokens | ProblemError]:
        """Each blob's Tokens, or its problem (a blob that is already a problem stays one)."""
        return self._call(encode_each(self.engine, model, blobs, resize, codebooks))


class TokenizeBatch:
    """Tokenize the media files in a batch's ``column`` (file bytes) with one model.

    The batch comes back as a pyarrow Table with ``tokens`` (flat, row-major, the model's token
    dtype), ``shape``, ``version``, ``figures`` (a JSON object: the item's source size, boxes or
    audio figures) and ``error`` ({status, title, detail}; null where the item was tokenized).
    ``column`` is dropped unless ``keep_bytes``: the files need not travel further. A row that
    comes with an ``error`` already (a reader's) keeps it; a row without bytes fails with 400.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        column: str = "bytes",
        resize: ResizeMode = "crop",
        codebooks: int | None = None,
        model_dir: list[str] | None = None,
        keep_bytes: bool = False,
    ) -> None:
        """Load ``model`` (or the only model of the model folders), as ``actor_settings`` says."""
        settings = actor_settings(model, model_dir)
        self.engine = _ItemEngine(settings)
        names = self.engine.engine.registry.names()
        if len(names) != 1:
            self.engine.close()
            held = ", ".join(names) or "none"
            raise ValueError(f"name one model; the model folders hold: {held}.")
        self.model = self.engine.engine.endpoints[names[0]].model.describe()
        self.column = column
        self.resize: ResizeMode = resize
        self.codebooks = codebooks
        self.keep_bytes = keep_bytes
        self.token_type = pa.from_numpy_dtype(token_dtype(self.model["vocab_size"]))

    def __call__(self, batch: Any) -> pa.Table:
        """The batch (a pyarrow Table, a pandas DataFrame or a dict of numpy arrays) with the
        tokens of each row."""
        table = _arrow(batch)
        if self.column not in table.column_names:
            raise KeyError(f"the batch has no {self.column!r} column: {table.column_names}")
        blobs = table.column(self.column).to_pylist()
        given = (
            table.column("error").to_pylist()
            if "error" in table.column_names
            else [None] * len(blobs)
        )
        results = self.engine.encode_each(
            [_input(blob, error) for blob, error in zip(blobs, given, strict=True)],
            self.model,
            self.resize,
            self.codebooks,
        )
        added = self._columns(results)
        if not self.keep_bytes:
            table = table.drop_columns([self.column])
        for name, values in added.items():
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, values)
            else:
                table = table.append_column(name, values)
        return table

    def close(self) -> None:
        """Stop the engine. Ray ends an actor's process without it; call it when you use the
        class directly."""
        self.engine.close()

    def _columns(self, results: list[Tokens | ProblemError]) -> dict[str, pa.Array]:
        tokens: list[Any] = []
        shapes: list[list[int] | None] = []
        figures: list[str | None] = []
        errors: list[dict[str, Any] | None] = []
        for result in results:
            if isinstance(result, ProblemError):
                tokens.append(None)
                shapes.append(None)
                figures.append(None)
                errors.append(result.record())
            else:
                tokens.append(result.tokens.ravel())
                shapes.append(list(result.tokens.shape))
                figures.append(
                    json.dumps({k: v for k, v in result.figures.items() if k != "shape"})
                )
                errors.append(None)
        return {
            "tokens": pa.array(tokens, pa.list_(self.token_type)),
            "shape": pa.array(shapes, pa.list_(pa.int32())),
            "version": pa.array([self.model["version"]] * len(results), pa.string()),
            "figures": pa.array(figures, pa.string()),
            "error": pa.array(errors, ERROR_TYPE),
        }


def _arrow(batch: Any) -> pa.Table:
    """A batch of any of Ray Data's formats as a pyarrow Table."""
    if isinstance(batch, pa.Table):
        return batch
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_arrow()


def _input(blob: Any, error: dict[str, Any] | None) -> bytes | ProblemError:
    """What a row gives the engine: its bytes, or the problem it came with."""
    if error is not None:
        return ProblemError.from_record(**error)
    if isinstance(blob, bytes | bytearray | memoryview):
        return bytes(blob)
    return BadRequest(f"the row holds {type(blob).__name__} where file bytes were expected.")
