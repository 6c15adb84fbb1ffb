"""What docker/Dockerfile runs, run without Docker: its install steps, environment and entrypoint.

There is no Docker engine here, so the build stage's RUN lines run in a fresh virtual
environment standing in for /opt/venv, over a copy of what its COPY lines take, and the runtime
stage's ENV, ENTRYPOINT and HEALTHCHECK run against that. Only the PyTorch CPU index is left
out: it cannot be reached from this machine, and pip takes the same CPU build from its files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import httpx

from bench.server import free_port, wait_ready
from tests.support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


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


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def env_pairs(rest: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(rest))


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
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
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
    runtime_env: dict[str, str] = {}
    for keyword, rest in runtime:
        if keyword == "ENV":
            runtime_env.update(env_pairs(rest))
    port = free_port()
    runtime_env = {
        key: value.replace("/tmp", str(image_tmp)).replace("$PATH", os.environ["PATH"])
        for key, value in runtime_env.items()
    }
    runtime_env.update(
        PATH=f"{prefix / 'bin'}:{os.environ['PATH']}",
        TOKSERVE_MODEL_DIR=str(models),
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
    assert probe.returncode == 0
    assert exit_code == 0
    assert json.loads(first_line)["level"] in {"info", "warning"}
