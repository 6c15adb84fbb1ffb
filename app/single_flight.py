"""Single-flight: identical computations in flight at the same moment run once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _LeaderGone(Exception):
    """The leader was cancelled, or failed for a reason of its own; followers compute themselves."""


class SingleFlight:
    """Identical computations in flight run once; followers share the leader's outcome.

    ``leader_only`` names exceptions that concern the leader's caller alone (its deadline passed,
    say): the leader raises them, and its followers compute for themselves instead of sharing them.
    """

    def __init__(self, leader_only: tuple[type[BaseException], ...] = ()) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        # the leader's own endings: its followers compute for themselves
        self._leader_gone: tuple[type[BaseException], ...] = (asyncio.CancelledError, *leader_only)

    def __len__(self) -> int:
        """Keys being computed now."""
        return len(self._inflight)

    async def run(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """``await compute()``, or share the outcome of the one already running for ``key``."""
        while (leader := self._inflight.get(key)) is not None:
            try:
                # shield: a cancelled follower must not cancel the shared future.
                result: T = await asyncio.shield(leader)
                return result
            except _LeaderGone:
                continue
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = outcome
        try:
            value = await compute()
        except self._leader_gone:
            outcome.set_exception(_LeaderGone())
            raise
        except BaseException as exc:
            outcome.set_exception(exc)
            raise
        else:
            outcome.set_result(value)
            return value
        finally:
            del self._inflight[key]
            # Followers already hold the outcome; retrieving it keeps asyncio from logging
            # "exception was never retrieved" when there were none.
            outcome.exception()
            del outcome  # it holds the traceback, which holds this frame: a reference cycle
