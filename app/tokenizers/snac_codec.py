"""The ``snac`` backend: SNAC multi-scale neural audio codecs, through the ``snac`` package.

SNAC (hubertsiuzdak/snac; Orpheus TTS speaks it) quantises one latent with residual codebooks
at several rates: ``vq_strides`` [4, 2, 1] gives, at 24 kHz, codebooks of 12, 23 and 47 tokens
per second. tokserve's frame is the coarsest codebook's step (``hop_length * vq_strides[0]``
samples), so each frame holds 1, 2 and 4 tokens of the three codebooks
(``AudioInfo.tokens_per_frame``) and an item's tokens are one array [1 + 2 + 4, F]
(``tokserve_client.pack_streams``; ``unpack_streams`` gives the package's own list back).

The model folder's ``source`` is what ``SNAC.from_pretrained`` reads, kept local: config.json
with ``model.safetensors`` or ``pytorch_model.bin`` (loaded with ``weights_only``: tensors, no
code). The encoder looks both ways, so only items of one length share a forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from app.model_folder import ModelLoadError, source_of
from app.tokenizers.adapters import BadOption, FramedAudioCodec, check_options, load_package_model
from app.tokenizers.base import AudioInfo, Tokenizer
from app.tokenizers.plugins import Backend

SNAC_HINT = "pip install 'tokserve[snac]'"


class SnacCodec(FramedAudioCodec):
    """A loaded ``snac.SNAC`` behind the AudioTokenizer protocol, codebooks packed per frame."""

    def __init__(self, model: Any, device: torch.device) -> None:
        strides = [int(stride) for stride in model.vq_strides]
        coarsest = strides[0]
        self.model = model
        self.device = device
        self.padding_safe = False
        self.noisy = any(type(module).__name__ == "NoiseBlock" for module in model.modules())
        self.per_frame = tuple(coarsest // stride for stride in strides)
        # SNAC pads its input to whole windows of its local attention as well
        window = int(model.attn_window_size or 1)
        self.unit_frames = math.lcm(coarsest, window) // coarsest
        hop = int(model.hop_length) * coarsest
        self.info = AudioInfo(
            vocab_size=int(model.codebook_size),
            codebooks=len(strides),
            sample_rate=int(model.sampling_rate),
            channels=1,
            hop_length=hop,
            frame_rate=model.sampling_rate / hop,
            tokens_per_frame=self.per_frame,
            extra={"vq_strides": strides, "decode_codebooks": len(strides)},
        )

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """wave [B, 1, F * hop] -> tokens [B, sum(tokens_per_frame), at least F]."""
        codes = self.model.encode(wave)
        frames = codes[0].shape[-1]
        return torch.cat(
            [
                code.reshape(code.shape[0], frames, per_frame).transpose(1, 2)
                for code, per_frame in zip(codes, self.per_frame, strict=True)
            ],
            dim=1,
        )

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """tokens [B, rows, F] -> wave [B, 1, F * hop], F padded to whole attention windows.

        SNAC's decoder adds noise (its NoiseBlocks draw from torch's generator): each item is
        decoded alone from one fixed seed, so that it decodes the same alone, batched or again.
        """
        if not self.noisy:
            return self._decode(tokens)
        devices = [self.device] if self.device.type == "cuda" else []
        waves = []
        for item in tokens.split(1):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                waves.append(self._decode(item))
        return torch.cat(waves)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        width = tokens.shape[-1]
        padded = math.ceil(width / self.unit_frames) * self.unit_frames
        tokens = F.pad(tokens, (0, padded - width))
        codes, row = [], 0
        for per_frame in self.per_frame:
            part = tokens[:, row : row + per_frame]
            codes.append(part.transpose(1, 2).reshape(tokens.shape[0], -1))
            row += per_frame
        return self.model.decode(codes)


def import_snac(name: str) -> Any:
    """The snac package; a missing install names the model and the extra."""
    try:
        import snac
    except ImportError as exc:
        raise ModelLoadError(
            f"{name}: the snac backend needs the 'snac' package: {SNAC_HINT}"
        ) from exc
    return snac


def load_snac(name: str, source: Path) -> Any:
    """``snac.SNAC`` from the folder's config.json and weights, never a hub."""
    return load_package_model(name, source, import_snac(name).SNAC)


def build(
    folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The SNAC model in the folder ``source`` names, on ``device``."""
    name = folder.name
    try:
        check_options(config.get("options", {}), (), "snac")
    except BadOption as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    source = source_of(folder, config)
    if source is None:
        raise ModelLoadError(f"{name}: config.json needs 'source', the SNAC checkpoint's folder")
    model = load_snac(name, source).to(device=device, dtype=dtype).eval()
    return SnacCodec(model, device)


def configure(source: Path, options: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``tokserve models add NAME --backend snac --from SOURCE``."""
    return {"modality": "audio", "source": str(source), "options": options}


# the version hashes the source folder's config.json and weights as for every model folder
BACKEND = Backend(
    build,
    configure=configure,
    summary="SNAC multi-scale codecs (the snac package): codebooks at several rates",
)
