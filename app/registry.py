"""The model repository: finds models/<name>/config.json, builds their backends, owns them.

config.json's ``backend`` names the backend that builds a folder's tokenizer: tokserve's own
(native, transformers, exported) or one a package installs (app/tokenizers/plugins.py). What a
model folder is
and how its version is hashed is app/model_folder.py's; which dtype a model runs in and what
arithmetic its tokens depend on is app/compute.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokserve_client.layouts import Layout, load_layouts

from app.compute import (
    Reproducibility,
    auto_instances,
    compute_fingerprint,
    reproducibility,
    run_dtype,
    split_cpu_threads,
    usable_cpus,
)
from app.config import Settings
from app.errors import NotFound
from app.model_folder import (
    CONFIG_FILE,
    ModelLoadError,
    hashed_inputs,
    model_version,
    read_config,
    weight_states,
)
from app.tokenizers.base import Modality, Tokenizer, TokenizerInfo
from app.tokenizers.plugins import Backend, find_backend

log = logging.getLogger("tokserve.registry")

LOAD_ATTEMPTS = 3


@dataclass(frozen=True)
class ServingOptions:
    """Per-model batching and precision, from config.json, overridden by the environment."""

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    dtype: str = "float32"

    @classmethod
    def resolve(cls, config: dict[str, Any], settings: Settings) -> ServingOptions:
        own = {**config.get("serving", {})}
        for key in ("max_batch_size", "max_wait_ms", "max_queue", "dtype"):
            override = getattr(settings, key)
            if override is not None:
                own[key] = override
        unknown = set(own) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown serving options {sorted(unknown)}")
        return cls(**own)


@dataclass
class LoadedModel:
    """One served tokenizer and everything the service needs to know about it."""

    name: str
    backend: str
    path: Path
    config: dict[str, Any]
    version: str
    tokenizer: Tokenizer
    serving: ServingOptions
    device: torch.device
    dtype: torch.dtype
    reproducibility: Reproducibility = "portable"
    compute: str = ""  # compute_fingerprint(device, dtype) at load
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> TokenizerInfo:
        return self.tokenizer.info

    @property
    def modality(self) -> Modality:
        return self.info.modality

    def describe(self) -> dict[str, Any]:
        """The public metadata answered by GET /v1/models."""
        return {
            "name": self.name,
            "version": self.version,
            "backend": self.backend,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "reproducibility": self.reproducibility,
            "compute": self.compute,
            **self.info.to_dict(),
            "max_batch_size": self.serving.max_batch_size,
            **self.metadata,
        }


def resolve_device(requested: str) -> torch.device:
    """``auto`` takes the first GPU when there is one, the CPU otherwise."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"TOKSERVE_DEVICE={requested} but no CUDA device is available")
    return device


def instance_devices(settings: Settings) -> list[str]:
    """The device of each model instance, in order: TOKSERVE_DEVICES (or TOKSERVE_DEVICE), each
    TOKSERVE_INSTANCES times (for "auto", as many as auto_instances gives that device)."""
    placed: list[str] = []
    for device in settings.devices or [settings.device]:
        count = settings.instances
        if count == "auto":
            count = auto_instances(resolve_device(device).type, usable_cpus())
        placed += [device] * count
    return placed


def load_model(folder: Path, settings: Settings) -> LoadedModel:
    """Read one model folder and build its backend on the configured device."""
    config = read_config(folder)
    backend = config.get("backend", "native")
    serving = ServingOptions.resolve(config, settings)
    device = resolve_device(settings.device)
    dtype = run_dtype(serving.dtype, device)
    name = config.get("name", folder.name)
    if ":" in str(name):
        raise ModelLoadError(
            f"{folder.name}: model name {name!r} contains ':', which cache keys use as their "
            "separator; choose a name without it."
        )
    chosen = backend_named(folder, backend)
    compute = compute_fingerprint(device, dtype)
    # A trainer exporting new weights while the server starts must not leave the old weights
    # served under the new weights' version: load again until no hashed file changed meanwhile.
    for _ in range(LOAD_ATTEMPTS):
        before = weight_states(folder, config, chosen.weight_files)
        tokenizer = chosen.build(folder, config, device, dtype)
        check_modality(folder, config, tokenizer)
        repro = reproducibility(tokenizer.info)
        folders, files = hashed_inputs(folder, config, chosen.weight_files)
        hashed_compute = compute if repro == "host" else None
        version = model_version(config, dtype, *folders, files=files, compute=hashed_compute)
        if weight_states(folder, config, chosen.weight_files) == before:
            break
        log.warning("%s: weight files changed while it loaded; loading it again", name)
    else:
        raise ModelLoadError(
            f"{folder.name}: its weight files changed during each of {LOAD_ATTEMPTS} loads; "
            "start the server once they are written."
        )
    return LoadedModel(
        name=name,
        backend=backend,
        path=folder,
        config=config,
        version=version,
        tokenizer=tokenizer,
        serving=serving,
        device=device,
        dtype=dtype,
        reproducibility=repro,
        compute=compute,
        metadata={key: config[key] for key in ("class", "source") if key in config},
    )


