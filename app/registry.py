"""The model repository: finds models/<name>/config.json, builds their backends, owns them.

Each backend (native, transformers, exported) is a module of app/tokenizers with a ``build``
function; the table ``BACKENDS`` maps config.json's ``backend`` to it. What a model folder is
and how its version is hashed is app/model_folder.py's.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from app.config import Settings
from app.errors import NotFound
from app.model_folder import (
    CONFIG_FILE,
    DTYPES,
    ModelLoadError,
    WeightFiles,
    hashed_inputs,
    model_version,
    read_config,
    weight_states,
)
from app.tokenizers import exported, hf, native
from app.tokenizers.base import Tokenizer, TokenizerInfo

log = logging.getLogger("tokserve.registry")

LOAD_ATTEMPTS = 3
# ONEDNN_MAX_CPU_ISA values whose ISA computes in bfloat16 (AVX512-BF16 and every ISA above it);
# SSE41 ... AVX512_CORE_VNNI and AVX2_VNNI_2 only convert to it. Unset, ALL and DEFAULT (and
# names oneDNN does not know, which it ignores) cap nothing.
BFLOAT16_ISAS = {
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX10_1_512",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512_AMX_FP16",
}
NON_BFLOAT16_ISAS = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}
Reproducibility = Literal["portable", "host"]
Build = Callable[[Path, dict[str, Any], torch.device, torch.dtype], Tokenizer]


@dataclass(frozen=True)
class Backend:
    """One kind of model folder: ``build`` makes its tokenizer on a device in a dtype;
    ``weight_files`` names the files it loads from outside the model and source folders."""

    build: Build
    weight_files: WeightFiles | None = None


# config.json's ``backend`` -> how to serve it
BACKENDS = {
    "native": Backend(native.build),
    "transformers": Backend(hf.build),
    "exported": Backend(exported.build, exported.weight_files),
}


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
    def modality(self) -> str:
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


def onednn_isa_cap() -> str | None:
    """The ISA ``ONEDNN_MAX_CPU_ISA`` limits oneDNN to, upper-cased (oneDNN reads it so), or
    None where it limits nothing: unset, ALL, DEFAULT, or a name oneDNN ignores."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in BFLOAT16_ISAS | NON_BFLOAT16_ISAS else None


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX) and ``ONEDNN_MAX_CPU_ISA``
    lets oneDNN use it: there bfloat16 convolutions run 2-3x faster than float32; elsewhere
    oneDNN would only emulate them. The cap is the documented way to run as a CPU without it."""
    cap = onednn_isa_cap()
    if cap is not None and cap not in BFLOAT16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...), or the platform's processor name
    where /proc/cpuinfo does not say."""
    try:
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "vendor_id":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def compute_fingerprint(device: torch.device, dtype: torch.dtype) -> str:
    """What decides the floating-point results of ``dtype`` on ``device`` besides the model, as
    one line: torch's version, and on CPU the vendor (MKL picks its code paths by it: an AMD
    and an Intel CPU with the same flags gave other searched codes), the vector ISA ATen
    dispatches to, the bfloat16 units,
    the oneDNN cap and the thread count (which splits the sums); on CUDA the GPU, its compute
    capability, the CUDA version and whether float32 convolutions run in TF32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        parts = [
            torch.cuda.get_device_name(device),
            f"sm_{major}{minor}",
            f"cuda {torch.version.cuda}",
        ]
        if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
            parts.append("tf32")
    else:
        parts = [device.type, cpu_vendor(), torch.backends.cpu.get_cpu_capability()]
        parts += ["amx"] if torch.cpu._is_amx_tile_supported() else []
        parts += ["avx512_bf16"] if torch.cpu._is_avx512_bf16_supported() else []
        cap = onednn_isa_cap()
        parts += [f"onednn<={cap}"] if cap else []
        parts.append(f"threads {torch.get_num_threads()}")
    return " ".join([f"torch {torch.__version__}", *parts])


def reproducibility(info: TokenizerInfo) -> Reproducibility:
    """``host`` for a tokenizer that searches its codes at encode time (``refine_steps`` > 0):
    its many steps carry the host's float rounding into the tokens, so they differ between CPUs
    (and thread counts). ``portable`` for one-pass encoders: their tokens depend only on the
    version, but for the rare rounding tie."""
    return "host" if info.extra.get("refine_steps", 0) > 0 else "portable"


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a model asking for ``name`` runs in on ``device``: that one on CUDA; on CPU
    bfloat16 where the CPU computes in it, float32 otherwise (float16 has no fast CPU path)."""
    if device.type == "cuda" or (name == "bfloat16" and cpu_runs_bfloat16()):
        return DTYPES[name]
    return torch.float32


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
    # A trainer exporting new weights while the server starts must not leave the old weights
    # served under the new weights' version: load again until no hashed file changed meanwhile.
    for _ in range(LOAD_ATTEMPTS):
        before = weight_states(folder, config, chosen.weight_files)
        tokenizer = chosen.build(folder, config, device, dtype)
        repro = reproducibility(tokenizer.info)
        compute = compute_fingerprint(device, dtype)
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


def backend_named(folder: Path, name: str) -> Backend:
    """The backend config.json's ``backend`` names; ModelLoadError for one that is unknown."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise ModelLoadError(
            f"{folder.name}: unknown backend {name!r}; known: {', '.join(BACKENDS)}"
        )
    return backend


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
    """The loaded models, by name."""

    def __init__(self, models: list[LoadedModel]) -> None:
        self.models = {model.name: model for model in models}

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
        models = []
        for folder in folders:
            model = load_model(folder, settings)
            log.info(
                "loaded model %s (%s, %s) version %s on %s",
                model.name,
                model.backend,
                model.modality,
                model.version,
                model.device,
            )
            models.append(model)
        return cls(models)

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
