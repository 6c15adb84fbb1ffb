"""Ogg Opus in live streams (app/ogg_opus.py): Ogg Opus input whose pages fail their CRC is
refused. A real uvicorn server of tiny causal EnCodec and Mimi checkpoints, and real speech
from /work/shared/data."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest

from app.media import decode_audio
from app.ogg_opus import ogg_crc
from tests.support import LONG_CLIP, causal_repo, live_ogg_opus, settings_for
from tests.test_streaming import Live, live_server, stream_encode


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    repo = causal_repo(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("checkpoints"))
    with live_server(settings_for(repo, cache_max_bytes=0)) as server:
        yield server


def bitwise_crc(data: bytes) -> int:
    """Ogg's CRC-32 bit by bit, as the spec states it: polynomial 0x04C11DB7, MSB first,
    initial 0, no final xor (the reference the app's table-free zlib trick must match)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def test_ogg_crc_matches_the_bitwise_definition_and_ffmpegs_pages() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 27, 255, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == bitwise_crc(data)
    ffmpeg_file = live_ogg_opus(np.zeros(48000, np.float32))
    page = ffmpeg_file[: ffmpeg_file.index(b"OggS", 4)]
    (stored,) = struct.unpack_from("<I", page, 22)
    assert ogg_crc(page[:22] + bytes(4) + page[26:]) == stored


@pytest.fixture(scope="module")
def opus_file() -> bytes:
    """Real speech as an Ogg Opus file (48 kHz, FFmpeg's libopus, 20 ms packets)."""
    return live_ogg_opus(decode_audio(LONG_CLIP.read_bytes(), 48000)[0][0].numpy())


async def test_an_ogg_opus_encode_stream_with_a_corrupted_page_is_refused_naming_it(
    live: Live, opus_file: bytes
) -> None:
    """One byte of a packet on the sixth page (sequence 5) flipped: the page fails its CRC,
    and the stream is closed with 4415 and a sentence naming the page."""
    starts = [i for i in range(len(opus_file)) if opus_file.startswith(b"OggS", i)]
    corrupt = bytearray(opus_file)
    corrupt[starts[6] - 10] ^= 0x01  # a packet byte near the end of page 5
    intact = await stream_encode(live, "mimi", [opus_file], encoding="ogg_opus")
    received = await stream_encode(live, "mimi", [bytes(corrupt)], encoding="ogg_opus")
    assert intact.close_code == 1000
    assert received.close_code == 4415 and received.close_reason == "Corrupt Ogg page"
    assert received.error is not None
    assert received.error["detail"].startswith(
        "Ogg page 5 (its sequence number) fails its CRC check"
    )
