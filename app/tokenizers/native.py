"""The ``native`` backend: the architectures defined in this repository, with their weights.

config.json names the architecture and its constructor arguments; the weights are the folder's
model.safetensors, or that of the folder ``source`` names (one set of weights, two configs)::

    {"backend": "native", "modality": "image", "architecture": "fsq_image", "arch": {...}}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file

from app.model_folder import ModelLoadError, native_weights
from app.tokenizers.audio import RVQAudioCodec
from app.tokenizers.base import Tokenizer
from app.tokenizers.image import FSQImageTokenizer
from app.tokenizers.plugins import Backend

NATIVE_ARCHITECTURES: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "fsq_image": FSQImageTokenizer.from_config,
    "rvq_audio": RVQAudioCodec.from_config,
}


def build_native(folder: Path, config: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a native architecture from config.json and load its model.safetensors."""
    arch_name = config.get("architecture")
    if arch_name not in NATIVE_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder.name}: unknown native architecture {arch_name!r}; "
            f"known: {sorted(NATIVE_ARCHITECTURES)}"
        )
    model = NATIVE_ARCHITECTURES[arch_name](config.get("arch", {}))
    weights = native_weights(folder, config)
    if not weights.is_file():
        raise ModelLoadError(f"{folder.name}: {weights} is missing")
    model.load_state_dict(load_file(str(weights)))
    return model


def for_inference(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """``module`` in eval mode on ``device`` in ``dtype``. On CPU its 2-D convolution weights
    are stored channels-last, which oneDNN runs faster; a rare token rounds the other way."""
    module = module.to(device=device, dtype=dtype).eval()
    if device.type == "cpu":
        # Module.to takes memory_format at run time; its type stubs omit it
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def build(
    folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The folder's native model on ``device`` in ``dtype``, ready to serve."""
    return cast(Tokenizer, for_inference(build_native(folder, config), device, dtype))


BACKEND = Backend(
    build,
    summary="the architectures of this repository (app/tokenizers), with their weights",
)
