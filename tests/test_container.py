"""What docker/Dockerfile runs, run without Docker: its install steps, environment and entrypoint.

There is no Docker engine here, so the build stage's RUN lines run in a fresh virtual
environment standing in for /opt/venv, over a copy of what its COPY lines take, and the runtime
stage's ENV, ENTRYPOINT and HEALTHCHECK run against that. Only the PyTorch CPU index is left
out: it cannot be reached from this machine, and pip takes the same CPU build from its files.
The runtime stage's apt-get is not run here either: the jemalloc it installs is preloaded where
this machine has it (Debian's libjemalloc2) and left out where it does not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from bench.memory import CONFIGURATIONS
from bench.server import free_port, wait_ready
from tests.support import REPO_ROOT, dockerignore_excludes

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERFILES = [DOCKERFILE, REPO_ROOT / "docker" / "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per named stage (``FROM image AS name``), global ARGs under ''."""
    named: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            current = rest.split()[-1]
            named[current] = []
        else:
            named[current].append((keyword, rest))
    return named


def outside_build_context(folder: str, names: list[str]) -> list[str]:
    """The ``names`` in ``folder`` that .dockerignore keeps out of the build context, for
    shutil.copytree: a COPY here takes what Docker's would (client/ without its .venv)."""
    where = Path(folder).relative_to(REPO_ROOT)
    return [name for name in names if dockerignore_excludes(str(where / name))]


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def env_pairs(rest: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(rest))


def runtime_env(path: Path) -> dict[str, str]:
    """Every ENV of the runtime stage, merged."""
    merged: dict[str, str] = {}
    for keyword, rest in stages(path)["runtime"]:
        if keyword == "ENV":
            merged.update(env_pairs(rest))
    return merged


