"""The pages a browser opens: the playground at ``/``, the API docs at ``/docs`` and ``/redoc``.

Every asset is served from the installed packages (the playground from app/static, Swagger UI
and ReDoc from fastapi-offline's copies), never a CDN, so the pages work on a machine without
internet. With API keys set and TOKSERVE_PUBLIC_DOCS off, the API's description (/openapi.json,
/docs, /redoc) needs a key like the API; the playground's page is public and asks for one.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.api.deps import require_api_key

STATIC = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
TITLE = "tokserve - API"


def install_pages(app: FastAPI, docs_need_key: bool) -> None:
    """Add the playground, the docs pages and their static assets to ``app``."""
    keyed = [Depends(require_api_key)] if docs_need_key else []
    # the more specific mount first: Starlette takes the first that matches
    app.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=TITLE,
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/docs/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False, dependencies=keyed)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=TITLE,
            redoc_js_url="/static/docs/redoc.standalone.js",
            redoc_favicon_url="/static/docs/favicon.png",
            with_google_fonts=False,
        )
