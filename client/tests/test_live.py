"""AsyncClient.stream_encode and stream_decode against a real server of a tiny random EnCodec
checkpoint, which the server's python builds (this venv has no torch)."""

from __future__ import annotations

import io
import json
import subprocess
import wave
from collections.abc import Iterator

import numpy as np
import pytest
from harness import SERVER_PYTHON, server_process
from tokserve_client import AsyncClient, StreamClosed

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
