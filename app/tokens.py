"""Token arrays between clients, the cache and the models: their dtype, checks and identity.

Encoded tokens leave the model in one dtype, the narrowest that holds the vocabulary (uint16 up
to 65,536 ids), and keep it in the cache and every answer. Tokens to decode arrive in any integer
form and are checked here, item by item, before any model sees them.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from app.cache import Fits
from app.errors import Unprocessable

# the first bytes of each file format a decode can answer, to check decoded media from the cache
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/webp": (b"RIFF",),
    "audio/wav": (b"RIFF",),
    "audio/flac": (b"fLaC",),
    "audio/ogg": (b"OggS",),
}


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The dtype of a model's tokens everywhere: uint16 when its ids fit, else int32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def token_array(item: Any, where: str, vocab_size: int) -> np.ndarray:
    """One item to decode (nested lists, an array, or a binary ``{dtype, shape, data}``) as an
    int64 array; refuses non-integers and ids outside ``0 .. vocab_size - 1``."""
    if isinstance(item, dict):
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(n) is int for n in shape):
            raise Unprocessable(f"{where}: a binary item's 'shape' must be a list of integers.")
        try:
            dtype = np.dtype(item["dtype"])
            if dtype.byteorder == "=":  # unstated: binary tokens are little-endian
                dtype = dtype.newbyteorder("<")
            array = np.frombuffer(item["data"], dtype=dtype)
            array = array.reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise Unprocessable(
                f"{where}: a binary item needs 'dtype', 'shape' and 'data' (bytes: binary items "
                f"come in msgpack bodies) that agree ({exc})."
            ) from exc
    else:
        try:
            array = np.asarray(item)
        except ValueError as exc:
            raise Unprocessable(f"{where} is ragged: every row must have the same length.") from exc
    if array.size == 0:
        raise Unprocessable(f"{where} holds no token ids; send at least one.")
    if array.dtype.kind not in "iu":
        found = "nulls or integers beyond 64 bits" if array.dtype.kind == "O" else array.dtype.name
        raise Unprocessable(f"{where} must hold integer token ids, not {found}.")
    if isinstance(item, list) and _holds_bool(item):
        raise Unprocessable(f"{where} must hold integer token ids, not true or false.")
    if array.min() < 0 or array.max() >= vocab_size:
        raise Unprocessable(
            f"{where} holds ids from {array.min()} to {array.max()}; "
            f"this model accepts 0 to {vocab_size - 1}."
        )
    return array.astype(np.int64)


def _holds_bool(rows: list[Any]) -> bool:
    """Whether nested lists hold true/false anywhere (numpy reads them as 1 and 0 among ints)."""
    values = rows
    while values and isinstance(values[0], list):
        values = list(itertools.chain.from_iterable(values))
    return any(type(value) is bool for value in values)


def key_bytes(array: np.ndarray) -> bytes:
    """Cache identity of a token array: its shape and little-endian int32 ids."""
    return np.asarray(array.shape, "<u4").tobytes() + array.astype("<i4").tobytes()


def raw_bytes(blob: bytes) -> bytes:
    """An upload's cache identity: its bytes, as sent."""
    return blob


def token_fits(
    vocab_size: int, shape: tuple[int | None, ...], frames: tuple[int, int] | None = None
) -> Fits:
    """What cached tokens must be: integers below ``vocab_size`` in an array of ``shape`` (a
    grid, a sequence, or codebook rows by None frames) whose last axis, for audio, holds a
    frame count within ``frames``."""

    def fits(array: np.ndarray) -> bool:
        if array.dtype.kind not in "iu" or array.ndim != len(shape):
            return False
        if any(w is not None and h != w for h, w in zip(array.shape, shape, strict=True)):
            return False
        if frames is not None and not frames[0] <= array.shape[-1] <= frames[1]:
            return False
        return bool(array.size) and int(array.min()) >= 0 and int(array.max()) < vocab_size

    return fits


def file_fits(media_type: str) -> Fits:
    """What a cached decode must be: the bytes of a file of ``media_type``."""
    magic = _MAGIC[media_type]

    def fits(array: np.ndarray) -> bool:
        return array.dtype == np.uint8 and array.ndim == 1 and array[:8].tobytes().startswith(magic)

    return fits
