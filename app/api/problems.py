"""Errors as RFC 9457 problem+json answers: every exception the app raises, in one place."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ClientGone, ProblemError
from app.logs import REQUEST_ID

PROBLEM_JSON = "application/problem+json"
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED_REQUEST = 499
log = logging.getLogger("tokserve.errors")


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """Render one problem document (RFC 9457)."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def error_response(error: ProblemError) -> JSONResponse:
    """``error`` rendered as its problem document, with its headers."""
    return problem_response(error.status, error.title, error.detail, error.headers, **error.extra)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "The request did not match the schema: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception into problem+json; unknown ones are logged and answered 500."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(422, "Unprocessable Content", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.url.path}; see /docs for the API."
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /docs."
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(exc.status_code, _title(exc.status_code), detail, headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        # nobody reads this answer; 499 (nginx's "client closed request") labels the metrics
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # answered by Starlette's outermost middleware, outside the one that adds the header
        request_id = REQUEST_ID.get()
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        return problem_response(
            500, "Internal Server Error", "An unexpected error occurred.", headers
        )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
