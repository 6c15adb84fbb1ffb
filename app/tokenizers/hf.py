"""The ``transformers`` backend: public tokenizer checkpoints from a local folder, never a hub.

config.json names the model class and the folder a checkpoint was downloaded to::

    {"backend": "transformers", "class": "EncodecModel", "source": "/data/encodec_24khz",
     "options": {"bandwidth": 6.0}}

The folder is what ``save_pretrained`` writes (config.json + model.safetensors); it is loaded
with ``local_files_only`` and safetensors only. transformers is the optional ``hf`` extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from app.model_folder import ModelLoadError, source_of
from app.tokenizers.adapters import BadOption
from app.tokenizers.base import Tokenizer
from app.tokenizers.hf_audio import (
    DacCodec,
    EncodecCodec,
    MimiCodec,
    WavTokenizerCodec,
    XcodecCodec,
)
from app.tokenizers.hf_image import ChameleonTokenizer, Emu3Tokenizer, JanusTokenizer
from app.tokenizers.plugins import Backend


class Adapter(Protocol):
    """An adapter class: wraps a loaded transformers model as a Tokenizer."""

    def __call__(self, model: Any, options: dict[str, Any], device: torch.device) -> Tokenizer: ...


ADAPTERS: dict[str, Adapter] = {
    "EncodecModel": EncodecCodec,
    "DacModel": DacCodec,
    "MimiModel": MimiCodec,
    "XcodecModel": XcodecCodec,
    "WavTokenizerModel": WavTokenizerCodec,
    "Emu3VQVAE": Emu3Tokenizer,
    "JanusVQVAE": JanusTokenizer,
    "ChameleonVQVAE": ChameleonTokenizer,  # encode-only: transformers has no decoder for it
}
# How to cut a VQ model out of the multimodal checkpoint it ships in.
COMPOSITES = {
    "JanusVQVAE": "JanusForConditionalGeneration",
    "Emu3VQVAE": "Emu3ForConditionalGeneration",
    "ChameleonVQVAE": "ChameleonForConditionalGeneration",
}
HF_EXTRA_HINT = "pip install 'tokserve[hf]'"


def supported_classes() -> list[str]:
    """Model classes the transformers backend serves."""
    return sorted(ADAPTERS)


def import_transformers(name: str) -> Any:
    """The transformers module, offline; a missing install names the model and the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            f"{name}: the transformers backend needs the optional 'hf' extra: {HF_EXTRA_HINT}"
        ) from exc
    # a server's log is no terminal: no per-shard progress bars
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_checkpoint(name: str, class_name: str, expected_type: str, source: Path) -> None:
    """Refuse a folder that holds another model (or a whole multimodal model) with a fix."""
    try:
        checkpoint = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{name}: {source} is not a checkpoint folder with a readable config.json ({exc}); "
            "download it first, e.g. `hf download facebook/encodec_24khz "
            "--local-dir PATH`"
        ) from exc
    found = checkpoint.get("model_type")
    if found == expected_type:
        return
    if "vq_config" in checkpoint and class_name in COMPOSITES:
        raise ModelLoadError(
            f"{name}: {source} is a whole {found} model; save its image tokenizer once with "
            f"`{COMPOSITES[class_name]}.from_pretrained(SRC).model.vqmodel.save_pretrained(DST)` "
            "and point source at DST"
        )
    raise ModelLoadError(
        f"{name}: {source} holds a {found!r} checkpoint, but {class_name} loads {expected_type!r}"
    )


def load_pretrained(name: str, class_name: str, source: Path) -> Any:
    """``from_pretrained`` from a local folder; missing or mismatched weights are an error."""
    transformers = import_transformers(name)
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ModelLoadError(
            f"{name}: transformers {transformers.__version__} has no {class_name}; "
            "upgrade transformers"
        )
    check_checkpoint(name, class_name, model_class.config_class.model_type, source)
    try:
        model, loading = model_class.from_pretrained(
            str(source), local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot load {class_name} from {source}: {exc}") from exc
    bad = list(loading.get("missing_keys", [])) + list(loading.get("mismatched_keys", []))
    if bad:
        raise ModelLoadError(
            f"{name}: {source} lacks or mis-shapes {len(bad)} weights of {class_name} "
            f"(e.g. {sorted(map(str, bad))[:3]}); is it a {class_name} checkpoint?"
        )
    return model


def build(
    folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The model named by config.json's ``class``, loaded from ``source``, as a Tokenizer."""
    name = folder.name
    class_name = str(config.get("class"))
    if class_name not in ADAPTERS:
        raise ModelLoadError(
            f"{name}: the transformers backend serves class {supported_classes()}, "
            f"not {class_name!r}"
        )
    source = source_of(folder, config)
    if source is None:
        raise ModelLoadError(f"{name}: config.json needs 'source', the checkpoint's folder")
    model = load_pretrained(name, class_name, source).to(device=device, dtype=dtype).eval()
    try:
        return ADAPTERS[class_name](model, dict(config.get("options", {})), device)
    except BadOption as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc


BACKEND = Backend(
    build,
    summary="transformers tokenizer classes from a save_pretrained folder",
)
