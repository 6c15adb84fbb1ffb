"""Logging set-up: readable lines in a terminal, one JSON object per line in containers; every
record carries the id of the request it was logged for (``request_id``), or of every request
of a batch (comma-separated) on a queue's worker thread."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

# The request being handled: set by app.middleware.RequestIdMiddleware for the request's task
# (and the tasks and media threads it starts), by the batcher for a batch on its worker thread.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every record, whichever logger and handler: ``request_id`` is the current request's, or
    "-" outside one."""
    record = _factory(*args, **kwargs)
    record.request_id = REQUEST_ID.get() or "-"
    return record


logging.setLogRecordFactory(_record_with_request_id)


@contextmanager
def logging_for(request_ids: Sequence[str]) -> Iterator[None]:
    """Records logged in this block carry ``request_ids``, comma-separated."""
    token = REQUEST_ID.set(",".join(request_ids) or None)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, request id (inside a request), message,
    and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """Configure the tokserve and uvicorn loggers once, from LOG_LEVEL and LOG_FORMAT."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    for name in ("tokserve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(settings.log_level.upper())
        logger.propagate = False
