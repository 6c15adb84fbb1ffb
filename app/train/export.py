"""Write a model folder the registry serves: config.json + model.safetensors (EMA weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from app.train.config import TrainConfig


def export_model(model: nn.Module, config: TrainConfig, out: Path) -> None:
    """Write ``out/config.json`` and ``out/model.safetensors`` atomically (rename into place)."""
    out.mkdir(parents=True, exist_ok=True)
    served = {
        "name": out.name,
        "backend": "native",
        "modality": config.modality,
        "architecture": config.architecture,
        "arch": config.arch,
        "serving": config.serving,
    }
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    weights_tmp = out / "model.safetensors.tmp"
    save_file(state, str(weights_tmp))
    weights_tmp.chmod(0o644)  # safetensors writes 0600; a container user must read it
    os.replace(weights_tmp, out / "model.safetensors")
    config_tmp = out / "config.json.tmp"
    config_tmp.write_text(json.dumps(served, indent=2) + "\n")
    os.replace(config_tmp, out / "config.json")
