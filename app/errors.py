"""Every error the service answers, as exceptions with their HTTP status and title; they are
rendered to RFC 9457 problem+json in one place (app/api/problems.py)."""

from __future__ import annotations

from typing import Any


class ProblemError(Exception):
    """An error answered to the client: ``detail`` says what was wrong and what is accepted."""

    status: int = 400
    title: str = "Bad Request"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def record(self) -> dict[str, Any]:
        """{status, title, detail}: the problem as a bulk row or another process keeps it."""
        return {"status": self.status, "title": self.title, "detail": self.detail}

    @classmethod
    def from_record(cls, status: int, title: str, detail: str) -> ProblemError:
        """A problem answered elsewhere (a server, a Ray worker), with its own status."""
        problem = cls(detail)
        problem.status, problem.title = status, title
        return problem


class BadRequest(ProblemError):
    status, title = 400, "Bad Request"


class Unauthorized(ProblemError):
    status, title = 401, "Unauthorized"


class NotFound(ProblemError):
    status, title = 404, "Not Found"


class PayloadTooLarge(ProblemError):
    status, title = 413, "Payload Too Large"


class UnsupportedMedia(ProblemError):
    status, title = 415, "Unsupported Media Type"


class Unprocessable(ProblemError):
    status, title = 422, "Unprocessable Content"


class Overloaded(ProblemError):
    status, title = 503, "Service Unavailable"


class DeadlineExceeded(ProblemError):
    status, title = 504, "Gateway Timeout"


class ClientGone(Exception):
    """The client disconnected; its queued work is dropped and nobody is answered."""
