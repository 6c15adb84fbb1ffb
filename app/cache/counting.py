"""Values in and out of a cache backend, each outcome counted: hit, miss, error or invalid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from app.cache.format import pack_array, unpack_array
from app.metrics import CACHE_REQUESTS

log = logging.getLogger("tokserve.cache")

# Whether a cached array is an answer the caller can serve; anything else reads as a miss.
Fits = Callable[[np.ndarray], bool]

HITS = CACHE_REQUESTS.labels(result="hit")
MISSES = CACHE_REQUESTS.labels(result="miss")
ERRORS = CACHE_REQUESTS.labels(result="error")
# well-formed values that do not fit what the caller expects (wrong dtype, shape or ids)
INVALID = CACHE_REQUESTS.labels(result="invalid")


def pack_items(items: list[tuple[str, np.ndarray]]) -> list[tuple[str, bytes]]:
    """Pack each item; an array that cannot be packed is logged, counted and left out."""
    packed = []
    for key, tokens in items:
        try:
            packed.append((key, pack_array(tokens)))
        except (TypeError, ValueError) as exc:
            ERRORS.inc()
            log.warning("not caching %s: %s", key, exc)
    return packed


def unpack_counted(
    blobs: list[bytes | None], fits: Sequence[Fits] | None
) -> list[np.ndarray | None]:
    """Unpack looked-up values, counting one hit, miss, error (garbage) or invalid (readable,
    but its ``fits`` refuses it: whoever can write to the cache must not choose answers)."""
    results: list[np.ndarray | None] = []
    hits = garbage = invalid = 0
    for index, blob in enumerate(blobs):
        if blob is None:
            results.append(None)
            continue
        try:
            array = unpack_array(blob)
        except ValueError as exc:
            results.append(None)
            garbage += 1
            log.warning("cached value unreadable, treating as a miss: %s", exc)
            continue
        if fits is not None and not fits[index](array):
            results.append(None)
            invalid += 1
            log.warning("cached %s%s does not fit its key; a miss", array.dtype, list(array.shape))
            continue
        results.append(array)
        hits += 1
    misses = len(blobs) - hits - garbage - invalid
    for counter, count in (
        (HITS, hits),
        (MISSES, misses),
        (ERRORS, garbage),
        (INVALID, invalid),
    ):
        if count:
            counter.inc(count)
    return results
