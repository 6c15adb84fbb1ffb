"""How the cache stores a token array: a few header bytes, then the values little-endian.

``[dtype u8][ndim u8][shape u32 LE x ndim][data LE]``; integer tokens are stored in the narrowest
type that holds them exactly (uint16 for every vocabulary up to 65,536), so a 1,024-token image
grid takes 2 kB.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

# One byte names the stored dtype; always little-endian on the wire.
_DTYPE_BY_CODE: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<f2"),
    6: np.dtype("<f4"),
    7: np.dtype("<f8"),
}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}
_MAX_NDIM = 32
_MAX_DIM = 2**32 - 1


def _stored_dtype(array: np.ndarray) -> np.dtype[Any]:
    """The narrowest wire dtype that holds every value of ``array`` exactly."""
    if array.dtype.kind == "f":
        return np.dtype(array.dtype.newbyteorder("<"))
    if array.dtype.kind not in "iu":
        raise TypeError(f"cannot pack arrays of dtype {array.dtype}")
    if array.dtype == np.uint8:
        return np.dtype("<u1")
    if array.size == 0:
        return np.dtype("<u2")
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 2**16:
        return np.dtype("<u2")
    if low >= -(2**31) and high < 2**31:
        return np.dtype("<i4")
    if low >= -(2**63) and high < 2**63:
        return np.dtype("<i8")
    raise ValueError("integer values do not fit in int64")


def pack_array(tokens: np.ndarray) -> bytes:
    """``[dtype u8][ndim u8][shape u32 LE × ndim][data LE]``; ints stored as uint16 if they fit."""
    dtype = _stored_dtype(tokens)
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None:
        raise TypeError(f"cannot pack arrays of dtype {tokens.dtype}")
    if tokens.ndim > _MAX_NDIM or any(dim > _MAX_DIM for dim in tokens.shape):
        raise ValueError(f"cannot pack an array of shape {tokens.shape}")
    header = struct.pack(f"<BB{tokens.ndim}I", code, tokens.ndim, *tokens.shape)
    return header + np.ascontiguousarray(tokens, dtype=dtype).tobytes()


def unpack_array(blob: bytes) -> np.ndarray:
    """Read-only array view of a :func:`pack_array` blob; ValueError on anything else."""
    if len(blob) < 2:
        raise ValueError("cached value shorter than its header")
    code, ndim = blob[0], blob[1]
    dtype = _DTYPE_BY_CODE.get(code)
    if dtype is None:
        raise ValueError(f"cached value has unknown dtype code {code}")
    if ndim > _MAX_NDIM:
        raise ValueError(f"cached value claims {ndim} dimensions")
    offset = 2 + 4 * ndim
    if len(blob) < offset:
        raise ValueError("cached value shorter than its shape")
    shape = struct.unpack_from(f"<{ndim}I", blob, 2)
    count = math.prod(shape)
    if len(blob) != offset + count * dtype.itemsize:
        raise ValueError(f"cached value length {len(blob)} does not match shape {shape}")
    return np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape)
