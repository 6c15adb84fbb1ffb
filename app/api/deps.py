"""Dependencies of the routes: the engine, the API key, a request's deadline and model label."""

from __future__ import annotations

import secrets
import time
from typing import Annotated

from fastapi import Depends, Request
from opentelemetry import trace
from starlette.requests import HTTPConnection

from app.engine import Engine
from app.errors import BadRequest, Unauthorized


async def get_engine(request: Request) -> Engine:
    """The app's Engine (async: FastAPI would run a plain function in its thread pool)."""
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def given_key(connection: HTTPConnection) -> str:
    """The API key a request or WebSocket carries: 'Authorization: Bearer' or 'X-API-Key'."""
    given = connection.headers.get("x-api-key", "")
    auth = connection.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given


def is_valid_key(given: str, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time."""
    return any(secrets.compare_digest(given.encode(), key.encode()) for key in keys)


async def require_api_key(request: Request, engine: EngineDep) -> None:
    """When TOKSERVE_API_KEYS is set, every /v1 request carries one of them (async: no thread)."""
    keys = engine.settings.api_keys
    if not keys:
        return
    if not is_valid_key(given_key(request), keys):
        raise Unauthorized(
            "A valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


def label_model(request: Request, model: str) -> None:
    """Label this request's metrics and trace span with the model that serves it."""
    request.state.model = model
    trace.get_current_span().set_attribute("tokserve.model", model)


def deadline_of(request: Request, engine: Engine) -> float:
    """time.monotonic() by which work must have started: X-Request-Timeout or the default,
    counted from the request's arrival (time spent reading its body counts too)."""
    timeout_s = engine.settings.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            timeout_s = float(header)
        except ValueError:
            timeout_s = -1.0
        if not 0 < timeout_s <= 3600:
            raise BadRequest(
                f"X-Request-Timeout must be a number of seconds in (0, 3600], not {header!r}."
            )
    arrived: float = getattr(request.state, "arrived", time.monotonic())
    return arrived + timeout_s
