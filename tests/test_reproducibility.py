"""Which tokens a model promises on every host, and how its version says so.

One-pass encoders are ``portable``: their version is the same on every host. Searched encoders
(``refine_steps`` > 0) are ``host``: their version also hashes the host's compute fingerprint,
so a shared cache or a stored dataset never mixes tokens that other arithmetic produced.
``ONEDNN_MAX_CPU_ISA`` makes this process compute as an older CPU would; these tests use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from app.compute import compute_fingerprint, cpu_runs_bfloat16, cpu_vendor
from app.model_folder import model_version
from app.registry import load_model
from tests.support import REPO_ROOT, TINY_IMAGE, served, settings_for, write_model

CPU = torch.device("cpu")
# ONEDNN_MAX_CPU_ISA values below AVX512_CORE_BF16, from oneDNN's "CPU dispatcher control" page:
# a process capped to one of them has no bfloat16 arithmetic, whatever the CPU.
CAPS_WITHOUT_BFLOAT16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}
TINY_SEARCHING_IMAGE = {
    **TINY_IMAGE,
    "name": "tiny-image-hq",
    "arch": {**TINY_IMAGE["arch"], "refine_steps": 2},  # type: ignore[dict-item]
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them in /proc/cpuinfo (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bfloat16_expected(cap: str | None) -> bool:
    """Whether a process capped to ``cap`` (ONEDNN_MAX_CPU_ISA, None: unset) computes in
    bfloat16 on this CPU: AMX or AVX512-BF16 in the flags, and a cap that keeps them."""
    has_units = bool(cpu_flags() & {"amx_tile", "avx512_bf16"})
    return has_units and (cap or "").upper() not in CAPS_WITHOUT_BFLOAT16


@pytest.fixture(autouse=True, scope="module")
def onednn_started() -> None:
    """oneDNN reads ONEDNN_MAX_CPU_ISA once, at its first primitive: run one before these tests
    set the variable (to see what the service reads), so that it cannot cap the rest of the run."""
    weight = torch.ones(4, 4, 3, 3, dtype=torch.bfloat16)
    torch.nn.functional.conv2d(torch.ones(1, 4, 16, 16, dtype=torch.bfloat16), weight)


@pytest.mark.skipif(not cpu_flags(), reason="needs /proc/cpuinfo to read the CPU flags")
@pytest.mark.parametrize(
    "cap",
    [
        None,
        "ALL",
        "default",
        "SSE41",
        "AVX2",
        "avx2_vnni_2",
        "AVX512_CORE",
        "AVX512_CORE_VNNI",
        "AVX512_CORE_BF16",
        "avx512_core_amx",
        "AVX10_1_512_AMX_FP16",
    ],
)
def test_cpu_runs_bfloat16_only_where_the_cpu_flags_and_the_onednn_cap_allow_it(
    cap: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_runs_bfloat16() == bfloat16_expected(cap)


def test_compute_fingerprint_tells_apart_each_emulated_cpu_and_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The emulations: oneDNN capped below AMX, below AVX512-BF16, and to AVX2 with
    ATen's kernels too (that one needs a fresh process: ATen reads its cap at start)."""
    threads = torch.get_num_threads()
    script = (
        "import torch; from app.compute import compute_fingerprint; "
        f"torch.set_num_threads({threads}); "
        "print(compute_fingerprint(torch.device('cpu'), torch.float32))"
    )
    environ = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    emulated = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fingerprints = {}
    for cap in (None, "AVX512_CORE_BF16", "AVX512_CORE", "AVX2"):
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        fingerprints[cap] = compute_fingerprint(CPU, torch.float32)
    assert len(set(fingerprints.values())) == 4, fingerprints
    # the fresh process differs from the capped one here by ATen's vector ISA alone
    own_isa = torch.backends.cpu.get_cpu_capability()
    assert f" {own_isa} " in fingerprints["AVX2"]
    assert emulated == fingerprints["AVX2"].replace(f" {own_isa} ", " AVX2 "), emulated
    assert "onednn<=AVX2" in emulated and torch.__version__ in emulated
    try:
        torch.set_num_threads(threads + 1)
        assert compute_fingerprint(CPU, torch.float32) != fingerprints["AVX2"]
    finally:
        torch.set_num_threads(threads)


def test_a_searching_models_version_covers_the_compute_fingerprint_a_one_pass_models_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_pass = write_model(tmp_path, TINY_IMAGE)
    searching = write_model(tmp_path, TINY_SEARCHING_IMAGE)
    settings = settings_for(tmp_path)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    here = {folder.name: load_model(folder, settings) for folder in (one_pass, searching)}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = {folder.name: load_model(folder, settings) for folder in (one_pass, searching)}

    assert here["tiny-image"].reproducibility == "portable"
    assert here["tiny-image-hq"].reproducibility == "host"
    assert capped["tiny-image"].version == here["tiny-image"].version
    assert capped["tiny-image-hq"].version != here["tiny-image-hq"].version
    # a portable version is the one versions always were: config, dtype and weights
    assert here["tiny-image"].version == model_version(TINY_IMAGE, torch.float32, one_pass)
    compute = compute_fingerprint(CPU, torch.float32)  # the cap is still set
    assert "onednn<=AVX2" in compute and capped["tiny-image-hq"].compute == compute
    assert capped["tiny-image-hq"].version == model_version(
        TINY_SEARCHING_IMAGE, torch.float32, searching, compute=compute
    )


async def test_models_endpoint_says_each_models_reproducibility_and_compute(
    tmp_path: Path,
) -> None:
    write_model(tmp_path, TINY_IMAGE)
    write_model(tmp_path, TINY_SEARCHING_IMAGE)
    async with served(settings_for(tmp_path)) as client:
        listed = (await client.get("/v1/models")).json()["models"]
        one: httpx.Response = await client.get("/v1/models/tiny-image-hq")
    by_name = {model["name"]: model for model in listed}
    compute = compute_fingerprint(CPU, torch.float32)
    assert by_name["tiny-image"]["reproducibility"] == "portable"
    assert by_name["tiny-image-hq"]["reproducibility"] == "host"
    assert {model["compute"] for model in listed} == {compute}
    assert one.json()["reproducibility"] == "host" and one.json()["compute"] == compute


def test_compute_fingerprint_names_the_cpu_vendor(tmp_path: Path) -> None:
    """An AMD and an Intel CPU with the same flags search to other codes: the vendor counts."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu_vendor(cpuinfo) == "AuthenticAMD"
    fingerprint = compute_fingerprint(torch.device("cpu"), torch.float32)
    assert f" {cpu_vendor()} " in fingerprint
