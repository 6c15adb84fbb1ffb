"""API keys: with TOKSERVE_API_KEYS set, every /v1 route, the docs and the metrics need one of
them, as 'Authorization: Bearer <key>' or 'X-API-Key'; the probes stay open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import TINY_AUDIO, png_bytes, problem_detail, served, settings_for, wav_bytes

KEYS = ["s3cret", "second-key"]
REFUSED = "A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'."
GRID = [[1] * 8] * 8
CODES = [[1] * 5] * TINY_AUDIO["arch"]["codebooks"]
# every /v1 route, with a request it answers 200
ROUTES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "models": ("GET", "/v1/models", {}),
    "one-model": ("GET", "/v1/models/tiny-image", {}),
    "image-encode": ("POST", "/v1/images/encode", {"content": png_bytes(seed=7)}),
    "image-decode": ("POST", "/v1/images/decode", {"json": {"tokens": GRID}}),
    "audio-encode": ("POST", "/v1/audio/encode", {"content": wav_bytes(seconds=0.1)}),
    "audio-decode": ("POST", "/v1/audio/decode", {"json": {"tokens": CODES}}),
}
WITHOUT_A_VALID_KEY = {
    "no-key": {},
    "wrong-x-api-key": {"X-API-Key": "wrong"},
    "wrong-bearer": {"Authorization": "Bearer wrong"},
    "key-of-another-scheme": {"Authorization": "Basic s3cret"},
    "empty-bearer": {"Authorization": "Bearer "},
}
WITH_A_VALID_KEY = {
    "bearer": {"Authorization": "Bearer s3cret"},
    "x-api-key": {"X-API-Key": "s3cret"},
    "second-key": {"X-API-Key": "second-key"},
    "lower-case-scheme-and-spaces": {"Authorization": "bearer   second-key "},
}


@pytest.fixture
async def keyed(repo: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app with two API keys configured (not warmed up: it starts in a tenth of a second)."""
    async with served(settings_for(repo, api_keys=KEYS, warmup=False)) as client:
        yield client


async def call(client: httpx.AsyncClient, route: str, headers: dict[str, str]) -> httpx.Response:
    method, path, body = ROUTES[route]
    return await client.request(method, path, headers=headers, **body)


@pytest.mark.parametrize("headers", WITHOUT_A_VALID_KEY.values(), ids=list(WITHOUT_A_VALID_KEY))
@pytest.mark.parametrize("route", ROUTES)
async def test_every_v1_route_answers_401_without_a_valid_key(
    keyed: httpx.AsyncClient, route: str, headers: dict[str, str]
) -> None:
    response = await call(keyed, route, headers)
    assert problem_detail(response, 401) == REFUSED
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", WITH_A_VALID_KEY.values(), ids=list(WITH_A_VALID_KEY))
@pytest.mark.parametrize("route", ROUTES)
async def test_every_v1_route_takes_any_configured_key_as_bearer_or_x_api_key(
    keyed: httpx.AsyncClient, route: str, headers: dict[str, str]
) -> None:
    response = await call(keyed, route, headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", ROUTES)
async def test_without_api_keys_every_v1_route_is_open(repo: Path, route: str) -> None:
    async with served(settings_for(repo, warmup=False)) as client:
        assert (await call(client, route, {})).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/metrics"])
async def test_with_api_keys_docs_and_metrics_need_a_key(
    keyed: httpx.AsyncClient, path: str
) -> None:
    assert problem_detail(await keyed.get(path), 401) == REFUSED
    assert (await keyed.get(path, headers=WITH_A_VALID_KEY["bearer"])).status_code == 200
    assert (await keyed.get(path, headers=WITH_A_VALID_KEY["x-api-key"])).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_with_api_keys_the_probes_need_none(keyed: httpx.AsyncClient, path: str) -> None:
    assert (await keyed.get(path)).status_code == 200


async def test_settings_open_docs_and_metrics_explicitly(repo: Path) -> None:
    settings = settings_for(
        repo, api_keys=KEYS, public_docs=True, public_metrics=True, warmup=False
    )
    async with served(settings) as client:
        for path in ("/docs", "/openapi.json", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        assert problem_detail(await client.get("/v1/models"), 401) == REFUSED


async def test_a_missing_key_header_matches_no_configured_key(repo: Path) -> None:
    """A request without a key is read as holding none, not some default string that a
    configured key could equal ('XXXX' is the one mutation testing puts there)."""
    async with served(settings_for(repo, api_keys=["XXXX"], warmup=False)) as client:
        assert problem_detail(await client.get("/v1/models"), 401) == REFUSED
