"""Ogg Opus in live streams (app/ogg_opus.py): decode streams answered as Ogg Opus, checked by
two independent readers (libsndfile, FFmpeg through PyAV) and a bitwise CRC; Ogg Opus input
whose pages fail their CRC refused. A real uvicorn server of tiny causal EnCodec and Mimi
checkpoints, and real speech from /work/shared/data."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from app.api.streams import opus_bitrate
from app.media import decode_audio
from app.ogg_opus import OggOpusWriter, ogg_crc
from app.streaming import StreamRefused
from tests.support import LONG_CLIP, causal_repo, live_ogg_opus, settings_for
from tests.test_streaming import (
    END,
    SAMPLE_RATE,
    TOKENS,
    Live,
    Received,
    live_server,
    read_all,
    refused,
    speech,
    stream_encode,
    whole_encode,
)

OPUS_RATE = 48000
# The tiny random models' audio is no speech: EnCodec's a tone at the Nyquist rate over a DC
# offset, Mimi's clipped at +-1 over one; Opus high-passes DC away and overshoots the clipped
# edges, so the waveform SNR says little (1 to 2 dB) and the correlation (blind to DC and
# gain) is measured: 0.978 (EnCodec) and 0.984 (Mimi) at 32 kbit/s, 0.81 and 0.59 at 8 kbit/s;
# Mimi's one sample shifted correlates at -0.03. Real speech's SNR is checked on the writer.
MIN_CORRELATION = 0.9


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


@dataclass
class Page:
    """One Ogg page as read back: its header fields and packets."""

    flags: int
    granule: int
    serial: int
    sequence: int
    crc_ok: bool
    packets: list[bytes]


def pages_of(data: bytes) -> list[Page]:
    """Every page of ``data``, which must be whole pages; packets here never span pages."""
    pages, offset = [], 0
    while offset < len(data):
        capture, version, flags, granule, serial, sequence, crc, count = struct.unpack_from(
            "<4sBBqIIIB", data, offset
        )
        assert capture == b"OggS" and version == 0, offset
        lacing = data[offset + 27 : offset + 27 + count]
        end = offset + 27 + count + sum(lacing)
        assert end <= len(data), "a page is cut"
        raw = data[offset:end]
        crc_ok = bitwise_crc(raw[:22] + bytes(4) + raw[26:]) == crc
        packets, start, packet = [], offset + 27 + count, b""
        for size in lacing:
            packet += data[start : start + size]
            start += size
            if size < 255:
                packets.append(packet)
                packet = b""
        assert packet == b"", "a packet spans pages"
        pages.append(Page(flags, granule, serial, sequence, crc_ok, packets))
        offset = end
    return pages


def from_libsndfile(data: bytes) -> tuple[np.ndarray, int]:
    """Samples [T, C] and their rate as libsndfile reads the stream (libogg checks CRCs)."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, rate


def from_ffmpeg(data: bytes) -> np.ndarray:
    """Samples [C, T] at 48 kHz as FFmpeg's Ogg demuxer and Opus decoder read the stream."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray() for frame in container.decode(audio=0)]
    return np.concatenate(frames, axis=1) if frames else np.zeros((1, 0), np.float32)


def correlation(reference: np.ndarray, decoded: np.ndarray) -> float:
    return float(np.corrcoef(reference, decoded)[0, 1])


def snr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    error = reference - decoded
    return float(10 * np.log10(np.sum(reference**2) / np.sum(error**2)))


async def stream_decode(live: Live, model: str, tokens: np.ndarray, **query: Any) -> Received:
    """Send ``tokens`` [K, F] as TOKENS messages of 3 frames, then END, reading until the close."""
    params = "&".join(f"{k}={v}" for k, v in {"model": model, **query}.items())
    async with connect(f"{live.ws}/v1/audio/stream/decode?{params}", max_size=None) as ws:
        received = Received()

        async def send() -> None:
            for start in range(0, tokens.shape[1], 3):
                part = np.ascontiguousarray(tokens[:, start : start + 3], dtype="<u2")
                header = struct.pack("<IHH", start, part.shape[0], part.shape[1])
                await ws.send(bytes([TOKENS]) + header + part.tobytes())
            await ws.send(bytes([END]))

        _, received = await asyncio.gather(send(), read_all(ws, received))
    return received


@pytest.fixture(scope="module")
def speech_tokens(live: Live) -> dict[str, np.ndarray]:
    """Each model's tokens of 4 s of real speech (the whole-file encode)."""
    samples = speech(LONG_CLIP, seconds=4.0)
    return {model: asyncio.run(whole_encode(live, model, samples)) for model in ("encodec", "mimi")}


