"""The README's examples run as written against the shipped models, and their outputs are right."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from bench.server import server_process
from tests.support import REPO_ROOT

README = REPO_ROOT / "README.md"


def usage_block(language: str) -> str:
    """The first ``language`` code block of the README's 'Using it' section."""
    section = README.read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"README has no {language} block under 'Using it'"
    return match.group(1)


def client_blocks() -> list[str]:
    """The python code blocks of the README's 'The Python client' section."""
    section = README.read_text().split("### The Python client", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shipped() -> Iterator[str]:
    """A server of every shipped model, as `make run` serves them; yields its URL."""
    with server_process(REPO_ROOT / "models") as (_, url):
        yield url


def test_readme_examples_round_trip_a_real_photo_and_recording(
    shipped: str, tmp_path: Path
) -> None:
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    script = usage_block("bash").replace("http://127.0.0.1:8000", shipped)
    # every curl of the README fails the script on a 4xx or 5xx, not only on no answer
    fail = 'curl() { command curl --fail-with-body "$@"; }\n'
    result = run(["bash", "-euo", "pipefail", "-c", fail + script], tmp_path)
    python = usage_block("python").replace("http://127.0.0.1:8000", shipped)
    client = run([sys.executable, "-c", python + "\nprint(len(png), len(wav))"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert client.returncode == 0, client.stderr
    assert '"status":"ready"' in result.stdout
    assert "tokserve_request_duration_seconds_count" in result.stdout
    grids = {
        name: json.loads((tmp_path / name).read_text())["items"][0]
        for name in ("image-tokens.json", "image-tokens-hq.json")
    }
    assert all(grid["shape"] == [32, 32] for grid in grids.values()), grids
    binary = msgpack.unpackb((tmp_path / "image-tokens.msgpack").read_bytes())["items"][0]
    assert (binary["dtype"], binary["shape"]) == ("uint16", [32, 32])
    assert binary["tokens"] == np.array(grids["image-tokens.json"]["tokens"], "<u2").tobytes()
    codes = json.loads((tmp_path / "audio-tokens.json").read_text())["items"][0]
    codes_hq = json.loads((tmp_path / "audio-tokens-hq.json").read_text())["items"][0]
    assert codes["codebooks"] == 8 and codes_hq["codebooks"] == 4
    assert codes["frames"] == codes_hq["frames"] > 0
    with Image.open(tmp_path / "reconstruction.png") as image:
        assert image.format == "PNG" and image.size == (256, 256)
    source = sf.info(str(REPO_ROOT / "examples" / "speech.ogg"))
    decoded = sf.info(str(tmp_path / "reconstruction.wav"))
    frame_s = 320 / 24000
    assert decoded.samplerate == 24000
    assert abs(decoded.duration - source.duration) <= frame_s


def test_readme_async_client_example_runs_as_shown(shipped: str, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    sync_block, async_block = client_blocks()
    assert sync_block == usage_block("python")  # the one the round trip above runs
    done = run(
        [sys.executable, "-c", async_block.replace("http://127.0.0.1:8000", shipped)], tmp_path
    )
    assert done.returncode == 0, done.stderr
    # 8 clips of 4 codebooks, a 32x32 grid, a WAV of the first clip
    printed = re.fullmatch(r"8 \(4, (\d+)\) \(32, 32\) (\d+)\n", done.stdout)
    assert printed and int(printed[1]) > 0 and int(printed[2]) > 1000, done.stdout


def test_readme_in_process_example_runs_as_shown() -> None:
    section = README.read_text().split("### In-process, without HTTP", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no python block under 'In-process, without HTTP'"
    done = run([sys.executable, "-c", match.group(1) + "\nprint(len(png))"], REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 1000


def test_readme_bulk_example_runs_as_shown(tmp_path: Path) -> None:
    section = README.read_text().split("### Tokenizing a dataset", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README has no bash block under 'Tokenizing a dataset'"
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    with server_process(REPO_ROOT / "models", TOKSERVE_MODELS="audio-rvq-24k") as (_, url):
        script = match.group(1).replace("http://127.0.0.1:8000", url)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PATH": path},
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[{'id': 'photo.jpg', 'shape': [32, 32]}]\n"
    images = json.loads((tmp_path / "tokens" / "images" / "manifest.json").read_text())
    speech = json.loads((tmp_path / "tokens" / "speech" / "manifest.json").read_text())
    assert images["counts"] == speech["counts"] == {"rows": 1, "errors": 0}
    assert speech["options"] == {
        "format": "webdataset",
        "codebooks": 4,
        "resize": None,
        "rows_per_shard": 10_000,
        "engine": "server",
    }
