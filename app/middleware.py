"""ASGI middleware: the request id, request metrics by route template, the body size limit while
reading, and admission: how many API requests are served at once."""

from __future__ import annotations

import re
import time
import uuid

from opentelemetry import trace
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import REQUEST_ID_HEADER, error_response
from app.errors import Overloaded, PayloadTooLarge
from app.logs import REQUEST_ID
from app.metrics import IN_FLIGHT, REJECTED, REQUEST_DURATION
from app.timing import SERVER_TIMING_HEADER, TIMINGS, Timings

# a client's X-Request-Id is kept when it is 1 to 128 of these characters, else replaced
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id if it is sane, else a new one (32 hex digits)."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Give every HTTP request an id: the client's X-Request-Id when sane, else a new one. It is
    echoed in the answer's X-Request-Id, carried by every log record while the request is
    handled (app.logs.REQUEST_ID), and set on the request's trace span."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        trace.get_current_span().set_attribute("tokserve.request_id", request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        token = REQUEST_ID.set(request_id)
        await self.app(scope, receive, send_with_id)
        # Reset only on a normal return: an exception goes on to Starlette's outermost
        # ServerErrorMiddleware, which logs it and answers 500 in this same task, for this id.
        REQUEST_ID.reset(token)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than the limit of {limit} bytes (TOKSERVE_MAX_BODY_BYTES); "
        "send fewer or smaller items per request."
    )


class BodyLimitMiddleware:
    """Refuse bodies over ``max_body_bytes``: at once by Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                exc = _too_large(limit)
                response = error_response(exc)
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


class AdmissionMiddleware:
    """Serve at most ``max_in_flight`` POST requests to /v1 at once and answer the next ones 503
    at once, before their bodies are read: past capacity, queueing only grows every request's
    latency and the memory held for it. Stamps each request's arrival (``state.arrived``, in
    time.monotonic() seconds), from which its deadline counts."""

    def __init__(self, app: ASGIApp, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrived"] = time.monotonic()
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            REJECTED.labels("in_flight").inc()
            exc = Overloaded(
                f"The server is serving {self.max_in_flight} requests (TOKSERVE_MAX_IN_FLIGHT); "
                "retry after a second, or on another replica.",
                # closing spares reading a body nobody will use; the client reconnects to retry
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await error_response(exc)(scope, receive, send)
            return
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()


class MetricsMiddleware:
    """Observe tokserve_request_duration_seconds{route, model, status} for every HTTP request,
    and answer where its time went in a Server-Timing header (app.timing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timings = Timings()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(SERVER_TIMING_HEADER, timings.header())
            await send(message)

        token = TIMINGS.set(timings)
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            TIMINGS.reset(token)
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
            model = scope.get("state", {}).get("model", "")
            REQUEST_DURATION.labels(template, model, f"{status // 100}xx").observe(
                time.perf_counter() - timings.started
            )
