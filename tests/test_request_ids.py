"""Request ids over real HTTP (uvicorn on a loopback port): every answer carries X-Request-Id, the
client's when it is sane, and every log line written while its request is handled carries it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from app.logs import REQUEST_ID, TEXT_FORMAT, JsonFormatter
from app.main import create_app
from app.pipeline import in_media_pool
from tests.support import held_body, listening, png_bytes, served, settings_for

ENCODE = "/v1/images/encode?model=tiny-image"
NEW_ID = re.compile(r"[0-9a-f]{32}")
LOGGERS = ("tokserve", "uvicorn.access", "uvicorn.error")


class Records(logging.Handler):
    """Every record the app's loggers write, as logged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def about(self, text: str) -> list[logging.LogRecord]:
        """The records whose message holds ``text``."""
        return [record for record in self.records if text in record.getMessage()]


@contextmanager
def captured() -> Iterator[Records]:
    """The records of the app's loggers while the block runs (after create_app, which sets
    their handlers)."""
    records = Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(records)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(records)


def in_flight() -> float:
    return REGISTRY.get_sample_value("tokserve_requests_in_flight") or 0.0


async def test_an_answer_to_a_request_without_an_id_carries_a_new_one(repo: Path) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        first = await http.post(ENCODE, content=png_bytes(seed=1))
        second = await http.post(ENCODE, content=png_bytes(seed=1))
    assert first.status_code == second.status_code == 200
    assert NEW_ID.fullmatch(first.headers["x-request-id"])
    assert NEW_ID.fullmatch(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "given",
    ["3f2a9c", "a" * 128, "Root=1-67891233-abcdef012345678912345678", "job/7:item.3_b+c@x"],
)
async def test_a_sane_client_request_id_is_kept(repo: Path, given: str) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        answer = await http.get("/healthz", headers={"X-Request-Id": given})
    assert answer.headers.get_list("x-request-id") == [given]


@pytest.mark.parametrize("given", ["", "a" * 129, "two words", "<script>", "caf\xe9"])
async def test_an_unsafe_or_overlong_client_request_id_is_replaced_by_a_new_one(
    repo: Path, given: str
) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        answer = await http.get("/healthz", headers={"X-Request-Id": given.encode("latin-1")})
    assert answer.headers.get_list("x-request-id") != [given]
    assert NEW_ID.fullmatch(answer.headers["x-request-id"])


async def test_every_log_line_of_a_request_carries_its_id_and_lines_outside_none(
    repo: Path,
) -> None:
    settings = settings_for(repo, warmup=False)
    app = create_app(settings)
    with captured() as log:
        async with listening(settings, app) as http:
            answer = await http.post(
                ENCODE, content=png_bytes(seed=2), headers={"X-Request-Id": "r-1"}
            )
            other = await http.get("/healthz")
    assert answer.status_code == 200
    (access,) = log.about('"POST /v1/images/encode?model=tiny-image HTTP/1.1" 200')
    assert access.request_id == "r-1"  # type: ignore[attr-defined]
    (probe,) = log.about('"GET /healthz HTTP/1.1" 200')
    assert probe.request_id == other.headers["x-request-id"]  # type: ignore[attr-defined]
    (ready,) = log.about("ready: ")
    assert ready.request_id == "-"  # type: ignore[attr-defined]


async def test_problem_answers_of_routes_carry_the_request_id(repo: Path) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        unreadable = await http.post(ENCODE, content=b"not an image", headers={"X-Request-Id": "a"})
        no_route = await http.get("/v1/nowhere", headers={"X-Request-Id": "b"})
        wrong_method = await http.get(ENCODE, headers={"X-Request-Id": "c"})
        no_model = await http.post("/v1/images/encode?model=none", content=png_bytes())
    assert (unreadable.status_code, unreadable.headers["x-request-id"]) == (415, "a")
    assert (no_route.status_code, no_route.headers["x-request-id"]) == (404, "b")
    assert (wrong_method.status_code, wrong_method.headers["x-request-id"]) == (405, "c")
    assert no_model.status_code == 404 and NEW_ID.fullmatch(no_model.headers["x-request-id"])
    for answer in (unreadable, no_route, wrong_method, no_model):
        assert answer.headers["content-type"] == "application/problem+json"


