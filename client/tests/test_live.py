"""AsyncClient.stream_encode and stream_decode against a real server of a tiny random EnCodec
checkpoint, which the server's python builds (this venv has no torch)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import wave
from collections.abc import Iterator

import numpy as np
import pytest
from harness import SERVER_PYTHON, server_process
from tokserve_client import AsyncClient, Client, StreamClosed

RATE, HOP = 8000, 320
BUILD = """
import sys, torch, transformers
torch.manual_seed(0)
model = transformers.EncodecModel(transformers.EncodecConfig(
    sampling_rate=8000, hidden_size=16, num_filters=4, upsampling_ratios=[8, 5, 4, 2],
    codebook_size=64, target_bandwidths=[0.3, 0.6], num_lstm_layers=1)).eval()
with torch.no_grad():
    for name, buffer in model.named_buffers():
        if name.endswith((".embed", ".embed_sum")):
            buffer.normal_(0, 0.08)
model.save_pretrained(sys.argv[1])
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("live")
    subprocess.run([SERVER_PYTHON, "-c", BUILD, str(root / "checkpoint")], check=True)
    (root / "models" / "encodec").mkdir(parents=True)
    config = {
        "backend": "transformers",
        "class": "EncodecModel",
        "source": str(root / "checkpoint"),
    }
    (root / "models" / "encodec" / "config.json").write_text(json.dumps(config))
    with server_process(root / "models", python=SERVER_PYTHON, TOKSERVE_LOG_LEVEL="WARNING") as (
        _,
        base,
    ):
        yield base


def speech_pcm() -> np.ndarray:
    """Three seconds of tones and noise as 16-bit PCM at the codec's rate."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * RATE) / RATE
    signal = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.normal(size=t.size)
    return np.round(np.clip(signal, -1, 1) * 32767).astype(np.int16)


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


async def test_stream_encode_gives_the_tokens_of_the_whole_clip(url: str) -> None:
    samples = speech_pcm()
    async with AsyncClient(url) as tok:
        (whole,) = await tok.encode_audio([wav_bytes(samples)], model="encodec")
        async with tok.stream_encode(model="encodec") as stream:
            for start in range(0, samples.size, 999):
                await stream.send_audio(samples[start : start + 999])
            await stream.end()
            frames = [tokens async for tokens in stream]
    assert stream.ready["frame_rate"] == RATE / HOP
    assert np.concatenate(frames, axis=1).tolist() == whole.tokens.tolist()
    assert stream.frames == whole.shape[1]


async def test_audio_at_another_rate_gives_the_tokens_of_the_file_at_that_rate(url: str) -> None:
    samples = speech_pcm()  # sent as 16 kHz audio: twice the codec's rate
    async with AsyncClient(url) as tok:
        (whole,) = await tok.encode_audio([wav_bytes(samples, 2 * RATE)], model="encodec")
        async with tok.stream_encode(model="encodec", sample_rate=2 * RATE) as stream:
            for start in range(0, samples.size, 999):
                await stream.send_audio(samples[start : start + 999])
            await stream.end()
            frames = [tokens async for tokens in stream]
    assert stream.ready["input_sample_rate"] == 2 * RATE
    assert np.concatenate(frames, axis=1).tolist() == whole.tokens.tolist()
    assert stream.frames == whole.shape[1] == samples.size // 2 // HOP + 1


async def test_stream_decode_gives_audio_of_hop_samples_per_frame(url: str) -> None:
    async with AsyncClient(url) as tok:
        (whole,) = await tok.encode_audio([wav_bytes(speech_pcm())], model="encodec")
        async with tok.stream_decode(model="encodec", encoding="pcm_f32le") as stream:
            for start in range(0, whole.shape[1], 10):
                await stream.send_tokens(whole.tokens[:, start : start + 10])
            await stream.end()
            audio = np.concatenate([samples async for samples in stream])
    assert audio.shape == (whole.shape[1] * HOP, 1) and np.abs(audio).max() > 0


async def test_a_refused_stream_raises_with_its_close_code_and_sentence(url: str) -> None:
    async with AsyncClient(url) as tok:
        with pytest.raises(StreamClosed) as refused:
            async with tok.stream_encode(model="encodec", encoding="mp3"):
                pass
    assert refused.value.code == 4415 and "pcm_s16le, pcm_f32le" in refused.value.detail


def ogg_pages(data: bytes) -> list[tuple[int, int, list[bytes]]]:
    """Each Ogg page's header type flags, granule position and packets (none spans pages)."""
    pages, offset = [], 0
    while offset < len(data):
        capture, _, flags, granule, _, _, _, count = struct.unpack_from("<4sBBqIIIB", data, offset)
        assert capture == b"OggS"
        lacing = data[offset + 27 : offset + 27 + count]
        start, packets, packet = offset + 27 + count, [], b""
        for size in lacing:
            packet += data[start : start + size]
            start += size
            if size < 255:
                packets.append(packet)
                packet = b""
        pages.append((flags, granule, packets))
        offset = start
    return pages


