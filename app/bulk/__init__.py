"""Tokenize datasets: ``tokserve bulk`` and its Python API.

    from app.bulk import BulkOptions, run
    result = run(BulkOptions(inputs=["photos/"], out=Path("tokens"), model="image-fsq-256"))
    result.rows, result.errors, result.manifest["shards"]

inputs.py plans what to read, shards.py writes rows, shards and the manifest, job.py drives a
job through the local (local.py), server (remote.py) or Ray (ray_engine.py) engine. batch.py's
TokenizeBatch tokenizes the batches of a Ray Data pipeline of your own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.bulk.job import BulkOptions, BulkResult, run

if TYPE_CHECKING:
    from app.bulk.batch import TokenizeBatch

__all__ = ["BulkOptions", "BulkResult", "TokenizeBatch", "run"]


def __getattr__(name: str) -> Any:
    """TokenizeBatch on first use: it loads the serving engine, which the CLI need not."""
    if name == "TokenizeBatch":
        from app.bulk.batch import TokenizeBatch

        return TokenizeBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
