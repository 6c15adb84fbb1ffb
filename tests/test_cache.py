"""Token cache: keys, packing, in-process LRU, a real Redis under faults, single-flight."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load_file

from app import compute, registry
from app.cache import MemoryCache, RedisCache, cache_key, canonical_params, create_cache
from app.cache.format import pack_array, unpack_array
from app.cache.redis import _redis_client
from app.config import Settings
from app.model_folder import DTYPES, ModelLoadError, model_version
from app.registry import load_model
from app.single_flight import SingleFlight
from app.tokenizers import native
from app.tokenizers.image import FSQImageTokenizer
from tests.redis_server import RedisServer
from tests.support import TINY_AUDIO, TINY_IMAGE, write_model

TIMEOUT_MS = 50.0
TIMEOUT_S = TIMEOUT_MS / 1000
PATIENT_MS = 250.0  # for calls that must succeed (see patient_cache)
UNHURRIED_MS = 2000.0  # for calls that must succeed where no timing is tested
# Timing bounds, measured on this 2-core machine at load 4-5 (two busy loops beside the tests
# and other work): one call to a paused Redis returned 0.2-48 ms after its 50 ms timeout (88
# ms once within the whole suite), but the quickest of three in a row at most 6.1 ms after it
# (750 triples); a killed Redis refused one call within 0.4-35 ms, the quickest of three
# within 0.5 ms. So the tests time three calls and bound the quickest, at 2.5x the worst.
QUICKEST_OVERSHOOT_S = 0.015
QUICKEST_REFUSAL_S = 0.005
BREAKER_FAILURES = 3
COOLDOWN_S = 0.3
TOKENS = np.arange(16 * 16, dtype=np.int64).reshape(16, 16) % 1000
KEY = cache_key("tiny-image", "v1", "encode", "resize=crop", b"png bytes")
RESULTS = ("hit", "miss", "error", "invalid")


def cache_requests(result: str) -> float:
    """Current value of tokserve_cache_requests_total{result}."""
    value = REGISTRY.get_sample_value("tokserve_cache_requests_total", {"result": result})
    return value or 0.0


def cache_calls(backend: str, op: str) -> float:
    """Calls timed so far in tokserve_cache_duration_seconds{backend, op}."""
    labels = {"backend": backend, "op": op}
    value = REGISTRY.get_sample_value("tokserve_cache_duration_seconds_count", labels)
    return value or 0.0


def cache_seconds(backend: str, op: str) -> float:
    """Seconds summed so far in tokserve_cache_duration_seconds{backend, op}."""
    labels = {"backend": backend, "op": op}
    return REGISTRY.get_sample_value("tokserve_cache_duration_seconds_sum", labels) or 0.0


def elapsed_s(start: float) -> float:
    """Seconds since ``start`` (a perf_counter reading)."""
    return time.perf_counter() - start


def commands_processed(admin: redis.Redis) -> int:
    """Commands the server has executed so far (INFO stats)."""
    return int(admin.info("stats")["total_commands_processed"])


async def commands_settled(admin: redis.Redis) -> int:
    """The command count once Redis has run what queued up while it was stopped."""
    count = commands_processed(admin)
    for _ in range(50):
        await asyncio.sleep(0.01)
        latest = commands_processed(admin)
        if latest == count + 1:  # only our own INFO ran in between
            return latest
        count = latest
    pytest.fail("Redis kept executing commands after it was resumed")


async def open_breaker(server: RedisServer, cache: RedisCache) -> None:
    """Pause the server and fail enough lookups (each one timing out) to open the breaker."""
    server.pause()
    for _ in range(BREAKER_FAILURES):
        await cache.get_many([KEY])
    assert cache.breaker_open


async def probe_next(server: RedisServer, cache: RedisCache) -> None:
    """Store KEY, open the breaker, resume the server and wait out the cool-down: the next
    call is the breaker's probe, to a Redis that holds KEY."""
    await cache.set_many([(KEY, TOKENS)])
    await open_breaker(server, cache)
    server.resume()
    await asyncio.sleep(COOLDOWN_S + 0.05)


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[RedisCache]:
    """A RedisCache on the test server with a 50 ms timeout and a short breaker cool-down."""
    redis_cache = RedisCache(
        redis_server.url,
        timeout_ms=TIMEOUT_MS,
        ttl_s=3600,
        breaker_failures=BREAKER_FAILURES,
        breaker_cooldown_s=COOLDOWN_S,
    )
    yield redis_cache
    await redis_cache.close()


@pytest.fixture
async def patient_cache(redis_server: RedisServer) -> AsyncIterator[RedisCache]:
    """Like ``cache``, but allowing 250 ms a call, for tests that need calls to succeed: a
    fresh connection (a probe after the cool-down to a just-resumed server, or a first call)
    took more than 50 ms about once in ten runs at load 5."""
    redis_cache = RedisCache(
        redis_server.url,
        timeout_ms=PATIENT_MS,
        breaker_failures=BREAKER_FAILURES,
        breaker_cooldown_s=COOLDOWN_S,
    )
    yield redis_cache
    await redis_cache.close()