async def test_stream_decode_as_ogg_opus_gives_whole_pages_of_one_opus_stream(url: str) -> None:
    """Each result is whole Ogg pages: OpusHead alone on the first (BOS), OpusTags next; the
    last page (EOS) trims the stream to hop samples per frame at 48 kHz, past the pre-skip."""
    async with AsyncClient(url) as tok:
        (whole,) = await tok.encode_audio([wav_bytes(speech_pcm())], model="encodec")
        async with tok.stream_decode(model="encodec", encoding="ogg_opus", bitrate=24000) as stream:
            for start in range(0, whole.shape[1], 10):
                await stream.send_tokens(whole.tokens[:, start : start + 10])
            await stream.end()
            results = [pages async for pages in stream]
    assert all(isinstance(pages, bytes) for pages in results)
    pages = [page for pages in results for page in ogg_pages(bytes(pages))]
    (head,), (tags,) = pages[0][2], pages[1][2]
    assert head.startswith(b"OpusHead") and tags.startswith(b"OpusTags")
    pre_skip, input_rate = struct.unpack_from("<HI", head, 10)
    assert input_rate == RATE
    assert [flags for flags, _, _ in pages] == [0x02] + [0] * (len(pages) - 2) + [0x04]
    assert pages[-1][1] == pre_skip + whole.shape[1] * HOP * 48000 // RATE


async def test_an_ogg_opus_file_is_sent_as_its_bytes_to_stream_encode(url: str) -> None:
    """The .opus file a decode stream wrote, sent back to an encode stream in odd cuts, gives
    a token frame per frame decoded."""
    async with AsyncClient(url) as tok:
        (whole,) = await tok.encode_audio([wav_bytes(speech_pcm())], model="encodec")
        async with tok.stream_decode(model="encodec", encoding="ogg_opus") as decoding:
            await decoding.send_tokens(whole.tokens)
            await decoding.end()
            opus = b"".join([bytes(pages) async for pages in decoding])
        async with tok.stream_encode(model="encodec", encoding="ogg_opus") as encoding:
            for start in range(0, len(opus), 777):
                await encoding.send_audio(opus[start : start + 777])
            await encoding.end()
            frames = [tokens async for tokens in encoding]
    assert encoding.ready["input_sample_rate"] == 48000
    assert np.concatenate(frames, axis=1).shape == whole.tokens.shape


def test_the_blocking_client_streams_as_the_async_one(url: str) -> None:
    samples = speech_pcm()
    with Client(url) as tok:
        (whole,) = tok.encode_audio([wav_bytes(samples)], model="encodec")
        with tok.stream_encode(model="encodec") as encoding:
            for start in range(0, samples.size, 999):
                encoding.send_audio(samples[start : start + 999])
            encoding.end()
            frames = list(encoding)
        with tok.stream_decode(model="encodec", encoding="pcm_f32le") as decoding:
            decoding.send_tokens(whole.tokens)
            decoding.end()
            audio = np.concatenate(list(decoding))
    assert np.concatenate(frames, axis=1).tolist() == whole.tokens.tolist()
    assert encoding.frames == decoding.frames == whole.shape[1]
    assert audio.shape == (whole.shape[1] * HOP, 1)


def test_the_blocking_client_raises_a_refusal_with_its_code(url: str) -> None:
    with (
        Client(url) as tok,
        pytest.raises(StreamClosed) as refused,
        tok.stream_decode(model="encodec", encoding="ogg_opus", bitrate=1000),
    ):
        pass
    assert refused.value.code == 4422 and "bitrate=1000 is outside" in refused.value.detail
