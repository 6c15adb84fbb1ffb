"""Graceful shutdown: on SIGTERM readiness fails at once, in-flight and queued work finish within
TOKSERVE_DRAIN_TIMEOUT_S counted from the signal, then the process exits 0.

``Drain`` is the clock (the Engine owns one; /readyz and ``Engine.stop`` read it);
``GracefulServer`` is uvicorn's server with the signal handler that starts it.
"""

from __future__ import annotations

import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI


class Drain:
    """When draining began (the first stop signal, or the engine's stop) and what is left of
    ``timeout_s`` since then."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.since: float | None = None  # time.monotonic() of the first begin()

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        """Readiness fails from now on; the drain time counts from the first call."""
        if self.since is None:
            self.since = time.monotonic()

    def left_s(self) -> float:
        """Seconds left of ``timeout_s`` for the queues, after what in-flight requests took."""
        spent = time.monotonic() - (self.since or time.monotonic())
        return max(0.0, self.timeout_s - spent)


class GracefulServer(uvicorn.Server):
    """On SIGTERM readiness fails at once, in-flight and queued work finish, then exit 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None:
            engine.drain.begin()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown; a drained SIGTERM is a clean exit
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End live streams first (their last results, END, close 1001): uvicorn's own
        shutdown would cut every WebSocket at once with 1012."""
        # uvicorn shuts down only a server whose startup completed: the lifespan built the engine
        engine = self.app.state.engine
        engine.streams.end_all()
        await engine.streams.wait_closed(engine.drain.left_s())
        await super().shutdown(sockets)
