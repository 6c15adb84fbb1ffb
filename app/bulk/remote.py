"""The server bulk engine: the same job against a running tokserve (or a fleet behind a load
balancer) through app.client, sharing the servers' cache."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from app.bulk.job import BulkOptions
from app.client import Client, Encoded, ItemError, ItemsFailed, TokserveError
from app.errors import ProblemError

log = logging.getLogger("tokserve.bulk")
T = TypeVar("T")

# items per request, and requests in flight unless --workers says otherwise
CHUNK = 16
WINDOW = 4
# statuses worth trying again: the server is busy, draining or restarting
RETRY_STATUSES = (502, 503, 504)
RETRIES = 12
MAX_BACKOFF_S = 10.0


class ModelChanged(RuntimeError):
    """The server answered with another model version than the job's: rows of two versions
    cannot share one job."""


class ServerTokenizer:
    """Requests of CHUNK items, ``window`` of them at once; busy servers are retried with
    backoff, so an item never fails for the fleet's sake, only for its own."""

    chunk = CHUNK

    def __init__(self, client: Client, model: dict[str, Any], options: BulkOptions) -> None:
        self.client = client
        self.model = model
        self.options = options
        self.window = options.workers or WINDOW

    @classmethod
    def connect(cls, options: BulkOptions) -> ServerTokenizer:
        """Ask the server for ``options.model``'s description; ValueError if it does not serve
        it."""
        assert options.server is not None
        client = Client(options.server, api_key=options.api_key, timeout_s=300.0)
        models = _retried(client.models)
        named = [m for m in models if m["name"] == options.model or options.model is None]
        if len(named) != 1:
            client.close()
            served = ", ".join(m["name"] for m in models) or "none"
            raise ValueError(f"name one model with --model; {options.server} serves: {served}.")
        return cls(client, named[0], options)

    async def encode(self, blobs: list[bytes | ProblemError]) -> list[Any]:
        return await asyncio.to_thread(self._encode, blobs)

    def _encode(self, blobs: list[bytes | ProblemError]) -> list[Any]:
        """Each item's Encoded, or its problem as a ProblemError."""
        readable = [b for b in blobs if isinstance(b, bytes)]
        name = self.model["name"]
        if self.model["modality"] == "image":
            results = _retried(
                lambda: _items(self.client.encode_images, readable, name, self.options.resize)
            )
        else:
            results = _retried(
                lambda: _items(self.client.encode_audio, readable, name, self.options.codebooks)
            )
        answers = iter(results)
        out: list[Any] = []
        for blob in blobs:
            result = blob if isinstance(blob, ProblemError) else next(answers)
            if isinstance(result, ItemError):
                result = ProblemError.from_record(result.status, result.title, result.detail)
            elif isinstance(result, Encoded) and result.version != self.model["version"]:
                raise ModelChanged(
                    f"{self.options.server} now answers with {name} version {result.version}; "
                    f"this job started with version {self.model['version']}. Serve one version "
                    "throughout the job (resume it once the fleet is back on it)."
                )
            out.append(result)
        return out

    async def close(self) -> None:
        self.client.close()


def _items(encode: Any, blobs: list[bytes], *args: Any) -> list[Encoded | ItemError]:
    """Every item's Encoded or ItemError, whether or not some failed."""
    if not blobs:
        return []
    try:
        return list(encode(blobs, *args))
    except ItemsFailed as failed:
        return failed.results


def _retried(call: Callable[[], T]) -> T:
    """``call()``, tried again with growing pauses while the server is unreachable or busy."""
    for attempt in range(RETRIES):
        try:
            return call()
        except (httpx.TransportError, TokserveError) as exc:
            status = getattr(exc, "status", None)
            retryable = status in RETRY_STATUSES or isinstance(exc, httpx.TransportError)
            if not retryable or attempt == RETRIES - 1:
                raise
            pause = min(MAX_BACKOFF_S, 0.5 * 2**attempt)
            log.warning("server busy or unreachable (%s); retrying in %.1f s", exc, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")