async def test_a_body_over_the_limit_is_refused_413_with_the_request_id(repo: Path) -> None:
    async with listening(settings_for(repo, warmup=False, max_body_bytes=1000)) as http:
        answer = await http.post(ENCODE, content=png_bytes(), headers={"X-Request-Id": "big-1"})
    assert answer.status_code == 413
    assert answer.headers["x-request-id"] == "big-1"


async def test_a_request_past_max_in_flight_is_refused_503_with_its_request_id(
    repo: Path,
) -> None:
    release = asyncio.Event()
    async with listening(settings_for(repo, warmup=False, max_in_flight=1)) as http:
        before = in_flight()
        held = asyncio.ensure_future(
            http.post(
                ENCODE, content=held_body(png_bytes(), release), headers={"X-Request-Id": "h"}
            )
        )
        try:
            async with asyncio.timeout(10):
                while in_flight() < before + 1:
                    await asyncio.sleep(0.01)
            refused = await http.post(ENCODE, content=png_bytes(), headers={"X-Request-Id": "next"})
        finally:
            release.set()
        served_first = await held
    assert (refused.status_code, refused.headers["x-request-id"]) == (503, "next")
    assert (served_first.status_code, served_first.headers["x-request-id"]) == (200, "h")


async def test_an_unexpected_error_is_answered_500_and_logged_with_the_request_id(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that escapes every handler (the only way to get one is to put it there)."""

    def broken(model: str | None = None) -> None:
        raise RuntimeError("a bug")

    settings = settings_for(repo, warmup=False)
    app = create_app(settings)
    with captured() as log:
        async with listening(settings, app) as http:
            monkeypatch.setattr(app.state.engine, "image", broken)
            answer = await http.post(ENCODE, content=png_bytes(), headers={"X-Request-Id": "bug-7"})
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers.get_list("x-request-id") == ["bug-7"]
    (error,) = log.about("unhandled error on POST /v1/images/encode")
    assert error.request_id == "bug-7"  # type: ignore[attr-defined]
    (access,) = log.about('"POST /v1/images/encode?model=tiny-image HTTP/1.1" 500')
    assert access.request_id == "bug-7"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "path", ["/", "/static/playground.js", "/docs", "/openapi.json", "/metrics", "/readyz"]
)
async def test_the_playground_pages_and_probes_carry_the_request_id(repo: Path, path: str) -> None:
    async with listening(settings_for(repo, warmup=False)) as http:
        answer = await http.get(path, headers={"X-Request-Id": "page-1"})
    assert answer.status_code == 200
    assert answer.headers.get_list("x-request-id") == ["page-1"]


async def test_the_request_id_is_unset_again_once_its_request_is_answered(repo: Path) -> None:
    async with served(settings_for(repo, warmup=False)) as client:  # the app runs in this task
        answer = await client.get("/healthz", headers={"X-Request-Id": "gone"})
        assert answer.headers["x-request-id"] == "gone"
        assert REQUEST_ID.get() is None


async def test_work_in_the_media_pool_keeps_the_request_id_of_its_caller() -> None:
    with ThreadPoolExecutor(1) as pool:
        token = REQUEST_ID.set("pooled")
        try:
            assert await in_media_pool(pool, REQUEST_ID.get) == "pooled"
        finally:
            REQUEST_ID.reset(token)
        assert await in_media_pool(pool, REQUEST_ID.get) is None


def test_text_log_lines_show_the_request_id_and_json_lines_hold_it() -> None:
    token = REQUEST_ID.set("line-1")
    try:
        inside = logging.getLogger("tokserve.test").makeRecord(
            "tokserve.test", logging.INFO, __file__, 1, "served", None, None
        )
    finally:
        REQUEST_ID.reset(token)
    outside = logging.getLogger("tokserve.test").makeRecord(
        "tokserve.test", logging.INFO, __file__, 1, "started", None, None
    )
    text = logging.Formatter(TEXT_FORMAT)
    assert text.format(inside).endswith(" INFO tokserve.test [line-1]: served")
    assert text.format(outside).endswith(" INFO tokserve.test [-]: started")
    assert json.loads(JsonFormatter().format(inside))["request_id"] == "line-1"
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
