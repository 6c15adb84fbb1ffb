"""pack_streams and unpack_streams: SNAC-style codebooks at several rates in one array, the
layout the server answers (it imports these from here)."""

from __future__ import annotations

import numpy as np
from tokserve_client import pack_streams, unpack_streams

PER_FRAME = [1, 2, 4]


def streams(frames: int) -> list[np.ndarray]:
    return [np.arange(r * frames) + 100 * k for k, r in enumerate(PER_FRAME)]


def test_pack_puts_token_j_of_a_stream_in_row_j_mod_r_column_j_div_r() -> None:
    packed = pack_streams(streams(3), PER_FRAME)
    assert packed.shape == (7, 3)
    np.testing.assert_array_equal(packed[0], [0, 1, 2])
    np.testing.assert_array_equal(packed[1:3], [[100, 102, 104], [101, 103, 105]])
    np.testing.assert_array_equal(packed[3:, 1], [204, 205, 206, 207])


def test_unpack_gives_back_every_stream_that_was_packed() -> None:
    unpacked = unpack_streams(pack_streams(streams(5), PER_FRAME), PER_FRAME)
    for got, sent in zip(unpacked, streams(5), strict=True):
        np.testing.assert_array_equal(got, sent)


def test_unpack_of_the_first_codebooks_rows_gives_only_those_streams() -> None:
    unpacked = unpack_streams(pack_streams(streams(4), PER_FRAME)[:3], PER_FRAME)
    assert len(unpacked) == 2
    np.testing.assert_array_equal(unpacked[1], streams(4)[1])
