"""The four benchmarked operations: inputs from real media, the in-process batch function that
bounds them, and the HTTP requests that exercise them."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from app.media import decode_audio, decode_image
from app.registry import LoadedModel
from app.runner import AudioRunner, ImageRunner
from app.tokenizers.base import AudioInfo, ImageInfo
from bench.loadgen import Call, CallFactory
from bench.media import audio_clips, image_file, photos, unique_copy, wav_file

OPS = ("image_encode", "image_decode", "audio_encode", "audio_decode")
MSGPACK = "application/msgpack"
JSON = {"Content-Type": "application/json"}
CLIP_S = 5.0


@dataclass(frozen=True)
class Workload:
    """One operation: what the in-process ceiling runs and what the load generator sends."""

    op: str
    model: LoadedModel
    description: str
    run_batch: Callable[[list[Any]], list[Any]]
    items: list[Any]  # prepared model inputs, exactly what the server's batcher would get
    calls: CallFactory
    peer_calls: CallFactory  # the same inputs as the LitServe peer (bench/peer.py) reads them


def unique_uploads(path: str, blobs: list[bytes], content_type: str) -> CallFactory:
    """Requests cycling through ``blobs``, each made unique (a cache miss) by its own nonce."""
    nonces = itertools.count()

    def call() -> Call:
        nonce = next(nonces)
        body = unique_copy(blobs[nonce % len(blobs)], nonce)
        return Call(path, body, {"Content-Type": content_type, "Accept": MSGPACK})

    return call


def repeated_uploads(path: str, blobs: list[bytes], content_type: str) -> CallFactory:
    """Requests cycling through ``blobs`` unchanged (cache hits once each was seen)."""
    bodies = itertools.cycle(blobs)
    headers = {"Content-Type": content_type, "Accept": MSGPACK}
    return lambda: Call(path, next(bodies), headers)


def unique_token_requests(
    path: str, model: str, token_arrays: list[np.ndarray], vocab_size: int
) -> CallFactory:
    """Decode requests as msgpack with binary little-endian int32 ids, cycling through
    ``token_arrays``; the last three ids of each spell a per-request nonce, because identical
    requests in flight are computed once (single-flight) and would flatter the throughput."""
    nonces = itertools.count()
    headers = {"Content-Type": MSGPACK}

    def call() -> Call:
        nonce = next(nonces)
        tokens = token_arrays[nonce % len(token_arrays)].astype("<i4")
        flat = tokens.reshape(-1)
        for position in range(1, min(3, flat.size) + 1):
            nonce, flat[-position] = divmod(nonce, vocab_size)
        item = {"dtype": "<i4", "shape": list(tokens.shape), "data": tokens.tobytes()}
        return Call(path, msgpack.packb({"model": model, "tokens": item}), headers)

    return call


def peer_uploads(path: str, blobs: list[bytes]) -> CallFactory:
    """LitServe's form of ``bench.workloads.unique_uploads``: each file made unique by its
    nonce, sent as base64 in JSON."""
    nonces = itertools.count()

    def call() -> Call:
        nonce = next(nonces)
        data = base64.b64encode(unique_copy(blobs[nonce % len(blobs)], nonce)).decode()
        return Call(path, _json({"data": data}), JSON)

    return call


def peer_token_requests(path: str, token_arrays: list[np.ndarray], vocab_size: int) -> CallFactory:
    """LitServe's form of ``bench.workloads.unique_token_requests``: the same nonce in the last
    ids, the int32 ids base64 in JSON."""
    nonces = itertools.count()

    def call() -> Call:
        nonce = next(nonces)
        tokens = token_arrays[nonce % len(token_arrays)].astype("<i4")
        flat = tokens.reshape(-1)
        for position in range(1, min(3, flat.size) + 1):
            nonce, flat[-position] = divmod(nonce, vocab_size)
        body = {"shape": list(tokens.shape), "tokens": base64.b64encode(tokens.tobytes()).decode()}
        return Call(path, _json(body), JSON)

    return call


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _encode_all(
    run_batch: Callable[[list[Any]], list[Any]], items: list[Any], batch: int
) -> list[Any]:
    return [out for i in range(0, len(items), batch) for out in run_batch(items[i : i + batch])]


def image_workloads(model: LoadedModel, data_dir: Path, count: int) -> dict[str, Workload]:
    """image_encode (JPEG photos at the model's size) and image_decode (their token grids)."""
    info = model.info
    assert isinstance(info, ImageInfo)
    runner = ImageRunner(model)
    size = info.image_size
    jpegs = [image_file(photo, "jpeg") for photo in photos(data_dir, size, count)]
    pixels = [decode_image(blob, size) for blob in jpegs]
    grids = _encode_all(runner.encode_batch, pixels, model.serving.max_batch_size)
    height, width = size
    query = f"?model={model.name}"
    return {
        "image_encode": Workload(
            "image_encode",
            model,
            f"{len(jpegs)} photos as {width}x{height} JPEG, unique bytes per request",
            runner.encode_batch,
            pixels,
            unique_uploads(f"/v1/images/encode{query}", jpegs, "image/jpeg"),
            peer_uploads("/v1/images/encode", jpegs),
        ),
        "image_decode": Workload(
            "image_decode",
            model,
            f"{len(grids)} token grids {list(grids[0].shape)} of those photos (last ids varied "
            "per request), answered as PNG",
            runner.decode_batch,
            grids,
            unique_token_requests(f"/v1/images/decode{query}", model.name, grids, info.vocab_size),
            peer_token_requests("/v1/images/decode", grids, info.vocab_size),
        ),
    }


def audio_workloads(model: LoadedModel, data_dir: Path, count: int) -> dict[str, Workload]:
    """audio_encode (5 s WAV clips of real recordings) and audio_decode (their tokens)."""
    info = model.info
    assert isinstance(info, AudioInfo)
    runner = AudioRunner(model)
    rate, channels = info.sample_rate, info.channels
    wavs = [wav_file(clip, rate) for clip in audio_clips(data_dir, rate, channels, CLIP_S, count)]
    waves = [decode_audio(blob, rate, channels)[0] for blob in wavs]
    tokens = _encode_all(runner.encode_batch, waves, model.serving.max_batch_size)
    query = f"?model={model.name}"
    return {
        "audio_encode": Workload(
            "audio_encode",
            model,
            f"{len(wavs)} clips of {CLIP_S:g} s, {rate} Hz 16-bit WAV, unique bytes per request",
            runner.encode_batch,
            waves,
            unique_uploads(f"/v1/audio/encode{query}", wavs, "audio/wav"),
            peer_uploads("/v1/audio/encode", wavs),
        ),
        "audio_decode": Workload(
            "audio_decode",
            model,
            f"{len(tokens)} token arrays {list(tokens[0].shape)} of those clips (last ids varied "
            "per request), answered as WAV",
            runner.decode_batch,
            tokens,
            unique_token_requests(f"/v1/audio/decode{query}", model.name, tokens, info.vocab_size),
            peer_token_requests("/v1/audio/decode", tokens, info.vocab_size),
        ),
    }


def cache_uploads(model: LoadedModel, data_dir: Path, count: int) -> list[bytes]:
    """``count`` photos as PNG at the image model's size, for the cache scenario."""
    info = model.info
    assert isinstance(info, ImageInfo)
    return [image_file(photo, "png") for photo in photos(data_dir, info.image_size, count)]