def loadable(library: str) -> bool:
    """Whether the dynamic loader can preload ``library`` (a soname) on this machine.

    Preloaded in a child, as the image does: jemalloc cannot be dlopen()ed into a running
    process (its thread-local storage must exist at start)."""
    result = subprocess.run(
        [sys.executable, "-c", ""],
        env={**os.environ, "LD_PRELOAD": library},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0 and not result.stderr


def test_dockerfile_install_steps_and_entrypoint_serve_ready(tmp_path: Path) -> None:
    build, runtime = stages(DOCKERFILE)["build"], stages(DOCKERFILE)["runtime"]
    prefix = tmp_path / "opt-venv"
    venv.EnvBuilder(with_pip=True).create(prefix)
    source = tmp_path / "src"
    source.mkdir()
    args = {"PATH": f"{prefix / 'bin'}:{os.environ['PATH']}"}
    environment = {**os.environ, "PATH": args["PATH"], "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for keyword, rest in build:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "COPY":
            *sources, _ = shlex.split(rest)
            for name in sources:
                origin = REPO_ROOT / name.rstrip("/")
                target = source / origin.name
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=outside_build_context)
                else:
                    shutil.copy(origin, target)
        elif keyword == "RUN" and "venv" not in rest:
            command = re.sub(r'--index-url "?\$\{TORCH_INDEX_URL\}"? ', "", rest)
            command = substitute(command, args).replace("pip install", "python -m pip install")
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=source,
                env=environment,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"

    image_tmp = tmp_path / "tmp"  # the container's only writable place
    image_tmp.mkdir()
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models", models)
    layouts = tmp_path / "layouts"
    shutil.copytree(REPO_ROOT / "layouts", layouts)
    runtime_env: dict[str, str] = {}
    for keyword, rest in runtime:
        if keyword == "ENV":
            runtime_env.update(env_pairs(rest))
    if not loadable(runtime_env["LD_PRELOAD"]):
        del runtime_env["LD_PRELOAD"]  # the loader would print its error as the first log line
    port = free_port()
    runtime_env = {
        key: value.replace("/tmp", str(image_tmp)).replace("$PATH", os.environ["PATH"])
        for key, value in runtime_env.items()
    }
    runtime_env.update(
        PATH=f"{prefix / 'bin'}:{os.environ['PATH']}",
        TOKSERVE_MODEL_DIR=str(models),
        TOKSERVE_LAYOUT_DIR=str(layouts),
        TOKSERVE_HOST="127.0.0.1",  # loopback here; 0.0.0.0 in the image
        TOKSERVE_PORT=str(port),
    )
    assert runtime_env["TOKSERVE_LOG_FORMAT"] == "json"
    entrypoint = json.loads(dict(runtime)["ENTRYPOINT"])
    healthcheck = json.loads(dict(runtime)["HEALTHCHECK"].split(" CMD ", 1)[1])

    log_path = tmp_path / "server.log"
    with log_path.open("w+b") as log:
        process = subprocess.Popen(
            entrypoint, cwd=image_tmp, env=runtime_env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(process, url, log)
            models_answer = httpx.get(f"{url}/v1/models", timeout=10).json()
            layouts_answer = httpx.get(f"{url}/v1/layouts", timeout=10).json()
            probe = subprocess.run(healthcheck, env=runtime_env, timeout=30)
        finally:
            process.terminate()
            exit_code = process.wait(timeout=60)
        log.seek(0)
        first_line = log.readline()
    assert {m["name"] for m in models_answer["models"]} == {
        "image-fsq-256",
        "image-fsq-256-hq",
        "audio-rvq-24k",
        "audio-rvq-24k-hq",
    }
    assert [layout["name"] for layout in layouts_answer["layouts"]] == ["generic"]
    assert probe.returncode == 0
    assert exit_code == 0
    assert json.loads(first_line)["level"] in {"info", "warning"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_runtime_image_preloads_jemalloc_as_bench_memory_measured_it(dockerfile: Path) -> None:
    installed = False
    for keyword, rest in stages(dockerfile)["runtime"]:
        if keyword == "RUN" and re.search(r"apt-get install .*\blibjemalloc2\b", rest):
            assert "--no-install-recommends" in rest
            assert "rm -rf /var/lib/apt/lists/*" in rest, "no package lists left in the image"
            installed = True
        if keyword == "ENV" and "LD_PRELOAD" in env_pairs(rest):
            assert installed, "LD_PRELOAD set before the library is installed"
    env = runtime_env(dockerfile)
    measured = CONFIGURATIONS["jemalloc"]
    # A soname, not a path: the loader finds it in amd64's or arm64's library directory.
    assert env["LD_PRELOAD"] == Path(measured["LD_PRELOAD"]).name == "libjemalloc.so.2"
    assert env["MALLOC_CONF"] == measured["MALLOC_CONF"]
    assert not any(name.startswith("MALLOC_") and name != "MALLOC_CONF" for name in env), (
        "glibc's malloc variables do nothing once jemalloc is preloaded"
    )


# Frees 200 MiB of 1 MiB blocks while a later block pins the heap's top, as a server's buffers
# do; glibc first sees a 16 MiB block freed, which raises its mmap threshold above 1 MiB.
FREED_MEMORY_PROBE = """
import ctypes, time
allocator = ctypes.CDLL(None)  # the process's malloc: jemalloc's when preloaded
allocator.malloc.restype = ctypes.c_void_p
allocator.malloc.argtypes = [ctypes.c_size_t]
allocator.free.argtypes = [ctypes.c_void_p]
allocator.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MiB = 1 << 20
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def touched(size):
    block = allocator.malloc(size)
    allocator.memset(block, 1, size)
    return block
allocator.free(touched(16 * MiB))
before = rss()
blocks = [touched(MiB) for _ in range(200)]
pin = touched(100 * 1024)
for block in blocks:
    allocator.free(block)
time.sleep(3)
print(round((rss() - before) / MiB))
"""


def mib_kept_after_free(env: dict[str, str]) -> int:
    """MiB of the probe's freed blocks still resident 3 s later, under ``env``'s allocator."""
    environment = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", FREED_MEMORY_PROBE],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    return int(result.stdout)


def test_preloaded_jemalloc_returns_freed_memory_that_glibc_keeps() -> None:
    env = runtime_env(DOCKERFILE)
    allocator = {name: env[name] for name in ("LD_PRELOAD", "MALLOC_CONF")}
    if not loadable(allocator["LD_PRELOAD"]):
        pytest.skip("libjemalloc2 is not installed here: apt-get install libjemalloc2")
    assert mib_kept_after_free({}) > 150, "glibc keeps it: the probe can tell them apart"
    assert mib_kept_after_free(allocator) < 20
