"""Cache keys: which model, version, operation, parameters and input bytes a token array answers."""

from __future__ import annotations

import hashlib


def cache_key(model: str, version: str, op: str, params: str, data: bytes) -> str:
    """``tok:{model}:{version}:{op}:{params}:{blake2b-128 hex of data}``."""
    # ':' in the first three fields would let two different requests spell the same key.
    for name, field in (("model", model), ("version", version), ("op", op)):
        if ":" in field:
            raise ValueError(f"cache key {name} must not contain ':' (got {field!r})")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return f"tok:{model}:{version}:{op}:{params}:{digest}"


def canonical_params(**params: object) -> str:
    """Result-changing parameters as sorted ``k=v`` pairs: ``n_q=8,resize=crop``."""
    return ",".join(f"{name}={params[name]}" for name in sorted(params))
