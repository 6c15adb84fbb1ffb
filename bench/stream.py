"""Live streams: how many concurrent real-time encode streams one server sustains, per causal model.

No causal checkpoint ships with tokserve and none can be downloaded here, so each model is the
public architecture at full size with random weights (EnCodec 24 kHz at 6 kbps, 8 codebooks;
Mimi, 8 codebooks), saved with ``save_pretrained`` and served through the transformers backend:
the compute per frame is the real one, the tokens are not. Each stream sends real speech paced
at real time, one frame of audio per message; a frame's latency runs from sending the message
that completes it to reading its tokens (each stream's first second is not timed: warm-up, and
EnCodec's first step waits for 7 frames by design). A count of streams is sustained when the p99
latency over every frame of every stream stays under two frame periods and no stream falls
behind. The count doubles until it fails, then bisects. The load generator shares the
machine's cores.

    python -m bench.stream [--models encodec mimi] [--seconds 6] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.media import decode_audio
from bench.machine import describe
from bench.server import server_process

SPEECH = Path("/work/shared/data/audio/speech/fillets-ng-data-nl-airplane-nl-let-v-oko.ogg")
AUDIO, TOKENS = 0x01, 0x02


def build_models(root: Path) -> dict[str, dict[str, Any]]:
    """Full-size EnCodec 24 kHz and Mimi with random weights, as model folders under ``root``."""
    import transformers

    specs = {
        "encodec": (
            transformers.EncodecModel(transformers.EncodecConfig()),
            {"bandwidth": 6.0},
        ),
        "mimi": (transformers.MimiModel(transformers.MimiConfig()), {"codebooks": 8}),
    }
    configs = {}
    for name, (model, options) in specs.items():
        source = root / "checkpoints" / name
        model.eval().save_pretrained(source)
        folder = root / "models" / name
        folder.mkdir(parents=True)
        config = {
            "backend": "transformers",
            "class": type(model).__name__,
            "source": str(source),
            "options": options,
        }
        (folder / "config.json").write_text(json.dumps(config))
        configs[name] = config
    return configs


async def one_stream(
    url: str, model: str, speech: np.ndarray, seconds: float, start_at: float
) -> tuple[list[float], int, int, float]:
    """Stream ``seconds`` of speech at real time: frame latencies (s), frames sent and
    received, and the frame period."""
    from websockets.asyncio.client import connect

    async with connect(f"{url}/v1/audio/stream/encode?model={model}") as ws:
        ready = json.loads((await ws.recv())[1:])
        hop, period = ready["hop_length"], 1 / ready["frame_rate"]
        frames = int(seconds / period)
        # not timed: the first second (warm-up) and the frames a model's first step waits for
        skipped = max(int(1 / period), ready["first_frames"])
        sent_at: dict[int, float] = {}
        latencies: list[float] = []
        received = 0

        async def send() -> None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            begin = time.monotonic()
            for frame in range(frames):
                await asyncio.sleep(max(0.0, begin + frame * period - time.monotonic()))
                chunk = speech[(frame * hop) % (len(speech) - hop) :][:hop]
                sent_at[frame] = time.monotonic()
                await ws.send(bytes([AUDIO]) + chunk.tobytes())
            await ws.send(bytes([0x03]))

        async def read() -> None:
            nonlocal received
            async for message in ws:
                if isinstance(message, bytes) and message[0] == TOKENS:
                    first, _, count = struct.unpack_from("<IHH", message, 1)
                    now = time.monotonic()
                    latencies.extend(
                        now - sent_at[f] for f in range(max(first, skipped), first + count)
                    )
                    received += count

        await asyncio.gather(send(), read())
    return latencies, frames, received, period


async def trial(
    url: str, model: str, streams: int, speech: np.ndarray, seconds: float
) -> dict[str, Any]:
    """``streams`` concurrent streams (starts spread over one second): p99 latency and whether
    it stayed under two frame periods with every frame answered."""
    start = time.monotonic() + 0.5
    results = await asyncio.gather(
        *(
            one_stream(url, model, speech, seconds, start + i / max(1, streams))
            for i in range(streams)
        )
    )
    latencies = np.concatenate([np.array(r[0]) for r in results])
    period = results[0][3]
    p99 = float(np.percentile(latencies, 99))
    complete = all(received == sent for _, sent, received, _ in results)
    return {
        "streams": streams,
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * p99, 1),
        "limit_ms": round(2000 * period, 1),
        "complete": complete,
        "sustained": complete and p99 < 2 * period,
    }


async def capacity(
    url: str, model: str, speech: np.ndarray, seconds: float, most: int
) -> dict[str, Any]:
    """Double the streams until a trial fails, then bisect: the largest count sustained."""
    trials = []
    good, bad = 0, None
    count = 1
    while count <= most:
        result = await trial(url, model, count, speech, seconds)
        trials.append(result)
        if not result["sustained"]:
            bad = count
            break
        good, count = count, count * 2
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        result = await trial(url, model, middle, speech, seconds)
        trials.append(result)
        good, bad = (middle, bad) if result["sustained"] else (good, middle)
    return {"sustained_streams": good, "trials": trials}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    load_at_start = list(os.getloadavg())  # other processes' load skews every figure
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        torch.manual_seed(0)
        configs = build_models(root)
        for model in args.models:
            wave = decode_audio(SPEECH.read_bytes(), 24000)[0][0].numpy()
            speech = np.clip(np.round(wave * 32767), -32768, 32767).astype("<i2")
            threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
            with server_process(
                root / "models",
                **threads,
                TOKSERVE_MODELS=model,
                TOKSERVE_STREAM_MAX_STREAMS=str(args.most),
                TOKSERVE_STREAM_MAX_STREAMS_PER_KEY=str(args.most),
            ) as (_, url):
                ws = url.replace("http://", "ws://")
                found = asyncio.run(capacity(ws, model, speech, args.seconds, args.most))
            results[model] = {"config": configs[model], **found}
    return {
        "machine": describe("cpu"),
        "server_threads": args.threads or "torch's default",
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "seconds_per_trial": args.seconds,
        "models": results,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["encodec", "mimi"])
    parser.add_argument("--seconds", type=float, default=6.0, help="audio per stream per trial")
    parser.add_argument("--most", type=int, default=256, help="streams at most")
    parser.add_argument(
        "--threads", type=int, help="the server's OMP_NUM_THREADS (default: torch's choice)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the JSON (and write it to --out)."""
    args = parse_args(argv)
    report = json.dumps(measure(args), indent=2) + "\n"
    if args.out:
        args.out.write_text(report)
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
