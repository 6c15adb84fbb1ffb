"""The server bulk engine: the same job against a running tokserve (or a fleet behind a load
balancer) through tokserve_client, sharing the servers' cache."""

from __future__ import annotations

import asyncio
from typing import Any

from tokserve_client import Client, Encoded, ItemError, ItemsFailed, RetryPolicy

from app.bulk.job import BulkOptions
from app.errors import ProblemError

# items per request, and requests in flight unless --workers says otherwise
CHUNK = 16
WINDOW = 4
# a job outlasts a server that is busy, draining or restarting (a load balancer answers 502 or
# 504 meanwhile): 12 tries, pauses doubling from 0.5 s to 10 s
RETRY = RetryPolicy(
    attempts=12, backoff_s=0.5, max_wait_s=10.0, budget_s=120.0, statuses=(502, 503, 504)
)


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
        # one request per call: the job keeps ``window`` calls in flight itself
        client = Client(
            options.server, api_key=options.api_key, timeout_s=300.0, max_concurrency=1, retry=RETRY
        )
        models = client.models()
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
            results = _items(self.client.encode_images, readable, name, self.options.resize)
        else:
            results = _items(self.client.encode_audio, readable, name, self.options.codebooks)
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
