"""Codebooks at several rates (SNAC-style) in one token array [rows, F], and back.

The server answers such a model's tokens as one array; these give each codebook's own sequence
back, offline, exactly as the server packs and unpacks them (it imports them from here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_streams(streams: Sequence[np.ndarray], tokens_per_frame: Sequence[int]) -> np.ndarray:
    """Codebooks at several rates -> the token array [rows, F]: stream k, of
    ``tokens_per_frame[k] * F`` ids, fills that many rows, frame by frame (its token j lands in
    row ``j % r`` of its rows, column ``j // r``). The inverse of ``unpack_streams``."""
    frames = len(streams[0]) // tokens_per_frame[0]
    return np.concatenate(
        [
            np.asarray(stream).reshape(frames, per_frame).T
            for stream, per_frame in zip(streams, tokens_per_frame, strict=False)
        ]
    )


def unpack_streams(array: np.ndarray, tokens_per_frame: Sequence[int]) -> list[np.ndarray]:
    """The token array [rows, F] -> each codebook's stream of ``tokens_per_frame[k] * F`` ids,
    as far as its rows reach."""
    streams, row = [], 0
    for per_frame in tokens_per_frame:
        if row + per_frame > array.shape[0]:
            break
        streams.append(array[row : row + per_frame].T.reshape(-1))
        row += per_frame
    return streams