def load_instances(folder: Path, settings: Settings, devices: list[str]) -> dict[str, LoadedModel]:
    """One model folder on each of ``devices``: instance name (<device>/<index on it>) -> the
    model loaded there. Instances on one device share its weights (a forward changes none);
    every instance must have the one version, so a token means the same whichever computed it."""
    loaded: dict[str, LoadedModel] = {}
    placed: dict[str, LoadedModel] = {}
    for requested in devices:
        device = str(resolve_device(requested))
        if device not in loaded:
            loaded[device] = load_model(folder, settings.model_copy(update={"device": device}))
        model = loaded[device]
        index = sum(name.startswith(f"{device}/") for name in placed)
        placed[f"{device}/{index}"] = model
    first = next(iter(loaded.values()))
    for device, model in loaded.items():
        if model.version != first.version:
            raise ModelLoadError(
                f"{folder.name}: version {model.version} on {device} but {first.version} on "
                f"{first.device}: its tokens depend on the device's arithmetic "
                f"({model.compute} / {first.compute}); list devices of one kind in "
                "TOKSERVE_DEVICES."
            )
    return placed


def check_modality(folder: Path, config: dict[str, Any], tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer of another modality than config.json's ``modality`` (where it
    names one): the folder describes one model and holds another, a mistake to report at
    start-up rather than leave for the first request to find."""
    declared = config.get("modality", tokenizer.info.modality)
    if declared != tokenizer.info.modality:
        backend = config.get("backend", "native")
        model = config.get("class") or config.get("architecture") or "its model"
        raise ModelLoadError(
            f"{folder.name}: config.json says modality {declared!r}, but its {backend} backend "
            f"built {model} as an {tokenizer.info.modality} tokenizer; set modality to "
            f"{tokenizer.info.modality!r} or name a model of modality {declared!r}."
        )


def backend_named(folder: Path, name: str) -> Backend:
    """The backend config.json's ``backend`` names; ModelLoadError naming the folder when it is
    not installed or cannot be loaded."""
    try:
        return find_backend(name)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{folder.name}: {exc}") from exc


def build_backend(
    folder: Path, config: dict[str, Any], backend: str, device: torch.device, dtype: torch.dtype
) -> Tokenizer:
    """The tokenizer of one model folder's backend, on ``device``."""
    return backend_named(folder, backend).build(folder, config, device, dtype)


def discover(model_dirs: list[str]) -> list[Path]:
    """Every folder with a config.json directly under the given directories."""
    found = []
    for root in model_dirs:
        base = Path(root)
        if (base / CONFIG_FILE).is_file():
            found.append(base)
        elif base.is_dir():
            found += sorted(p for p in base.iterdir() if (p / CONFIG_FILE).is_file())
    return found


class ModelRegistry:
    """The loaded models, by name, each model's instances, and the sequence layouts that cover
    them."""

    def __init__(
        self,
        models: list[LoadedModel],
        layouts: dict[str, Layout] | None = None,
        instances: dict[str, dict[str, LoadedModel]] | None = None,
    ) -> None:
        self.models = {model.name: model for model in models}
        self.layouts = layouts or {}
        # model name -> instance name (<device>/<index on it>) -> the model as loaded there
        self.instances = instances or {model.name: {"0": model} for model in models}

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        folders = discover(settings.model_dir)
        if settings.models:
            wanted = set(settings.models)
            missing = wanted - {f.name for f in folders}
            if missing:
                raise ModelLoadError(
                    f"TOKSERVE_MODELS names {sorted(missing)}, not found in {settings.model_dir}"
                )
            folders = [f for f in folders if f.name in wanted]
        devices = instance_devices(settings)
        split_cpu_threads(sum(resolve_device(d).type == "cpu" for d in devices), usable_cpus())
        models, instances = [], {}
        for folder in folders:
            placed = load_instances(folder, settings, devices)
            model = next(iter(placed.values()))
            log.info(
                "loaded model %s (%s, %s) version %s, instances %s",
                model.name,
                model.backend,
                model.modality,
                model.version,
                ", ".join(placed),
            )
            models.append(model)
            instances[model.name] = placed
        figures = {model.name: model.info.to_dict() for model in models}
        return cls(models, load_layouts(Path(settings.layout_dir), figures), instances)

    def get(self, name: str | None, modality: str) -> LoadedModel:
        """The named model, or the only/first model of the modality when no name is given."""
        if name is None:
            for model in self.models.values():
                if model.modality == modality:
                    return model
            raise NotFound(f"No {modality} model is loaded; loaded models: {self.names()}.")
        named = self.models.get(name)
        if named is None or named.modality != modality:
            known = [m.name for m in self.models.values() if m.modality == modality]
            raise NotFound(f"Unknown {modality} model {name!r}; known {modality} models: {known}.")
        return named

    def names(self) -> list[str]:
        return sorted(self.models)