@pytest.fixture
def cache_log(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> pytest.LogCaptureFixture:
    """Records of the tokserve.cache logger from DEBUG up, also after an app in this session
    set tokserve's loggers not to propagate (app/logs.py)."""
    logger = logging.getLogger("tokserve.cache")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    caplog.set_level(logging.DEBUG, logger=logger.name)
    return caplog


def cache_records(log: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(level, message) of each record the cache logged, in order."""
    return [(record.levelname, record.getMessage()) for record in log.records]


@pytest.fixture
def cluster_server() -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning all 16384 slots."""
    server = RedisServer(cluster=True)
    try:
        server.start()
        with server.client() as admin:
            admin.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            deadline = time.monotonic() + 10
            while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "cluster never became ready"
                time.sleep(0.02)
        yield server
    finally:
        server.close()


@pytest.fixture
def sentinel_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A Redis Sentinel monitoring the test server as master ``tokserve``."""
    server = RedisServer(
        f"sentinel monitor tokserve 127.0.0.1 {redis_server.port} 1", sentinel=True
    )
    try:
        server.start()
        yield server
    finally:
        server.close()


# --- keys ----------------------------------------------------------------------------------


def test_cache_key_is_tok_model_version_op_params_and_blake2b_128_of_the_bytes() -> None:
    digest = hashlib.blake2b(b"png bytes", digest_size=16).hexdigest()
    key = cache_key("tiny-image", "v1", "encode", "resize=crop", b"png bytes")
    assert key == f"tok:tiny-image:v1:encode:resize=crop:{digest}"
    assert len(digest) == 32


def test_cache_key_changes_when_model_version_op_params_or_bytes_change() -> None:
    variants = [
        ("tiny-image", "v1", "encode", "resize=crop", b"png bytes"),
        ("other-image", "v1", "encode", "resize=crop", b"png bytes"),
        ("tiny-image", "v2", "encode", "resize=crop", b"png bytes"),
        ("tiny-image", "v1", "decode", "resize=crop", b"png bytes"),
        ("tiny-image", "v1", "encode", "resize=pad", b"png bytes"),
        ("tiny-image", "v1", "encode", "resize=crop", b"png bytez"),
    ]
    assert len({cache_key(*variant) for variant in variants}) == len(variants)


@pytest.mark.parametrize("field", ["model", "version", "op"])
def test_cache_key_refuses_a_colon_in_model_version_or_op_naming_the_field(field: str) -> None:
    parts: dict[str, Any] = {"model": "m", "version": "v", "op": "op", "params": "", "data": b""}
    parts[field] = "a:b"
    expected = f"cache key {field} must not contain ':' (got 'a:b')"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        cache_key(**parts)


def test_canonical_params_are_sorted_so_argument_order_does_not_change_the_key() -> None:
    assert canonical_params(resize="crop", n_q=8) == "n_q=8,resize=crop"
    assert canonical_params(n_q=8, resize="crop") == canonical_params(resize="crop", n_q=8)


# --- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "stored"),
    [
        (np.arange(1024, dtype=np.int64).reshape(32, 32), np.uint16),
        (np.array([[65535, 0]], dtype=np.int32), np.uint16),
        (np.array([-1, 5], dtype=np.int64), np.int32),
        (np.array([0, 65536], dtype=np.int64), np.int32),
        (np.array([-(2**31), 2**31 - 1], dtype=np.int64), np.int32),
        (np.array([0, 2**31], dtype=np.int64), np.int64),
        (np.array([-(2**31) - 1, 0], dtype=np.int64), np.int64),
        (np.array([-(2**63), 2**63 - 1], dtype=np.int64), np.int64),
        (np.array([2**63 - 1], dtype=np.uint64), np.int64),
        (np.array([200, 3], dtype=np.uint8), np.uint8),
        (np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32), np.float32),
        (np.array([1.5, -2.25], dtype=">f4"), np.float32),
        (np.array([0.5, 65504], dtype=np.float16), np.float16),
        (np.array([1 / 3, 1e300], dtype=np.float64), np.float64),
        (np.zeros((0, 4), dtype=np.int64), np.uint16),
        (np.zeros((2**32 - 1, 0), dtype=np.int64), np.uint16),
        (np.array(7, dtype=np.int64), np.uint16),
        (np.full((1,) * 32, 9, dtype=np.int64), np.uint16),
    ],
    ids=[
        "uint16-grid",
        "uint16-edge",
        "int32-neg",
        "int32-above-uint16",
        "int32-edges",
        "int64-above-int32",
        "int64-below-int32",
        "int64-edges",
        "uint64-in-int64",
        "uint8",
        "float32",
        "float32-big-endian",
        "float16",
        "float64",
        "empty",
        "largest-dim",
        "0d",
        "32-dims",
    ],
)
def test_pack_round_trips_values_and_shape_in_the_narrowest_dtype(
    tokens: np.ndarray, stored: type
) -> None:
    restored = unpack_array(pack_array(tokens))
    assert restored.dtype == np.dtype(stored)
    assert restored.shape == tokens.shape
    np.testing.assert_array_equal(restored, tokens)


def test_pack_uses_two_bytes_per_token_when_the_vocabulary_fits_uint16() -> None:
    tokens = np.arange(65536, dtype=np.int64).reshape(256, 256)
    assert len(pack_array(tokens)) == 1 + 1 + 4 * 2 + 2 * tokens.size


def test_packed_bytes_are_dtype_code_ndim_shape_then_values_little_endian() -> None:
    # what every replica, whatever its version, reads back: the format must not drift
    blob = pack_array(np.array([[1, 2, 258]], dtype=np.int64))
    assert blob == b"\x02\x02" + b"\x01\x00\x00\x00\x03\x00\x00\x00" + b"\x01\x00\x02\x00\x02\x01"


def test_pack_reads_non_contiguous_and_big_endian_arrays_correctly() -> None:
    tokens = np.arange(64, dtype=">i8").reshape(8, 8)[:, ::2]
    np.testing.assert_array_equal(unpack_array(pack_array(tokens)), tokens)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "cached value shorter than its header"),
        (b"\x02", "cached value shorter than its header"),
        (b"\x02\x00", "cached value length 2 does not match shape ()"),
        (b"\x63\x01\x02\x00\x00\x00\x00\x00\x00\x00", "cached value has unknown dtype code 99"),
        (b"\x00\x00\x00\x00", "cached value has unknown dtype code 0"),
        (b"\x08\x00\x00\x00", "cached value has unknown dtype code 8"),
        (b"\x02\x02\x02\x00\x00\x00", "cached value shorter than its shape"),
        (
            pack_array(np.arange(10, dtype=np.int64))[:-1],
            "cached value length 25 does not match shape (10,)",
        ),
        (
            pack_array(np.arange(10, dtype=np.int64)) + b"\x00",
            "cached value length 27 does not match shape (10,)",
        ),
        (b"\x02\x21" + b"\x01\x00\x00\x00" * 33 + b"\x00\x00", "cached value claims 33 dimensions"),
        (b"\x02\xff" + b"\x01\x00\x00\x00" * 255, "cached value claims 255 dimensions"),
    ],
    ids=[
        "empty",
        "no-ndim",
        "header-only",
        "unknown-dtype",
        "dtype-code-0",
        "dtype-code-8",
        "short-shape",
        "truncated",
        "trailing",
        "ndim-33",
        "ndim-255",
    ],
)
def test_unpack_rejects_garbage_with_a_value_error_saying_what_is_wrong(
    blob: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        unpack_array(blob)


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        (np.zeros(3, dtype=np.bool_), TypeError, "cannot pack arrays of dtype bool"),
        (np.zeros(3, dtype=np.complex64), TypeError, "cannot pack arrays of dtype complex64"),
        (np.zeros(3, dtype=np.longdouble), TypeError, "cannot pack arrays of dtype float128"),
        (np.array([2**63], dtype=np.uint64), ValueError, "integer values do not fit in int64"),
        (np.array([2**64 - 1], dtype=np.uint64), ValueError, "integer values do not fit in int64"),
        (np.zeros((1,) * 33), ValueError, f"cannot pack an array of shape {(1,) * 33}"),
        (np.zeros((2**32, 0)), ValueError, "cannot pack an array of shape (4294967296, 0)"),
    ],
    ids=["bool", "complex64", "float128", "uint64-2**63", "uint64-max", "33-dims", "dim-2**32"],
)
def test_pack_refuses_what_it_cannot_store_saying_why(
    values: np.ndarray, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        pack_array(values)


# --- memory cache --------------------------------------------------------------------------


async def test_memory_cache_evicts_the_least_recently_used_entry_past_max_bytes() -> None:
    tokens = np.arange(100, dtype=np.int64)
    entry_bytes = len("k1") + len(pack_array(tokens))
    memory = MemoryCache(max_bytes=3 * entry_bytes, ttl_s=60)
    await memory.set_many([("k1", tokens), ("k2", tokens), ("k3", tokens)])
    await memory.get_many(["k1"])
    await memory.set_many([("k4", tokens)])
    found = await memory.get_many(["k1", "k2", "k3", "k4"])
    assert [entry is not None for entry in found] == [True, False, True, True]
    assert memory.bytes_held == 3 * entry_bytes


async def test_memory_cache_skips_an_item_larger_than_its_whole_budget() -> None:
    memory = MemoryCache(max_bytes=100, ttl_s=60)
    small = np.arange(10, dtype=np.int64)
    await memory.set_many([("big", np.arange(1000, dtype=np.int64)), ("small", small)])
    found = await memory.get_many(["big", "small"])
    assert found[0] is None
    np.testing.assert_array_equal(found[1], small)  # the items after it are still stored
    assert memory.bytes_held == len("small") + len(pack_array(small))


async def test_memory_cache_forgets_entries_after_their_ttl() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=0.05)
    await memory.set_many([(KEY, TOKENS)])
    assert (await memory.get_many([KEY]))[0] is not None
    await asyncio.sleep(0.08)
    assert await memory.get_many([KEY]) == [None]
    assert memory.bytes_held == 0


async def test_memory_cache_reports_the_bytes_it_holds_in_the_gauge() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=60)
    await memory.set_many([(KEY, TOKENS)])
    assert REGISTRY.get_sample_value("tokserve_cache_bytes") == memory.bytes_held > 0
    await memory.close()
    assert REGISTRY.get_sample_value("tokserve_cache_bytes") == 0


async def test_get_many_counts_one_hit_or_miss_per_key() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=60)
    await memory.set_many([(KEY, TOKENS)])
    hits, misses = cache_requests("hit"), cache_requests("miss")
    await memory.get_many([KEY, "absent-1", KEY, "absent-2", "absent-3"])
    assert cache_requests("hit") - hits == 2
    assert cache_requests("miss") - misses == 3


@pytest.fixture(params=["memory", "redis"])
async def either_cache(request: pytest.FixtureRequest) -> AsyncIterator[MemoryCache | RedisCache]:
    """The in-process cache, then a RedisCache on a test server: what both must do alike."""
    if request.param == "memory":
        yield MemoryCache(max_bytes=1 << 20, ttl_s=60)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_cache = RedisCache(server.url, timeout_ms=UNHURRIED_MS)
    yield redis_cache
    await redis_cache.close()


async def test_each_value_its_fits_refuses_reads_as_a_miss_counted_invalid_and_logged(
    either_cache: MemoryCache | RedisCache, cache_log: pytest.LogCaptureFixture
) -> None:
    await either_cache.set_many([("tok:b", TOKENS), (KEY, TOKENS), ("tok:c", TOKENS[:2])])
    before = {result: cache_requests(result) for result in RESULTS}
    refuse, accept = (lambda tokens: False), (lambda tokens: tokens.shape == (16, 16))
    found = await either_cache.get_many(["tok:b", KEY, "tok:c"], fits=[refuse, accept, refuse])
    assert (found[0], found[2]) == (None, None)
    np.testing.assert_array_equal(found[1], TOKENS)
    moved = {result: cache_requests(result) - before[result] for result in RESULTS}
    assert moved == {"hit": 1, "miss": 0, "error": 0, "invalid": 2}
    assert cache_records(cache_log) == [
        ("WARNING", "cached uint16[16, 16] does not fit its key; a miss"),
        ("WARNING", "cached uint16[2, 16] does not fit its key; a miss"),
    ]


async def test_each_get_and_set_is_timed_in_the_duration_histogram(
    either_cache: MemoryCache | RedisCache,
) -> None:
    backend = "memory" if isinstance(either_cache, MemoryCache) else "redis"
    gets, sets = cache_calls(backend, "get"), cache_calls(backend, "set")
    seconds = cache_seconds(backend, "get") + cache_seconds(backend, "set")
    await either_cache.set_many([(KEY, TOKENS), ("tok:b", TOKENS)])
    await either_cache.get_many([KEY, "tok:b", "tok:c"])
    await either_cache.get_many([KEY])
    assert (cache_calls(backend, "get") - gets, cache_calls(backend, "set") - sets) == (2, 1)
    spent_s = cache_seconds(backend, "get") + cache_seconds(backend, "set") - seconds
    assert 0 < spent_s < 5


async def test_an_array_that_cannot_be_packed_is_left_out_counted_and_logged(
    cache_log: pytest.LogCaptureFixture,
) -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=60)
    errors = cache_requests("error")
    await memory.set_many([("tok:flags", np.ones(3, dtype=np.bool_)), (KEY, TOKENS)])
    assert cache_requests("error") - errors == 1
    assert cache_records(cache_log) == [
        ("WARNING", "not caching tok:flags: cannot pack arrays of dtype bool")
    ]
    assert memory.bytes_held == len(KEY) + len(pack_array(TOKENS))
    np.testing.assert_array_equal((await memory.get_many([KEY]))[0], TOKENS)


async def test_memory_cache_with_ttl_0_keeps_entries_until_they_are_evicted() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=0)
    await memory.set_many([(KEY, TOKENS)])
    np.testing.assert_array_equal((await memory.get_many([KEY]))[0], TOKENS)


async def test_memory_cache_keeps_an_item_exactly_its_whole_budget() -> None:
    size = len(KEY) + len(pack_array(TOKENS))
    memory = MemoryCache(max_bytes=size, ttl_s=60)
    await memory.set_many([(KEY, TOKENS)])
    np.testing.assert_array_equal((await memory.get_many([KEY]))[0], TOKENS)
    assert memory.bytes_held == size


async def test_memory_cache_storing_a_key_again_replaces_its_value_and_bytes() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=60)
    other = np.array([[1, 2, 3]], dtype=np.int64)
    await memory.set_many([(KEY, TOKENS)])
    await memory.set_many([(KEY, other)])
    np.testing.assert_array_equal((await memory.get_many([KEY]))[0], other)
    assert memory.bytes_held == len(KEY) + len(pack_array(other))


async def test_memory_cache_gauge_drops_when_a_lookup_finds_an_entry_expired() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=0.05)
    await memory.set_many([(KEY, TOKENS)])
    await asyncio.sleep(0.08)
    await memory.get_many([KEY])
    assert REGISTRY.get_sample_value("tokserve_cache_bytes") == 0


async def test_memory_cache_close_forgets_every_entry() -> None:
    memory = MemoryCache(max_bytes=1 << 20, ttl_s=60)
    await memory.set_many([(KEY, TOKENS)])
    await memory.close()
    assert memory.bytes_held == 0
    assert await memory.get_many([KEY]) == [None]
    await memory.set_many([(KEY, TOKENS)])
    assert memory.bytes_held == len(KEY) + len(pack_array(TOKENS))


async def test_memory_cache_is_always_reachable() -> None:
    assert await MemoryCache(max_bytes=1 << 20, ttl_s=60).ping() is True


# --- redis cache ---------------------------------------------------------------------------


async def test_redis_cache_answers_hits_and_misses_with_one_strlen_pipeline_and_one_mget(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    other = np.array([[1, 2, 3]], dtype=np.int64)
    await cache.set_many([("tok:a", TOKENS), ("tok:c", other)])
    redis_server.client().config_resetstat()
    found = await cache.get_many(["tok:a", "tok:b", "tok:c"])
    np.testing.assert_array_equal(found[0], TOKENS)
    assert found[1] is None
    np.testing.assert_array_equal(found[2], other)
    stats = redis_server.client().info("commandstats")
    assert stats["cmdstat_strlen"]["calls"] == 3
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats


async def test_redis_cache_skips_the_mget_when_no_key_is_present(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    redis_server.client().config_resetstat()
    assert await cache.get_many(["tok:a", "tok:b"]) == [None, None]
    assert "cmdstat_mget" not in redis_server.client().info("commandstats")


async def test_large_values_are_written_and_read_within_a_deadline_that_grows_with_their_bytes(
    cache: RedisCache,
) -> None:
    # 32 x 2 MB cannot move in the 50 ms timeout; at the 25 MB/s floor they get 2.6 s.
    rng = np.random.default_rng(0)
    items = [
        (f"tok:big{i}", rng.integers(0, 2**16, (8, 125_000), dtype=np.int64)) for i in range(32)
    ]
    errors = cache_requests("error")
    await cache.set_many(items)
    found = await cache.get_many([key for key, _ in items])
    for (_, tokens), value in zip(items, found, strict=True):
        np.testing.assert_array_equal(value, tokens)
    assert cache_requests("error") == errors
    assert not cache.breaker_open


@pytest.mark.parametrize(
    ("ttl_s", "lowest_s", "highest_s"),
    [
        (3600, 3590, 3600),
        (None, 7 * 24 * 3600 - 10, 7 * 24 * 3600),  # the default: a week
        (0, -1, -1),  # no expiry
    ],
    ids=["1h", "default-a-week", "0-never-expires"],
)
async def test_redis_cache_sets_the_configured_ttl_on_every_key(
    ttl_s: float | None, lowest_s: int, highest_s: int, redis_server: RedisServer
) -> None:
    ttl: dict[str, Any] = {} if ttl_s is None else {"ttl_s": ttl_s}
    cache = RedisCache(redis_server.url, timeout_ms=UNHURRIED_MS, **ttl)
    try:
        await cache.set_many([("tok:a", TOKENS), ("tok:b", TOKENS)])
    finally:
        await cache.close()
    for key in ("tok:a", "tok:b"):
        assert lowest_s <= redis_server.client().ttl(key) <= highest_s


async def test_redis_cache_keys_with_a_ttl_under_a_second_expire_after_it(
    redis_server: RedisServer,
) -> None:
    cache = RedisCache(redis_server.url, timeout_ms=UNHURRIED_MS, ttl_s=0.2)
    try:
        await cache.set_many([(KEY, TOKENS)])
        await asyncio.sleep(0.3)
        assert await cache.get_many([KEY]) == [None]
    finally:
        await cache.close()
    assert not redis_server.client().exists(KEY)


async def test_garbage_stored_under_a_key_reads_as_a_miss_and_counts_an_error(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    redis_server.client().set(KEY, b"\x02\x01not tokens")
    errors = cache_requests("error")
    assert await cache.get_many([KEY]) == [None]
    assert cache_requests("error") - errors == 1
    assert not cache.breaker_open


async def test_each_unreadable_value_is_a_miss_counted_as_an_error_and_logged(
    redis_server: RedisServer, patient_cache: RedisCache, cache_log: pytest.LogCaptureFixture
) -> None:
    admin = redis_server.client()
    admin.set("tok:bad1", b"\x02\x01\x03\x00\x00\x00\x01\x00")  # 3 uint16 claimed, 1 stored
    admin.set("tok:bad2", b"\x63\x00\x00\x00")
    await patient_cache.set_many([(KEY, TOKENS)])
    before = {result: cache_requests(result) for result in RESULTS}
    found = await patient_cache.get_many(["tok:bad1", KEY, "tok:bad2"])
    assert (found[0], found[2]) == (None, None)
    np.testing.assert_array_equal(found[1], TOKENS)
    moved = {result: cache_requests(result) - before[result] for result in RESULTS}
    assert moved == {"hit": 1, "miss": 0, "error": 2, "invalid": 0}
    unreadable = "cached value unreadable, treating as a miss: "
    assert cache_records(cache_log) == [
        ("WARNING", f"{unreadable}cached value length 8 does not match shape (3,)"),
        ("WARNING", f"{unreadable}cached value has unknown dtype code 99"),
    ]


async def test_killed_redis_reads_as_misses_before_the_timeout_and_counts_errors(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.set_many([(KEY, TOKENS)])
    redis_server.kill()
    errors = cache_requests("error")
    lookups_s = []
    for _ in range(BREAKER_FAILURES):  # each one goes out: the breaker opens after the third
        start = time.perf_counter()
        assert await cache.get_many([KEY, "tok:b", "tok:c"]) == [None, None, None]
        lookups_s.append(elapsed_s(start))
    assert min(lookups_s) < QUICKEST_REFUSAL_S, lookups_s
    assert cache_requests("error") - errors == 3 * BREAKER_FAILURES


async def test_set_many_to_killed_redis_returns_quietly_and_counts_errors(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    redis_server.kill()
    errors = cache_requests("error")
    await cache.set_many([(KEY, TOKENS), ("tok:b", TOKENS)])
    assert cache_requests("error") - errors == 2


async def test_restarted_redis_serves_hits_again_within_5s_with_the_same_cache_object(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.set_many([(KEY, TOKENS)])
    assert (await cache.get_many([KEY]))[0] is not None
    redis_server.restart()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        await cache.set_many([(KEY, TOKENS)])
        found = (await cache.get_many([KEY]))[0]
        if found is not None:
            np.testing.assert_array_equal(found, TOKENS)
            return
        await asyncio.sleep(0.05)
    pytest.fail("no cache hit within 5 s of Redis restarting")


async def test_paused_redis_get_many_returns_misses_as_the_timeout_passes(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.set_many([(KEY, TOKENS)])
    redis_server.pause()
    lookups_s = []
    for _ in range(BREAKER_FAILURES):  # each one goes out: the breaker opens after the third
        start = time.perf_counter()
        assert await cache.get_many([KEY]) == [None]
        lookups_s.append(elapsed_s(start))
    redis_server.resume()
    assert min(lookups_s) >= TIMEOUT_S, lookups_s
    assert min(lookups_s) < TIMEOUT_S + QUICKEST_OVERSHOOT_S, lookups_s


async def test_paused_redis_set_many_returns_as_the_timeout_passes(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.get_many([KEY])
    redis_server.pause()
    writes_s = []
    for _ in range(BREAKER_FAILURES):  # each one goes out: the breaker opens after the third
        start = time.perf_counter()
        await cache.set_many([(KEY, TOKENS)])
        writes_s.append(elapsed_s(start))
    redis_server.resume()
    assert min(writes_s) >= TIMEOUT_S, writes_s
    assert min(writes_s) < TIMEOUT_S + QUICKEST_OVERSHOOT_S, writes_s


async def test_a_call_the_event_loop_stalled_past_its_deadline_returns_when_the_loop_resumes(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    """The event loop stalls for 100 ms (CPU contention, a collection, a blocking call) just as
    a lookup writes to a paused Redis: the deadline passes as the write completes. On Python
    3.11, redis-py's asyncio.wait_for around the write lost the deadline's cancellation then,
    and the lookup waited for the 10 s socket timeout; now it answers as the loop resumes (a
    single call on this loaded machine: up to 0.1 s later)."""
    await cache.set_many([(KEY, TOKENS)])  # a connected connection in the pool
    redis_server.pause()
    stall_s = 0.1
    asyncio.get_running_loop().call_soon(time.sleep, stall_s)
    errors = cache_requests("error")
    start = time.perf_counter()
    assert await cache.get_many([KEY]) == [None]
    lookup_s = elapsed_s(start)
    redis_server.resume()
    assert stall_s <= lookup_s < stall_s + 1.0
    assert cache_requests("error") - errors == 1


async def test_open_breaker_answers_misses_at_once_without_asking_redis(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.set_many([(KEY, TOKENS)])
    await open_breaker(redis_server, cache)
    redis_server.resume()
    admin = redis_server.client()
    commands_before = await commands_settled(admin)
    errors = cache_requests("error")
    start = time.perf_counter()
    # Redis is healthy again and holds KEY: only a skipped call can miss.
    assert await cache.get_many([KEY]) == [None]
    assert elapsed_s(start) < 0.02
    assert commands_processed(admin) - commands_before == 1  # the INFO that read it
    assert cache_requests("error") - errors == 1


async def test_breaker_closes_when_the_probe_after_the_cooldown_succeeds(
    redis_server: RedisServer, patient_cache: RedisCache
) -> None:
    await probe_next(redis_server, patient_cache)
    np.testing.assert_array_equal((await patient_cache.get_many([KEY]))[0], TOKENS)
    assert not patient_cache.breaker_open


async def test_breaker_reopens_for_another_cooldown_when_the_probe_fails(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await open_breaker(redis_server, cache)
    await asyncio.sleep(COOLDOWN_S + 0.05)
    start = time.perf_counter()
    await cache.get_many([KEY])
    assert elapsed_s(start) >= TIMEOUT_S  # the probe went out and timed out
    start = time.perf_counter()
    await cache.get_many([KEY])
    assert elapsed_s(start) < 0.02
    assert cache.breaker_open
    redis_server.resume()


@pytest.mark.parametrize(
    ("breaker", "failures", "cooldown"),
    [
        ({"breaker_failures": 1, "breaker_cooldown_s": COOLDOWN_S}, 1, "0.3"),
        ({"breaker_failures": BREAKER_FAILURES, "breaker_cooldown_s": COOLDOWN_S}, 3, "0.3"),
        ({}, 5, "2"),  # the defaults
    ],
    ids=["1-failure", "3-failures", "default"],
)
async def test_breaker_opens_at_the_configured_failures_in_a_row_and_says_for_how_long(
    breaker: dict[str, Any],
    failures: int,
    cooldown: str,
    redis_server: RedisServer,
    cache_log: pytest.LogCaptureFixture,
) -> None:
    cache = RedisCache(redis_server.url, timeout_ms=TIMEOUT_MS, **breaker)
    try:
        redis_server.kill()
        for _ in range(failures - 1):
            await cache.get_many([KEY])
        assert not cache.breaker_open
        await cache.get_many([KEY])
        assert cache.breaker_open
    finally:
        await cache.close()
    assert cache_records(cache_log)[-1][1].endswith(f"; skipping Redis for {cooldown} s")


async def test_past_the_cooldown_one_probe_goes_out_and_a_concurrent_lookup_misses(
    redis_server: RedisServer, patient_cache: RedisCache
) -> None:
    await probe_next(redis_server, patient_cache)
    errors = cache_requests("error")
    probe, concurrent = await asyncio.gather(
        patient_cache.get_many([KEY]), patient_cache.get_many([KEY])
    )
    np.testing.assert_array_equal(probe[0], TOKENS)
    assert concurrent == [None]  # skipped while the probe decided, though Redis holds KEY
    assert cache_requests("error") - errors == 1
    assert not patient_cache.breaker_open


async def test_a_probe_whose_caller_is_cancelled_lets_the_next_lookup_probe(
    redis_server: RedisServer, patient_cache: RedisCache
) -> None:
    await patient_cache.set_many([(KEY, TOKENS)])
    await open_breaker(redis_server, patient_cache)
    await asyncio.sleep(COOLDOWN_S + 0.05)
    probe = asyncio.create_task(patient_cache.get_many([KEY]))
    await asyncio.sleep(0.05)  # the probe is waiting on the paused server
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    redis_server.resume()
    np.testing.assert_array_equal((await patient_cache.get_many([KEY]))[0], TOKENS)
    assert not patient_cache.breaker_open


async def test_breaker_opening_is_logged_once_as_a_warning_naming_the_cooldown(
    redis_server: RedisServer, cache: RedisCache, cache_log: pytest.LogCaptureFixture
) -> None:
    await open_breaker(redis_server, cache)
    await asyncio.sleep(COOLDOWN_S + 0.05)
    await cache.get_many([KEY])  # the probe fails: the breaker opens again, quietly
    redis_server.resume()
    failed = "Redis cache get failed (TimeoutError: no answer within 50 ms)"
    assert cache_records(cache_log) == [
        ("DEBUG", failed),
        ("DEBUG", failed),
        ("WARNING", f"{failed}; skipping Redis for {COOLDOWN_S} s"),
        ("DEBUG", failed),
    ]


async def test_breaker_closing_is_logged_once_as_redis_reachable_again(
    redis_server: RedisServer, patient_cache: RedisCache, cache_log: pytest.LogCaptureFixture
) -> None:
    await patient_cache.set_many([(KEY, TOKENS)])
    await patient_cache.get_many([KEY])
    assert cache_records(cache_log) == []  # successes while closed log nothing
    await probe_next(redis_server, patient_cache)
    cache_log.clear()
    await patient_cache.get_many([KEY])
    await patient_cache.set_many([(KEY, TOKENS)])
    assert cache_records(cache_log) == [("INFO", "Redis cache reachable again")]


async def test_a_dropped_connection_is_retried_once_then_reads_as_a_miss() -> None:
    """A listener that accepts each connection and closes it, as a Redis that restarted
    behind a pooled socket does: the lookup tries twice, then answers a miss."""
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}", timeout_ms=500)
    try:
        errors = cache_requests("error")
        assert await cache.get_many([KEY]) == [None]
        assert connections == 2
        assert cache_requests("error") - errors == 1
    finally:
        await cache.close()
        server.close()


async def test_a_call_past_its_deadline_leaves_nothing_for_the_event_loop_to_report(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        await cache.set_many([(KEY, TOKENS)])
        redis_server.pause()
        assert await cache.get_many([KEY]) == [None]
        await asyncio.sleep(0.1)  # the cancelled call ends meanwhile
        redis_server.resume()
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_a_call_past_its_deadline_is_not_kept_once_it_ends(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    await cache.set_many([(KEY, TOKENS)])
    redis_server.pause()
    assert await cache.get_many([KEY]) == [None]
    overrunning = [
        weakref.ref(task) for task in asyncio.all_tasks() if task is not asyncio.current_task()
    ]
    assert overrunning, "the cancelled call had already ended"
    await asyncio.sleep(0.1)
    redis_server.resume()
    gc.collect()
    assert [ref() for ref in overrunning] == [None] * len(overrunning)


async def test_ping_of_a_paused_redis_answers_false_within_the_timeout(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    assert await cache.ping()
    redis_server.pause()
    try:
        start = time.perf_counter()
        assert not await cache.ping()
        assert elapsed_s(start) < 1.0  # 50 ms, not the 10 s socket timeout
    finally:
        redis_server.resume()


@pytest.mark.parametrize(
    ("refused", "op"), [("strlen", "get"), ("mget", "get"), ("set", "set")], ids=str
)
async def test_a_failed_lookup_or_write_is_logged_naming_the_operation(
    refused: str,
    op: str,
    redis_server: RedisServer,
    patient_cache: RedisCache,
    cache_log: pytest.LogCaptureFixture,
) -> None:
    """One of the cache's commands refused (ACL): the STRLEN pipeline or the MGET of a
    lookup, or the SET pipeline of a write; the failure is logged as the get or set it broke."""
    await patient_cache.set_many([(KEY, TOKENS)])
    redis_server.client().execute_command("ACL", "SETUSER", "default", f"-{refused}")
    errors = cache_requests("error")
    if op == "get":
        assert await patient_cache.get_many([KEY]) == [None]
    else:
        await patient_cache.set_many([(KEY, TOKENS)])
    assert cache_requests("error") - errors == 1
    [(level, message)] = cache_records(cache_log)
    assert level == "DEBUG"
    assert message.startswith(f"Redis cache {op} failed (NoPermissionError: ")


async def test_a_write_to_a_paused_redis_waits_50_ms_plus_its_bytes_at_25_mb_per_s_by_default(
    redis_server: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(redis_server.url)
    tokens = np.random.default_rng(0).integers(0, 2**16, 500_000)  # 1 MB as uint16
    try:
        await cache.get_many([KEY])  # a connected connection in the pool
        redis_server.pause()
        await cache.set_many([(KEY, tokens)])
        redis_server.resume()
    finally:
        await cache.close()
    assert cache_records(cache_log) == [
        ("DEBUG", "Redis cache set failed (TimeoutError: no answer within 90 ms)")
    ]


async def test_ping_reports_whether_redis_answers(
    redis_server: RedisServer, cache: RedisCache
) -> None:
    assert await cache.ping()
    redis_server.kill()
    assert not await cache.ping()


async def test_redis_cache_works_over_a_unix_socket_url(redis_server: RedisServer) -> None:
    unix_cache = RedisCache(f"unix://{redis_server.unix_socket}", timeout_ms=TIMEOUT_MS)
    await unix_cache.set_many([(KEY, TOKENS)])
    np.testing.assert_array_equal((await unix_cache.get_many([KEY]))[0], TOKENS)
    await unix_cache.close()


async def test_redis_cache_finds_the_master_through_a_sentinel_url(
    redis_server: RedisServer, sentinel_server: RedisServer
) -> None:
    sentinel_cache = RedisCache(
        f"redis+sentinel://127.0.0.1:{sentinel_server.port}/tokserve", timeout_ms=500
    )
    await sentinel_cache.set_many([(KEY, TOKENS)])
    assert redis_server.client().exists(KEY)
    np.testing.assert_array_equal((await sentinel_cache.get_many([KEY]))[0], TOKENS)
    await sentinel_cache.close()


async def test_a_sentinel_url_logs_in_to_the_master_as_its_user_on_its_db(
    redis_server: RedisServer, sentinel_server: RedisServer
) -> None:
    """The user, password (a ':' and a percent-escaped '@' in it) and db of a sentinel URL
    are the master connection's."""
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "tokserve", "on", ">pa:s@s", "~*", "+@all")
    url = f"redis+sentinel://tokserve:pa:s%40s@127.0.0.1:{sentinel_server.port}/tokserve/2"
    sentinel_cache = RedisCache(url, timeout_ms=UNHURRIED_MS)
    try:
        await sentinel_cache.set_many([(KEY, TOKENS)])
        np.testing.assert_array_equal((await sentinel_cache.get_many([KEY]))[0], TOKENS)
        logged_in = {(client["user"], client["db"]) for client in admin.client_list()}
    finally:
        await sentinel_cache.close()
    assert ("tokserve", "2") in logged_in
    with redis.Redis(port=redis_server.port, db=2) as db2:
        assert db2.exists(KEY)


async def test_a_hung_sentinel_is_passed_over_after_the_timeout_for_the_next_one(
    redis_server: RedisServer, sentinel_server: RedisServer
) -> None:
    """The first sentinel listed answers nothing: after the 100 ms timeout the client asks
    the next, and the write (a deadline of 2 s for its 2 MB at 1 MB/s) gets through."""
    hung = RedisServer(f"sentinel monitor tokserve 127.0.0.1 {redis_server.port} 1", sentinel=True)
    try:
        hung.start()
        hung.pause()
        url = f"redis+sentinel://127.0.0.1:{hung.port},127.0.0.1:{sentinel_server.port}/tokserve"
        sentinel_cache = RedisCache(url, timeout_ms=100, min_mb_per_s=1)
        tokens = np.random.default_rng(0).integers(0, 2**16, 1_000_000)  # 2 MB as uint16
        errors = cache_requests("error")
        try:
            await sentinel_cache.set_many([(KEY, tokens)])
        finally:
            await sentinel_cache.close()
        assert cache_requests("error") == errors
        assert redis_server.client().exists(KEY)
    finally:
        hung.close()


async def test_a_rediss_sentinel_url_speaks_tls_to_the_master(
    redis_server: RedisServer, sentinel_server: RedisServer
) -> None:
    """The sentinel is asked in plain text; the master, which speaks none, is asked in TLS:
    the lookup fails, though the master holds the key."""
    redis_server.client().set(KEY, pack_array(TOKENS))
    url = f"rediss+sentinel://127.0.0.1:{sentinel_server.port}/tokserve"
    sentinel_cache = RedisCache(url, timeout_ms=500)
    try:
        errors = cache_requests("error")
        assert await sentinel_cache.get_many([KEY]) == [None]
        assert cache_requests("error") - errors == 1
    finally:
        await sentinel_cache.close()


async def test_a_sentinel_url_names_each_sentinel_with_port_26379_unless_given() -> None:
    url = (
        "redis+sentinel://sentinel-a,sentinel-b:26380,[::1],[fe80::1]:26381,fe80::2:26382/tokserve"
    )
    client, sentinels = _redis_client(url, TIMEOUT_S)
    addresses = [
        (sentinel.connection_pool.connection_kwargs["host"],
         sentinel.connection_pool.connection_kwargs["port"])
        for sentinel in sentinels
    ]  # fmt: skip
    for each in (client, *sentinels):
        await each.aclose()
    assert addresses == [
        ("sentinel-a", 26379),
        ("sentinel-b", 26380),
        ("::1", 26379),
        ("fe80::1", 26381),
        ("fe80::2", 26382),  # unbracketed, the last ':' starts the port
    ]


def test_a_sentinel_url_without_a_service_name_is_refused_saying_how_to_write_one() -> None:
    expected = "a sentinel URL names its service: redis+sentinel://host:26379/name"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        RedisCache("redis+sentinel://127.0.0.1:26379")


@pytest.mark.parametrize("topology", ["plain", "sentinel", "cluster"])
async def test_new_connections_send_no_client_setinfo(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """Redis sees only the cache's own commands after a connection's handshake: no CLIENT
    SETINFO round trips (driver_info=None), whichever kind of URL made the connection."""
    if topology == "cluster":
        node: RedisServer = request.getfixturevalue("cluster_server")
        url = f"redis+cluster://127.0.0.1:{node.port}"
    else:
        node = request.getfixturevalue("redis_server")
        url = node.url
    if topology == "sentinel":
        sentinel: RedisServer = request.getfixturevalue("sentinel_server")
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/tokserve"
    admin = node.client()
    admin.config_set("slowlog-log-slower-than", 0)
    admin.slowlog_reset()
    url_cache = RedisCache(url, timeout_ms=UNHURRIED_MS)
    try:
        await url_cache.set_many([(KEY, TOKENS)])
    finally:
        await url_cache.close()
    commands = [entry["command"].split()[:2] for entry in admin.slowlog_get(128)]
    assert [b"SET", KEY.encode()] in commands
    assert [b"CLIENT", b"SETINFO"] not in commands


async def test_redis_cache_reads_keys_across_slots_over_a_cluster_url(
    cluster_server: RedisServer,
) -> None:
    cluster_cache = RedisCache(f"redis+cluster://127.0.0.1:{cluster_server.port}", timeout_ms=500)
    keys = [cache_key("m", "v", "encode", "", bytes([i])) for i in range(8)]
    await cluster_cache.set_many([(key, TOKENS + i) for i, key in enumerate(keys)])
    found = await cluster_cache.get_many([*keys, "tok:absent"])
    for i, tokens in enumerate(found[:-1]):
        np.testing.assert_array_equal(tokens, TOKENS + i)
    assert found[-1] is None
    await cluster_cache.close()


async def test_create_cache_picks_redis_when_a_url_is_set_and_memory_otherwise(
    redis_server: RedisServer,
) -> None:
    with_url = create_cache(Settings(redis_url=redis_server.url))
    assert isinstance(with_url, RedisCache)
    assert await with_url.ping()
    await with_url.close()
    assert isinstance(create_cache(Settings(redis_url=None)), MemoryCache)


async def test_create_cache_hands_every_redis_setting_to_the_redis_cache(
    redis_server: RedisServer, cache_log: pytest.LogCaptureFixture
) -> None:
    """Settings unlike RedisCache's defaults: the TTL set, the write's deadline (80 ms plus
    1 MB at 10 MB/s), and the breaker opening at the second failure for 7 s say which arrived."""
    settings = Settings(
        redis_url=redis_server.url,
        redis_timeout_ms=80,
        redis_min_mb_per_s=10,
        cache_ttl_s=120,
        redis_breaker_failures=2,
        redis_breaker_cooldown_s=7,
    )
    cache = create_cache(settings)
    try:
        await cache.set_many([(KEY, TOKENS)])
        assert 110 <= redis_server.client().ttl(KEY) <= 120
        redis_server.pause()
        await cache.set_many([(KEY, np.random.default_rng(0).integers(0, 2**16, 500_000))])
        await cache.get_many([KEY])
        redis_server.resume()
    finally:
        await cache.close()
    assert cache_records(cache_log) == [
        ("DEBUG", "Redis cache set failed (TimeoutError: no answer within 180 ms)"),
        (
            "WARNING",
            "Redis cache get failed (TimeoutError: no answer within 80 ms); skipping Redis for 7 s",
        ),
    ]


async def test_create_cache_hands_the_byte_budget_and_ttl_to_the_memory_cache() -> None:
    entry_bytes = len(KEY) + len(pack_array(TOKENS))
    cache = create_cache(Settings(cache_max_bytes=entry_bytes, cache_ttl_s=3600))
    assert isinstance(cache, MemoryCache)
    await cache.set_many([("tok:first", TOKENS[:, :1]), (KEY, TOKENS)])
    assert await cache.get_many(["tok:first"]) == [None]  # evicted: the budget is one entry
    np.testing.assert_array_equal((await cache.get_many([KEY]))[0], TOKENS)
    assert cache.bytes_held == entry_bytes


# --- single-flight -------------------------------------------------------------------------


async def test_single_flight_computes_once_for_ten_concurrent_callers() -> None:
    flight = SingleFlight()
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        return "tokens"

    results = await asyncio.gather(*(flight.run(KEY, compute) for _ in range(10)))
    assert results == ["tokens"] * 10
    assert calls == 1
    assert len(flight) == 0


async def test_single_flight_gives_the_leaders_exception_to_every_caller() -> None:
    flight = SingleFlight()
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        raise RuntimeError("forward pass failed")

    results = await asyncio.gather(
        *(flight.run(KEY, compute) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(result, RuntimeError) for result in results)
    assert calls == 1


async def test_single_flight_followers_compute_themselves_when_the_leader_is_cancelled() -> None:
    flight = SingleFlight()
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # the leader never finishes on its own
        await asyncio.sleep(0.01)
        return "tokens"

    leader = asyncio.create_task(flight.run(KEY, compute))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(flight.run(KEY, compute)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    async with asyncio.timeout(1):
        assert await asyncio.gather(*followers) == ["tokens"] * 5
    assert leader.cancelled()
    assert calls == 2


async def test_single_flight_followers_compute_themselves_when_the_leader_fails_for_itself() -> (
    None
):
    flight = SingleFlight(leader_only=(TimeoutError,))
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        if calls == 1:
            raise TimeoutError("the leader's own deadline passed")
        return "tokens"

    leader = asyncio.create_task(flight.run(KEY, compute))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(flight.run(KEY, compute)) for _ in range(5)]
    async with asyncio.timeout(1):
        assert await asyncio.gather(*followers) == ["tokens"] * 5
    with pytest.raises(TimeoutError):
        await leader
    assert calls == 2


async def test_single_flight_cancelled_follower_leaves_the_leader_running() -> None:
    flight = SingleFlight()
    release = asyncio.Event()

    async def compute() -> str:
        await release.wait()
        return "tokens"

    leader = asyncio.create_task(flight.run(KEY, compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.run(KEY, compute))
    await asyncio.sleep(0)
    follower.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await leader == "tokens"
    assert follower.cancelled()


async def test_single_flight_computes_again_once_the_previous_run_finished() -> None:
    flight = SingleFlight()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await flight.run(KEY, compute) == 1
    assert await flight.run(KEY, compute) == 2


def test_model_version_is_kept_when_only_batching_options_change(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "a", TINY_IMAGE)
    before = load_model(folder, Settings(device="cpu")).version
    retuned = {**TINY_IMAGE, "serving": {"max_batch_size": 2, "max_wait_ms": 50, "max_queue": 4}}
    write_model(tmp_path / "a", retuned)
    assert load_model(folder, Settings(device="cpu", max_batch_size=1)).version == before


def test_a_model_asking_for_bfloat16_runs_in_it_on_a_cpu_that_computes_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compute, "cpu_runs_bfloat16", lambda: True)
    folder = write_model(tmp_path, {**TINY_IMAGE, "serving": {"dtype": "bfloat16"}})
    loaded = load_model(folder, Settings(device="cpu"))
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.tokenizer.parameters())
    assert loaded.version != load_model(folder, Settings(device="cpu", dtype="float32")).version


@pytest.mark.parametrize("asked", ["bfloat16", "float16"])
def test_a_cpu_without_fast_half_precision_runs_the_model_in_float32(
    asked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compute, "cpu_runs_bfloat16", lambda: False)
    folder = write_model(tmp_path, {**TINY_IMAGE, "serving": {"dtype": asked}})
    assert load_model(folder, Settings(device="cpu")).dtype == torch.float32


@pytest.mark.parametrize("asked", ["float32", "bfloat16", "float16"])
def test_cuda_runs_a_model_in_the_dtype_it_asks_for(asked: str) -> None:
    assert compute.run_dtype(asked, torch.device("cuda")) == DTYPES[asked]


def test_model_named_with_a_colon_is_refused_at_load_not_at_its_first_request(
    tmp_path: Path,
) -> None:
    folder = write_model(tmp_path / "a", {**TINY_IMAGE, "name": "acme:image"})
    with pytest.raises(ModelLoadError, match="':'"):
        load_model(folder, Settings(device="cpu"))


@pytest.mark.parametrize(
    ("config", "built"), [(TINY_IMAGE, "image"), (TINY_AUDIO, "audio")], ids=["image", "audio"]
)
def test_a_backend_of_another_modality_than_config_json_says_is_refused_at_load(
    config: dict[str, Any], built: str, tmp_path: Path
) -> None:
    declared = "audio" if built == "image" else "image"
    folder = write_model(tmp_path, {**config, "modality": declared})
    expected = (
        f"{config['name']}: config.json says modality '{declared}', but its native backend "
        f"built {config['architecture']} as an {built} tokenizer; set modality to '{built}'"
    )
    with pytest.raises(ModelLoadError, match=re.escape(expected)):
        load_model(folder, Settings(device="cpu"))


def test_a_native_model_with_a_source_serves_its_weights_and_versions_them(
    tmp_path: Path,
) -> None:
    base = write_model(tmp_path, TINY_IMAGE)
    refining = tmp_path / "tiny-image-hq"
    refining.mkdir()
    config = {**TINY_IMAGE, "name": "tiny-image-hq", "source": "../tiny-image"}
    config["arch"] = {**TINY_IMAGE["arch"], "refine_steps": 2}
    (refining / "config.json").write_text(json.dumps(config))
    loaded = load_model(refining, Settings(device="cpu"))
    weights = load_model(base, Settings(device="cpu")).tokenizer
    assert isinstance(loaded.tokenizer, FSQImageTokenizer)
    assert isinstance(weights, FSQImageTokenizer)
    assert loaded.tokenizer.refine_steps == 2
    for name, tensor in loaded.tokenizer.state_dict().items():
        assert torch.equal(tensor, weights.state_dict()[name]), name
    write_model(tmp_path, TINY_IMAGE, seed=1)
    assert load_model(refining, Settings(device="cpu")).version != loaded.version


def test_a_native_source_without_weights_names_the_file_it_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "orphan"
    folder.mkdir()
    config = {**TINY_IMAGE, "name": "orphan", "source": "../gone"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"gone/model\.safetensors is missing"):
        load_model(folder, Settings(device="cpu"))


def swap_weights_after_each_read(
    monkeypatch: pytest.MonkeyPatch, root: Path, swaps: int
) -> list[int]:
    """Make the next ``swaps`` native loads end with new weights renamed into place, as a
    trainer exporting a checkpoint does; returns the seeds written, in order."""
    written: list[int] = []
    build = native.build_native

    def build_then_swap(folder: Path, config: dict[str, Any]) -> torch.nn.Module:
        module = build(folder, config)
        if len(written) < swaps:
            written.append(len(written) + 1)
            write_model(root, TINY_IMAGE, seed=written[-1])
        return module

    monkeypatch.setattr(native, "build_native", build_then_swap)
    return written


def test_weights_replaced_while_loading_are_loaded_again_under_their_own_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model(tmp_path, TINY_IMAGE)
    written = swap_weights_after_each_read(monkeypatch, tmp_path, swaps=1)
    loaded = load_model(folder, Settings(device="cpu"))
    assert written == [1]
    on_disk = load_file(str(folder / "model.safetensors"))
    assert isinstance(loaded.tokenizer, FSQImageTokenizer)
    for name, tensor in loaded.tokenizer.state_dict().items():
        assert torch.equal(tensor, on_disk[name]), name
    assert loaded.version == model_version(TINY_IMAGE, torch.float32, folder)


def test_weights_that_keep_changing_while_loading_fail_the_load_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model(tmp_path, TINY_IMAGE)
    swap_weights_after_each_read(monkeypatch, tmp_path, swaps=registry.LOAD_ATTEMPTS)
    with pytest.raises(ModelLoadError, match="changed during each of 3 loads"):
        load_model(folder, Settings(device="cpu"))


def test_model_version_changes_with_weights_architecture_or_dtype(tmp_path: Path) -> None:
    config = TINY_IMAGE
    base = model_version(config, torch.float32, write_model(tmp_path / "a", config))
    reseeded = model_version(config, torch.float32, write_model(tmp_path / "b", config, seed=1))
    levels = {**config, "arch": {**config["arch"], "levels": [5, 5, 5, 5]}}
    relevelled = model_version(levels, torch.float32, write_model(tmp_path / "c", levels))
    bf16 = model_version(config, torch.bfloat16, tmp_path / "a" / config["name"])
    assert len({base, reseeded, relevelled, bf16}) == 4
