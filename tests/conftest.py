"""Fixtures shared by the test modules; tests/ci_skips.py fails skipped tests under CI=true."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.redis_server import RedisServer
from tests.support import served, settings_for, tiny_repo

pytest_plugins = ["tests.ci_skips"]


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a tiny image tokenizer and a tiny audio codec."""
    return tiny_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture
async def client(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app over the tiny repository, with the embedded cache."""
    async with served(settings_for(repo)) as http:
        yield http


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real, empty redis-server on a free loopback port; tests may kill, pause or restart it."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """Each test ends with torch's thread count as it began: loading several CPU instances of a
    model (TOKSERVE_INSTANCES, "auto" by default) splits the cores between them process-wide."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Single-threaded torch: exact tokens do not depend on how a convolution was split, and
    tiny models do not fight a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
