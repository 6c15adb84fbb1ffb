"""A model folder's basics: its config.json, the folder its weights come from, and its version.

A model folder holds ``config.json`` (backend, modality, architecture, serving options),
``model.safetensors`` and a README.md model card. Its version is a hash of config, weights and
dtype, so a cache entry can never outlive the weights that produced it; batching options are
left out of it, so tuning them keeps the cache. A model whose tokens depend on the host's
arithmetic also hashes a fingerprint of the host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_WEIGHT_SUFFIXES = {".safetensors", ".pt2", ".jit", ".bin"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A backend's weight files outside the model folder and its source folder, from its config.
WeightFiles = Callable[[Path, dict[str, Any]], list[Path]]


class ModelLoadError(RuntimeError):
    """A model folder that cannot be served; the message names the model and the fix."""


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json; ModelLoadError naming the folder when it cannot be read."""
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder.name}: cannot read {CONFIG_FILE}: {exc}") from exc
    return config


def source_of(folder: Path, config: dict[str, Any]) -> Path | None:
    """The folder config.json's ``source`` names (relative to the model folder), if any."""
    return (folder / config["source"]).resolve() if "source" in config else None


def native_weights(folder: Path, config: dict[str, Any]) -> Path:
    """The weights file a native model folder serves: its own, or its ``source`` folder's."""
    return (source_of(folder, config) or folder) / WEIGHTS_FILE


def version_files(*folders: Path, files: Sequence[Path] = ()) -> list[Path]:
    """What a version hashes besides the config: the weight files of the model folder and its
    source folder (with the source's own config), if any, and ``files`` (weights the config
    names elsewhere, such as an exported program in a subfolder)."""
    hashed: list[Path] = []
    for index, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            own_config = path.name == CONFIG_FILE and index == 0
            if path.suffix in _WEIGHT_SUFFIXES or (path.name == CONFIG_FILE and not own_config):
                hashed.append(path)
    seen = {path.resolve() for path in hashed}
    return hashed + [path for path in files if path.resolve() not in seen]


def model_version(
    config: dict[str, Any],
    dtype: torch.dtype,
    *folders: Path,
    files: Sequence[Path] = (),
    compute: str | None = None,
) -> str:
    """blake2b of what decides the tokens, 16 hex: config.json less its ``serving`` options
    (batching never changes a token), the dtype the model runs in, ``version_files`` and, for a
    model whose tokens depend on the host, ``compute`` (its compute fingerprint)."""
    digest = hashlib.blake2b(digest_size=8)
    model_config = {key: value for key, value in config.items() if key != "serving"}
    digest.update(json.dumps(model_config, sort_keys=True).encode())
    digest.update(str(dtype).encode())
    if compute is not None:
        digest.update(compute.encode())
    for path in version_files(*folders, files=files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def hashed_inputs(
    folder: Path, config: dict[str, Any], weight_files: WeightFiles | None = None
) -> tuple[list[Path], list[Path]]:
    """The folders and extra files a model folder's version hashes (see ``version_files``); the
    extra files are those its backend's ``weight_files`` names."""
    source = source_of(folder, config)
    files = weight_files(folder, config) if weight_files is not None else []
    return [folder, *([source] if source else [])], files


def weight_states(
    folder: Path, config: dict[str, Any], weight_files: WeightFiles | None = None
) -> list[tuple[str, int, int, int]] | None:
    """(path, inode, size, mtime in ns) of each file the version hashes: replacing or rewriting
    one changes them. None while some are missing (loading then says which)."""
    try:
        folders, files = hashed_inputs(folder, config, weight_files)
        states = []
        for path in version_files(*folders, files=files):
            stat = path.stat()
            states.append((str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns))
    except (OSError, ValueError):
        return None
    return states
