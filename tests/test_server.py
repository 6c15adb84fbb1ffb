"""The real server: `tokserve serve` as a process on a free port, spoken to over loopback HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.compute import usable_cpus
from app.config import Settings
from bench.server import server_process
from tests.support import REPO_ROOT, png_bytes, wav_bytes


def encode_both(url: str) -> tuple[list[list[int]], list[list[int]]]:
    image = httpx.post(f"{url}/v1/images/encode", content=png_bytes(seed=11), timeout=30)
    audio = httpx.post(f"{url}/v1/audio/encode", content=wav_bytes(seconds=0.4), timeout=30)
    assert image.status_code == 200 and audio.status_code == 200
    return image.json()["items"][0]["tokens"], audio.json()["items"][0]["tokens"]


def test_two_fresh_processes_give_identical_tokens(repo: Path) -> None:
    with server_process(repo) as (_, first_url):
        first = encode_both(first_url)
    with server_process(repo) as (_, second_url):
        second = encode_both(second_url)
    assert first == second


def test_idle_connections_close_after_the_keep_alive_setting(repo: Path) -> None:
    with server_process(repo, TOKSERVE_KEEP_ALIVE_S="1") as (_, url):
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b'{"status":"ok"}'
        time.sleep(2.5)  # past 1 s; uvicorn's own default would keep it for 5 s
        assert connection.sock is not None
        connection.sock.settimeout(0.5)  # an open connection would time out here, not end
        assert connection.sock.recv(1) == b"", "the server should have closed the idle connection"
        connection.close()


def test_api_keys_are_split_on_commas_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKSERVE_API_KEYS", "team:a1b2, ci-key")
    assert Settings().api_keys == ["team:a1b2", "ci-key"]


def test_a_broken_model_folder_stops_start_up_with_one_clear_line(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"backend": "native", "architecture": "nope"}')
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "broken: unknown native architecture 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_while_models_load_stops_the_server_even_as_pid_1(tmp_path: Path) -> None:
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("unshare cannot make a PID namespace here (needs root)")
    codec = REPO_ROOT / "models" / "audio-rvq-24k"
    for index in range(100):  # 100 models on the shipped codec's weights: ~10 s of loading
        folder = tmp_path / f"codec-{index:03d}"
        folder.mkdir()
        config = json.loads((codec / "config.json").read_text())
        config.update(name=folder.name, source=str(codec))
        (folder / "config.json").write_text(json.dumps(config))
    serve = [sys.executable, "-m", "app.cli", "serve", "--model-dir", str(tmp_path), "--port", "0"]
    wrapper = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *serve],  # the server dies with it
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wrapper.stderr is not None
    try:
        for line in wrapper.stderr:
            if "loaded model codec-000" in line:
                break
        server = subprocess.run(["pgrep", "-P", str(wrapper.pid)], capture_output=True, text=True)
        started = time.monotonic()
        os.kill(int(server.stdout.split()[0]), signal.SIGTERM)  # PID 1 in its namespace
        assert wrapper.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
    finally:
        wrapper.kill()
        wrapper.wait()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), (None, None)],
    ids=["1.5-cpus", "half-a-cpu", "no-quota", "no-cgroup-v2"],
)
def test_media_threads_follow_the_containers_cpu_quota(
    tmp_path: Path, cpu_max: str | None, expected: int | None
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (affinity if expected is None else min(affinity, expected))
