"""Timers that do not keep a finished connection alive.

``loop.call_later`` snapshots the current context, and asyncio keeps a cancelled timer (and its
context) until its deadline. Inside a connection the context holds ``current_session``, so an
ordinary timer would keep a closed session (and the server's connection object behind its send)
alive for up to the timer's delay. These timers run in an empty context instead.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio

EMPTY_CONTEXT = contextvars.Context()
"""An empty context for callbacks that must not keep a connection's context alive."""


def call_later(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
    """``loop.call_later`` in an empty context (see the module docstring)."""
    return asyncio.get_running_loop().call_later(delay, callback, *args, context=EMPTY_CONTEXT)


class Deadline:
    """``with Deadline(seconds):`` raises ``TimeoutError`` when the block runs past the deadline
    (like ``asyncio.timeout``, whose timer would hold the context). asyncio only."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self.expired = False
        """True once the deadline fired (so a ``TimeoutError`` from the block itself can be told
        apart from ours)."""
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        self._task = asyncio.current_task()
        self._handle = call_later(self._delay, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        task, self._task = self._task, None
        if (
            self.expired
            and exc_type is asyncio.CancelledError
            and task is not None
            and task.uncancel() == 0
        ):
            raise TimeoutError from exc


async def timed_out(awaitable: Awaitable[Any], remaining: float) -> bool:
    """Await ``awaitable`` for at most ``remaining`` seconds; True if this deadline cut it (a
    ``TimeoutError`` the awaitable raises itself propagates: it is its own error, not ours)."""
    try:
        asyncio.current_task()
    except RuntimeError:  # not asyncio (trio)
        with anyio.move_on_after(remaining) as scope:
            await awaitable
        return scope.cancelled_caught
    deadline = Deadline(max(remaining, 0.0))
    try:
        with deadline:
            await awaitable
    except TimeoutError:
        if deadline.expired:
            return True
        raise
    return False
