"""What decides the floating-point results on this host, and which dtype a model runs in.

A model's tokens depend on its weights and on the arithmetic that runs them: torch's version,
the CPU's vendor and vector units (or the GPU), oneDNN's ISA cap and the thread count. The
compute fingerprint names that arithmetic in one line; a model whose tokens carry it into their
values (a searching encoder) hashes it into its version.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Literal

import torch

from app.model_folder import DTYPES
from app.tokenizers.base import TokenizerInfo

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
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def onednn_isa_cap() -> str | None:
    """The ISA ``ONEDNN_MAX_CPU_ISA`` limits oneDNN to, upper-cased (oneDNN reads it so), or
    None where it limits nothing: unset, ALL, DEFAULT, or a name oneDNN ignores."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in BFLOAT16_ISAS | NON_BFLOAT16_ISAS else None


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX) and ``ONEDNN_MAX_CPU_ISA``
    lets oneDNN use it; elsewhere oneDNN would only emulate bfloat16. The cap is the documented
    way to run as a CPU without it."""
    cap = onednn_isa_cap()
    if cap is not None and cap not in BFLOAT16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a model asking for ``name`` runs in on ``device``: that one on CUDA; on CPU
    bfloat16 where the CPU computes in it, float32 otherwise (float16 has no fast CPU path)."""
    if device.type == "cuda" or (name == "bfloat16" and cpu_runs_bfloat16()):
        return DTYPES[name]
    return torch.float32


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
    one line: torch's version, and on CPU the vendor (MKL picks its code paths by it, so an AMD
    and an Intel CPU with the same flags can search other codes), the vector ISA ATen
    dispatches to, the bfloat16 units, the oneDNN cap and the thread count (which splits the
    sums); on CUDA the GPU, its compute capability, the CUDA version and whether float32
    convolutions run in TF32."""
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


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (cgroup v2).

    os.cpu_count() is the node's cores: a pod limited to 4 CPUs on a 64-core node would decode
    64 images at once within a memory limit sized for a few.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the limit
    return cpus


# TOKSERVE_INSTANCES=auto puts at most this many instances of a model on the CPU
AUTO_CPU_INSTANCES = 4


def auto_instances(device_type: str, cpus: int) -> int:
    """Instances of a model for TOKSERVE_INSTANCES=auto: one per GPU; on the CPU one per usable
    core up to AUTO_CPU_INSTANCES. A one-thread forward waits at no OpenMP barrier for a core
    that the event loop or a media thread holds, and these models scale poorly past one thread
    at the batch sizes served (docs/performance.md)."""
    return min(cpus, AUTO_CPU_INSTANCES) if device_type == "cpu" else 1


def split_cpu_threads(cpu_instances: int, cpus: int) -> None:
    """Give each of ``cpu_instances`` model instances on the CPU an equal share of the ``cpus``
    as torch's thread count (at least one), so instances computing at once do not oversubscribe
    the cores; one instance, or none, leaves torch's count as it is."""
    if cpu_instances > 1:
        torch.set_num_threads(max(1, cpus // cpu_instances))


def reproducibility(info: TokenizerInfo) -> Reproducibility:
    """``host`` for a tokenizer that searches its codes at encode time (``refine_steps`` > 0):
    its many steps carry the host's float rounding into the tokens, so they differ between CPUs
    (and thread counts). ``portable`` for one-pass encoders: their tokens depend only on the
    version, but for the rare rounding tie."""
    return "host" if info.extra.get("refine_steps", 0) > 0 else "portable"
