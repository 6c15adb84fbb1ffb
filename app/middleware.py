"""ASGI middleware: request metrics by route template, and the body size limit while reading."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, problem_response
from app.metrics import REQUEST_DURATION


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
                response = problem_response(exc.status, exc.title, exc.detail)
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


class MetricsMiddleware:
    """Observe tokserve_request_duration_seconds{route, model, status} for every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
            model = scope.get("state", {}).get("model", "")
            REQUEST_DURATION.labels(template, model, f"{status // 100}xx").observe(
                time.perf_counter() - start
            )
