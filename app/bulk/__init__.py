"""Tokenize datasets: ``tokserve bulk`` and its Python API.

    from app.bulk import BulkOptions, run
    result = run(BulkOptions(inputs=["photos/"], out=Path("tokens"), model="image-fsq-256"))
    result.rows, result.errors, result.manifest["shards"]

inputs.py plans what to read, shards.py writes rows, shards and the manifest, job.py drives a
job through the local (local.py), server (remote.py) or Ray (ray_engine.py) engine.
"""

from app.bulk.job import BulkOptions, BulkResult, run

__all__ = ["BulkOptions", "BulkResult", "run"]
