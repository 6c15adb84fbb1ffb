"""The benchmark's peer: the same models served by LitServe, for a row beside tokserve's.

``python -m bench.peer --port P --model-dir D --models a,b`` serves, for each model, its encode
and decode at tokserve's paths (/v1/images/encode, ...; ``?model=`` is ignored: one model per
modality). Each model is loaded by tokserve's own loader (app.registry.load_model, with
TOKSERVE_DEVICE and the model's dtype), its media decoded and encoded by app.media, and its
batches run by the same runners (app.runner) at the model's max_batch_size and max_wait_ms:
what differs is only the serving layer. LitServe reads JSON bodies, so files and token arrays
travel base64 in JSON (bench/workloads.py's ``peer_uploads`` and ``peer_token_requests``);
answers are msgpack, as tokserve's are in the benchmark.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import litserve as ls
import msgpack
import numpy as np
from fastapi import Response

from app.config import Settings
from app.media import decode_audio, decode_image, encode_audio, encode_image
from app.registry import LoadedModel, load_model
from app.runner import AudioRunner, ImageRunner
from app.tokenizers.base import AudioInfo, ImageInfo

MSGPACK = "application/msgpack"


class TokenizerAPI(ls.LitAPI):
    """One model × op as LitServe serves it: decode_request reads one item, predict runs a
    batch through tokserve's runner, encode_response writes one answer."""

    def __init__(self, folder: Path, op: str, path: str, max_batch_size: int, wait_s: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=wait_s, api_path=path)
        self.folder = folder
        self.op = op

    def setup(self, device: str) -> None:
        """Load the model in LitServe's worker process, warmed up as tokserve warms its own."""
        self.model: LoadedModel = load_model(self.folder, Settings())
        info = self.model.info
        self.runner = (
            ImageRunner(self.model) if isinstance(info, ImageInfo) else AudioRunner(self.model)
        )
        self.item: Callable[[dict[str, Any]], Any] = self._reader(info)
        self.answer: Callable[[Any], bytes] = self._writer(info)

    def _reader(self, info: ImageInfo | AudioInfo) -> Callable[[dict[str, Any]], Any]:
        if self.op == "decode":
            return lambda body: np.frombuffer(base64.b64decode(body["tokens"]), "<i4").reshape(
                body["shape"]
            )
        if isinstance(info, ImageInfo):
            return lambda body: decode_image(base64.b64decode(body["data"]), info.image_size)
        return lambda body: decode_audio(
            base64.b64decode(body["data"]), info.sample_rate, info.channels
        )[0]

    def _writer(self, info: ImageInfo | AudioInfo) -> Callable[[Any], bytes]:
        if self.op == "encode":
            return lambda tokens: msgpack.packb(
                {"tokens": {"shape": list(tokens.shape), "data": tokens.tobytes()}}
            )
        if isinstance(info, ImageInfo):
            return lambda rgb: encode_image(rgb, "png")
        return lambda wave: encode_audio(wave, info.sample_rate, "wav")

    def decode_request(self, request, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
        # unannotated: LitServe then hands over the parsed JSON body
        return self.item(request)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: list[Any], **kwargs: Any) -> list[Any]:
        run = self.runner.encode_batch if self.op == "encode" else self.runner.decode_batch
        return run(x)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any, **kwargs: Any) -> Response:
        return Response(self.answer(output), media_type=MSGPACK)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--models", required=True, help="comma-separated model folder names")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve each named model's encode and decode with LitServe on 127.0.0.1:PORT."""
    args = parse_args(argv)
    settings = Settings()
    apis = []
    for name in args.models.split(","):
        folder = args.model_dir / name
        model = load_model(folder, settings)
        modality = "images" if model.modality == "image" else "audio"
        serving = model.serving
        for op in ("encode", "decode"):
            apis.append(
                TokenizerAPI(
                    folder,
                    op,
                    f"/v1/{modality}/{op}",
                    serving.max_batch_size,
                    serving.max_wait_ms / 1000,
                )
            )
    accelerator = "cuda" if str(settings.device).startswith("cuda") else "cpu"
    server = ls.LitServer(apis, accelerator=accelerator, devices=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
