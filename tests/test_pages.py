"""The pages a browser opens: the playground at /, /docs and /redoc, all from local assets."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.support import served, settings_for

# src=, href= and spec-url= attributes, and Swagger UI's `url: '...'` option
ASSET = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def assets_of(html: str) -> list[str]:
    """Every script, stylesheet, icon and spec URL a page loads."""
    return [first or second for first, second in ASSET.findall(html)]


async def test_the_playground_is_served_at_the_root(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>tokserve playground</title>" in page.text
    for asset in ("/static/playground.js", "/static/playground.css", "/static/docs/favicon.png"):
        assert asset in assets_of(page.text)
        assert (await client.get(asset)).status_code == 200, asset


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_the_docs_pages_load_every_asset_from_this_server(
    client: httpx.AsyncClient, path: str
) -> None:
    page = await client.get(path)
    assert page.status_code == 200
    assets = assets_of(page.text)
    assert "/openapi.json" in assets
    assert any(asset.endswith(".js") for asset in assets)
    for asset in assets:
        assert asset.startswith("/"), f"{path} loads {asset} from elsewhere"
        assert (await client.get(asset)).status_code == 200, asset


async def test_with_api_keys_the_playground_stays_public_and_the_docs_need_a_key(
    repo: Path,
) -> None:
    key = {"X-API-Key": "s3cret"}
    async with served(settings_for(repo, api_keys=["s3cret"])) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/static/playground.js")).status_code == 200
        assert (await client.get("/redoc")).status_code == 401
        assert (await client.get("/redoc", headers=key)).status_code == 200
