"""The ``exported`` backend: encoder/decoder programs saved by torch.export (.pt2) or TorchScript.

Nothing is unpickled: programs load with ``torch.export.load`` or ``torch.jit.load``. Their
calling conventions are declared in config.json's ``program`` section::

    {"backend": "exported", "modality": "image",
     "program": {"encoder": "encoder.jit", "decoder": "decoder.jit", "vocab_size": 64000,
                 "image_size": 512, "downsample": 8, "dtype": "bfloat16"}}

image: encoder(pixels [B, 3, H, W]) -> tokens [B, h, w] (or [B, h * w]); decoder(tokens) ->
pixels; both in the range ``pixels`` declares (default [-1, 1]).
audio: encoder(wave [B, C, F * hop]) -> tokens [B, K, F]; decoder(tokens) -> wave [B, C, T].
With ``"lengths": true`` (tokserve's own convention) they also take lengths [B] (samples) and
frames [B] and mask padding themselves. A program returning a tuple has its tokens (or wave)
at ``output_index`` (default 0); the decoder always takes all K codebooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.export.passes import move_to_device_pass

from app.model_folder import DTYPES, ModelLoadError, source_of
from app.tokenizers.adapters import BadOption, FramedAudioCodec, PixelRange, check_options
from app.tokenizers.base import AudioInfo, ImageInfo, Tokenizer
from app.tokenizers.plugins import Backend

Program = Callable[..., Any]
FORMATS = (".pt2", ".jit")
COMMON = ("encoder", "decoder", "vocab_size", "dtype", "output_index")
IMAGE_KEYS = (*COMMON, "image_size", "downsample", "pixels")
AUDIO_KEYS = (*COMMON, "sample_rate", "channels", "hop_length", "codebooks", "lengths", "causal")


def load_program(path: Path, device: torch.device) -> Program:
    """A .pt2 (torch.export) or .jit (TorchScript) program on ``device``, ready to call."""
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        if device.type != "cpu":
            program = move_to_device_pass(program, device)
        return program.module()
    if path.suffix == ".jit":
        return torch.jit.load(str(path), map_location=device).eval()
    raise BadOption(f"{path.name} is neither a torch.export .pt2 nor a TorchScript .jit file")


def _pick(output: Any, index: int) -> torch.Tensor:
    """The tensor a program returned, or element ``index`` of the tuple it returned."""
    return output[index] if isinstance(output, tuple | list) else output


def _dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype the programs take (``program.dtype``, default float32)."""
    name = spec.get("dtype", "float32")
    if name not in DTYPES:
        raise BadOption(f"program.dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return DTYPES[name]


def _required(spec: dict[str, Any], key: str) -> Any:
    if key not in spec:
        raise BadOption(f"program.{key} is required")
    return spec[key]


class ExportedImageTokenizer:
    """ImageTokenizer over an encoder/decoder program pair."""

    def __init__(
        self, encoder: Program, decoder: Program, spec: dict[str, Any], device: torch.device
    ) -> None:
        check_options(spec, IMAGE_KEYS, "an exported image program")
        side = _required(spec, "image_size")
        height, width = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
        downsample = int(_required(spec, "downsample"))
        if height % downsample or width % downsample:
            raise BadOption(f"image_size {side} is not a multiple of downsample {downsample}")
        self.encoder, self.decoder = encoder, decoder
        self.dtype = _dtype(spec)
        self.output_index = int(spec.get("output_index", 0))
        self.pixels = PixelRange.from_dict(spec.get("pixels", {}))
        self.device = device
        self.info = ImageInfo(
            vocab_size=int(_required(spec, "vocab_size")),
            image_size=(height, width),
            grid=(height // downsample, width // downsample),
            downsample=downsample,
            extra={"pixels": self.pixels.to_dict()},
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> tokens [B, h, w]."""
        values = self.pixels.to_model(pixels.float()).to(self.dtype)
        tokens = _pick(self.encoder(values), self.output_index)
        return tokens.reshape(tokens.shape[0], *self.info.grid).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] -> pixels [B, 3, H, W] in [-1, 1]."""
        values = _pick(self.decoder(tokens), self.output_index)
        return self.pixels.from_model(values.float())


class ExportedAudioCodec(FramedAudioCodec):
    """AudioTokenizer over an encoder/decoder program pair (see the module docstring)."""

    def __init__(
        self, encoder: Program, decoder: Program, spec: dict[str, Any], device: torch.device
    ) -> None:
        check_options(spec, AUDIO_KEYS, "an exported audio program")
        sample_rate = int(_required(spec, "sample_rate"))
        hop = int(_required(spec, "hop_length"))
        self.encoder, self.decoder = encoder, decoder
        self.dtype = _dtype(spec)
        self.output_index = int(spec.get("output_index", 0))
        self.lengths = bool(spec.get("lengths", False))
        self.padding_safe = self.lengths or bool(spec.get("causal", False))
        self.device = device
        codebooks = int(_required(spec, "codebooks"))
        self.info = AudioInfo(
            vocab_size=int(_required(spec, "vocab_size")),
            codebooks=codebooks,
            sample_rate=sample_rate,
            channels=int(spec.get("channels", 1)),
            hop_length=hop,
            frame_rate=sample_rate / hop,
            causal=bool(spec.get("causal", False)),
            extra={"decode_codebooks": codebooks},
        )

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs = (wave.to(self.dtype), lengths) if self.lengths else (wave.to(self.dtype),)
        return _pick(self.encoder(*inputs), self.output_index)

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.info.codebooks:
            raise ValueError(
                f"this exported decoder takes all {self.info.codebooks} codebooks, "
                f"not {tokens.shape[1]}"
            )
        inputs = (tokens, frames) if self.lengths else (tokens,)
        return _pick(self.decoder(*inputs), self.output_index).float()


def weight_files(folder: Path, config: dict[str, Any]) -> list[Path]:
    """The encoder and decoder files config.json's ``program`` section names."""
    spec = config.get("program", {})
    base = source_of(folder, config) or folder
    return [base / str(_required(spec, role)) for role in ("encoder", "decoder")]


def build(
    folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The program pair config.json's ``program`` section names, as a Tokenizer on ``device``;
    ``dtype`` is not used: the programs take the dtype ``program.dtype`` declares."""
    name = folder.name
    spec = dict(config.get("program", {}))
    base = source_of(folder, config) or folder
    modality = config.get("modality")
    try:
        paths = weight_files(folder, config)
        for path in paths:
            if path.suffix not in FORMATS or not path.is_file():
                raise BadOption(f"{path} is not a .pt2 or .jit file")
        encoder, decoder = (load_program(path, device) for path in paths)
        if modality == "image":
            return ExportedImageTokenizer(encoder, decoder, spec, device)
        if modality == "audio":
            return ExportedAudioCodec(encoder, decoder, spec, device)
        raise BadOption(f"modality must be 'image' or 'audio', not {modality!r}")
    except BadOption as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot load its programs from {base}: {exc}") from exc


BACKEND = Backend(
    build,
    weight_files=weight_files,
    summary="an encoder/decoder pair of torch.export (.pt2) or TorchScript (.jit) programs",
)