@pytest.mark.parametrize("model", ["encodec", "mimi"])
async def test_an_ogg_opus_decode_stream_decodes_to_the_pcm_streams_samples(
    live: Live, speech_tokens: dict[str, np.ndarray], model: str
) -> None:
    """The AUDIO messages joined are one Ogg Opus stream that libsndfile and FFmpeg both read
    to exactly the PCM stream's length (at 48 kHz: 6 per sample of the 8 kHz model), thanks to
    the end granule, and to audio that follows the PCM stream's."""
    tokens = speech_tokens[model]
    pcm = await stream_decode(live, model, tokens, encoding="pcm_f32le")
    opus = await stream_decode(live, model, tokens, encoding="ogg_opus")
    assert opus.close_code == 1000 and opus.end_frames == tokens.shape[1], opus.error
    assert opus.ready["encoding"] == "ogg_opus"
    wave = np.frombuffer(b"".join(pcm.audio), dtype="<f4")
    data = b"".join(opus.audio)
    from_sf, rate = from_libsndfile(data)
    from_av = from_ffmpeg(data)
    assert rate == SAMPLE_RATE  # libsndfile decodes at the OpusHead's input rate
    assert from_sf.shape == (len(wave), 1)
    assert from_av.shape == (1, len(wave) * OPUS_RATE // SAMPLE_RATE)
    assert correlation(wave, from_sf[:, 0]) > MIN_CORRELATION


async def test_every_audio_message_is_whole_pages_with_headers_crcs_and_granules(
    live: Live, speech_tokens: dict[str, np.ndarray]
) -> None:
    """OpusHead alone on the BOS page, OpusTags next, then audio pages in sequence whose
    granule positions grow by their packets' 48 kHz samples; only the last is EOS, and its
    granule trims to the pre-skip plus the stream's samples at 48 kHz."""
    tokens = speech_tokens["mimi"]
    opus = await stream_decode(live, "mimi", tokens, encoding="ogg_opus")
    per_message = [pages_of(message) for message in opus.audio]  # each message: whole pages
    pages = [page for message in per_message for page in message]
    head, tags, audio = pages[0], pages[1], pages[2:]
    assert all(page.crc_ok for page in pages)
    assert [page.sequence for page in pages] == list(range(len(pages)))
    assert len({page.serial for page in pages}) == 1
    assert [page.flags for page in pages] == [0x02] + [0] * (len(pages) - 2) + [0x04]
    assert len(per_message[0]) == 2 and len(head.packets) == len(tags.packets) == 1
    magic, version, channels, pre_skip, input_rate, gain, family = struct.unpack(
        "<8sBBHIhB", head.packets[0]
    )
    assert (magic, version, channels, input_rate, gain, family) == (
        b"OpusHead",
        1,
        1,
        SAMPLE_RATE,
        0,
        0,
    )
    assert pre_skip == 312  # libopus' 6.5 ms lookahead at 48 kHz
    assert tags.packets[0].startswith(b"OpusTags") and head.granule == tags.granule == 0
    samples = tokens.shape[1] * 320 * OPUS_RATE // SAMPLE_RATE
    granules = [page.granule for page in audio]
    assert granules == sorted(granules) and granules[0] > 0
    assert granules[-1] == pre_skip + samples
    packets_48k = [960 * len(page.packets) for page in audio]  # 20 ms packets throughout
    assert granules[:-1] == list(np.cumsum(packets_48k)[:-1])
    assert np.sum(packets_48k) >= granules[-1]


async def test_a_higher_bitrate_gives_a_larger_closer_stream(
    live: Live, speech_tokens: dict[str, np.ndarray]
) -> None:
    tokens = speech_tokens["mimi"]
    wave = np.frombuffer(
        b"".join((await stream_decode(live, "mimi", tokens, encoding="pcm_f32le")).audio), "<f4"
    )
    low = await stream_decode(live, "mimi", tokens, encoding="ogg_opus", bitrate=8000)
    high = await stream_decode(live, "mimi", tokens, encoding="ogg_opus", bitrate=64000)
    low_bytes, high_bytes = b"".join(low.audio), b"".join(high.audio)
    seconds = len(wave) / SAMPLE_RATE
    assert len(low_bytes) * 8 / seconds < 12000  # 8 kbit/s and the pages' overhead
    assert len(high_bytes) > 2 * len(low_bytes)
    low_fit = correlation(wave, from_libsndfile(low_bytes)[0][:, 0])
    high_fit = correlation(wave, from_libsndfile(high_bytes)[0][:, 0])
    assert high_fit > max(low_fit, MIN_CORRELATION)


async def test_an_empty_ogg_opus_decode_stream_is_a_valid_stream_of_no_samples(
    live: Live,
) -> None:
    async with connect(f"{live.ws}/v1/audio/stream/decode?model=mimi&encoding=ogg_opus") as ws:
        await ws.send(bytes([END]))
        received = await read_all(ws, Received())
    data = b"".join(received.audio)
    assert received.close_code == 1000 and received.end_frames == 0
    assert from_libsndfile(data)[0].shape == (0, 1)
    assert from_ffmpeg(data).shape[1] == 0
    assert pages_of(data)[-1].flags == 0x04


@pytest.mark.parametrize(
    ("rate", "channels"),
    [(8000, 1), (24000, 2), (22050, 1)],
    ids=["8k-mono", "24k-stereo", "22.05k-resampled"],
)
def test_the_writer_gives_exactly_the_samples_written_at_48_khz_whatever_the_chunks(
    rate: int, channels: int
) -> None:
    """Any rate and mono or stereo, cut in odd chunks: FFmpeg reads back the samples written
    times 48000 / rate (rounded), libsndfile as many at the rate it decodes to; a rate Opus
    does not take (22.05 kHz) is resampled by PyAV's encoder."""
    wave = decode_audio(LONG_CLIP.read_bytes(), rate)[0][0].numpy()[: 3 * rate]
    samples = np.stack([wave, -0.5 * wave], axis=1)[:, :channels]
    writer = OggOpusWriter(rate, channels, 32000 * channels)
    chunks = [samples[start : start + 777] for start in range(0, len(samples), 777)]
    data = writer.headers() + b"".join(writer.write(chunk) for chunk in chunks) + writer.finish()
    expected_48k = round(len(samples) * OPUS_RATE / rate)
    from_sf, sf_rate = from_libsndfile(data)
    assert from_ffmpeg(data).shape == (channels, expected_48k)
    assert from_sf.shape == (expected_48k * sf_rate // OPUS_RATE, channels)
    if rate == sf_rate:
        assert snr_db(samples, from_sf) > 10  # real speech, 32 kbit/s a channel: 28 dB, 23 dB


def test_a_write_of_more_packets_than_a_page_holds_goes_on_several_full_pages() -> None:
    """10 s written at once at 256 kbit/s: 500 packets of 3 segments each, on pages of at most
    255 segments whose granules follow the packets, read back whole."""
    wave = decode_audio(LONG_CLIP.read_bytes(), 24000)[0][0].numpy()[: 10 * 24000]
    writer = OggOpusWriter(24000, 1, 256000)
    written = writer.write(wave[:, None])
    data = writer.headers() + written + writer.finish()
    pages = pages_of(written)
    assert len(pages) > 2 and all(page.crc_ok for page in pages)
    assert all(sum(len(p) // 255 + 1 for p in page.packets) <= 255 for page in pages)
    assert [page.granule for page in pages] == list(
        np.cumsum([960 * len(page.packets) for page in pages])
    )
    assert from_ffmpeg(data).shape == (1, len(wave) * 2)


async def test_the_json_protocol_carries_the_same_ogg_opus_stream_in_base64(
    live: Live, speech_tokens: dict[str, np.ndarray]
) -> None:
    tokens = speech_tokens["mimi"]
    url = f"{live.ws}/v1/audio/stream/decode?model=mimi&encoding=ogg_opus&protocol=json"
    async with connect(url) as ws:
        for start in range(0, tokens.shape[1], 5):
            message = {"type": "tokens", "tokens": tokens[:, start : start + 5].tolist()}
            await ws.send(json.dumps(message))
        await ws.send(json.dumps({"type": "end"}))
        messages = [json.loads(message) async for message in ws]
    audio = [base64.b64decode(m["data"]) for m in messages if m["type"] == "audio"]
    assert messages[-1] == {"type": "end", "frames": tokens.shape[1]}
    assert all(pages_of(pages) for pages in audio)
    assert from_ffmpeg(b"".join(audio)).shape == (1, tokens.shape[1] * 320 * 6)


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


@pytest.mark.parametrize(
    ("path", "says"),
    [
        (
            "decode?model=mimi&encoding=ogg_opus&bitrate=5999",
            "bitrate=5999 is outside the 6000 to 256000 bit/s accepted for 1-channel Opus",
        ),
        ("decode?model=mimi&encoding=ogg_opus&bitrate=256001", "bitrate=256001 is outside"),
        ("decode?model=mimi&encoding=pcm_f32le&bitrate=32000", "takes none. Leave it out."),
        ("encode?model=mimi&encoding=ogg_opus&bitrate=32000", "takes none. Leave it out."),
    ],
)
async def test_a_bitrate_out_of_range_or_without_opus_output_is_refused_with_4422(
    live: Live, path: str, says: str
) -> None:
    received = await refused(live, f"/v1/audio/stream/{path}")
    assert received.close_code == 4422 and received.error is not None
    assert says in received.error["detail"]


def test_ogg_opus_output_of_more_than_two_channels_is_refused_with_4422() -> None:
    with pytest.raises(StreamRefused) as refused:
        opus_bitrate(None, "ogg_opus", "decode", channels=3)
    assert refused.value.code == 4422
    assert refused.value.detail.startswith("The model decodes 3 channels; encoding=ogg_opus")
    assert opus_bitrate(None, "ogg_opus", "decode", channels=2) == 64000


async def test_a_bitrate_that_is_not_a_number_is_refused_with_4400(live: Live) -> None:
    received = await refused(live, "/v1/audio/stream/decode?encoding=ogg_opus&bitrate=32k")
    assert received.close_code == 4400 and received.error is not None
    assert received.error["detail"] == "bitrate must be a whole number, not '32k'."
