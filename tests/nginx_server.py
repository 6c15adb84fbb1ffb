"""The compose stack's balancer for tests: a real nginx (Debian's package, which `make test`
installs) running the project's own docker/nginx.conf on loopback.

Only two things in the file are adapted, and `adapt_config`'s caller can check that nothing else
was: the upstream's one `server tokserve:8000 resolve ...;` line becomes one line per replica
address (same parameters, without `resolve`: it re-resolves a DNS name, these are IP addresses,
and Debian's nginx 1.22 does not know it; compose runs nginx 1.28, which does), and `listen 80;`
becomes a free loopback port. Everything nginx writes (pid, lock, logs) goes under one folder;
only the request-body temp folders stay where Debian compiled them (/var/lib/nginx), which nginx
creates at start as root, as the tests here run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.server import stop
from tests.support import REPO_ROOT

NGINX_CONF = REPO_ROOT / "docker" / "nginx.conf"
UPSTREAM_SERVER = re.compile(r"^(?P<indent>[ \t]*)server tokserve:8000 resolve (?P<params>[^;]*);$")
LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen 80;$")


def nginx_binary() -> str:
    """Debian's nginx (in /usr/sbin, which a user's PATH may lack). Missing, the test fails
    under CI (the Makefile installs it) and skips elsewhere with the command that installs it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    message = "nginx is not installed: `make test` installs it (apt-get install nginx)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def adapt_config(upstreams: list[str], port: int) -> str:
    """docker/nginx.conf with the upstream addresses and the listen port replaced, nothing else."""
    lines = NGINX_CONF.read_text().splitlines(keepends=True)
    adapted = []
    for line in lines:
        if match := UPSTREAM_SERVER.match(line.rstrip("\n")):
            adapted += [
                f"{match['indent']}server {address} {match['params']};\n" for address in upstreams
            ]
        elif match := LISTEN.match(line.rstrip("\n")):
            adapted.append(f"{match['indent']}listen 127.0.0.1:{port};\n")
        else:
            adapted.append(line)
    return "".join(adapted)


class Nginx:
    """A running nginx: its base URL and the JSON lines of its access log."""

    def __init__(self, url: str, access_log: Path, error_log: Path) -> None:
        self.url = url
        self.access_log = access_log
        self.error_log = error_log

    def requests(self) -> list[dict]:
        """Every request logged so far, as docker/nginx.conf's `json` log_format writes it; a
        line nginx is still writing (no newline yet) is left for the next read."""
        lines = self.access_log.read_text().splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("\n")]


@contextmanager
def nginx(config: str, port: int, folder: Path) -> Iterator[Nginx]:
    """Run ``config`` (listening on ``port``) in the foreground; prefix, pid, lock and logs in
    ``folder``. Stopped gracefully (SIGQUIT) on exit, so every access log line is written."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(config)
    access_log, error_log = folder / "access.log", folder / "error.log"
    globals_ = f"daemon off; pid {folder / 'nginx.pid'}; lock_file {folder / 'nginx.lock'};"
    command = [nginx_binary(), "-p", str(folder), "-c", str(conf), "-e", str(error_log)]
    check = subprocess.run([*command, "-t", "-g", globals_], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # docker/nginx.conf logs requests to /dev/stdout and errors to /dev/stderr, as in compose.
    with access_log.open("wb") as stdout, error_log.open("ab") as stderr:
        process = subprocess.Popen([*command, "-g", globals_], stdout=stdout, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, error_log.read_text()
            try:
                httpx.get(f"{url}/metrics", timeout=2)  # answered by nginx itself
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (
                    f"nginx is not answering:\n{error_log.read_text()}"
                )
                time.sleep(0.05)
        yield Nginx(url, access_log, error_log)
    finally:
        stop(process, signal.SIGQUIT, 30)
