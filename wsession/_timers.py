"""wsession's clock and its timers: every delay wsession arms goes through here.

**The clock.** ``clock`` (a :class:`Clock`) is what wsession reads for "now" and arms its timers
on. By default it is :class:`SystemClock`: ``time.monotonic`` and the event loop's own timers.
Tests replace it (``wsession.testing.ManualClock`` calls :func:`set_clock`) so that time moves
only when the test advances it: an ``idle_timeout=300`` session closes on ``clock.advance(300)``
without sleeping. It governs:

- the idle timeout (``session._last_activity``, ``Outbound.last_write`` and the idle check);
- the force-end timer after wsession closed a session (``close_timeout``, ``_delivery.end_later``);
- the ``connect_timeout`` deadline of async connect hooks (:class:`Deadline`).

anyio/asyncio deadlines written inline (``disconnect_timeout``, ``send_timeout``, the drain and
Redis command timeouts) run on real time.

**For new time-based features** (resume windows, credential expiry, ...): read the time with
``_timers.clock.now()`` and arm delays with :func:`call_later` (or :class:`Deadline`), never
``time.monotonic()`` / ``loop.call_later`` directly, and tests can drive them with the same
clock. Read ``clock`` through the module (``_timers.clock``) at the time of use: a name imported
with ``from ._timers import clock`` would keep the clock that was in force at import.

**The hot path.** Reading the clock must cost next to nothing per message, and only with an
``idle_timeout``: a connection's outbound path looks up ``clock.now`` once when it starts and
keeps the bound callable (for :class:`SystemClock` it *is* ``time.monotonic``), and its receive
reads ``clock.now()`` per message, so a clock must be installed before the connections it
should govern.

**Empty context.** ``loop.call_later`` snapshots the current context, and asyncio keeps a
cancelled timer (and its context) until its deadline. Inside a connection the context holds
``current_session``, so an ordinary timer would keep a closed session (and the server's
connection object behind its send) alive for up to the timer's delay. These timers run in an
empty context instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

import anyio

EMPTY_CONTEXT = contextvars.Context()
"""An empty context for callbacks that must not keep a connection's context alive."""


class Timer(Protocol):
    """A pending call armed by :meth:`Clock.call_later` (``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None:
        """Do not run the callback (no effect once it ran)."""


class Clock(Protocol):
    """Where wsession reads the time and arms its timers (see the module docstring)."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the running event loop ``delay`` seconds from now, in an
        empty context. Called only from a task or callback of that loop."""


class SystemClock:
    """Real time: ``time.monotonic`` and the running asyncio loop's timers."""

    def __init__(self) -> None:
        # An attribute, not a method: ``clock.now`` is then time.monotonic itself, so the
        # callable a connection keeps costs what a direct call costs.
        self.now: Callable[[], float] = time.monotonic

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """``loop.call_later`` in an empty context (see the module docstring)."""
        return asyncio.get_running_loop().call_later(delay, callback, *args, context=EMPTY_CONTEXT)


clock: Clock = SystemClock()
"""The clock in force (replace it with :func:`set_clock`)."""


def set_clock(new: Clock) -> Clock:
    """Make ``new`` the clock wsession reads and arms timers on; return the previous one.

    Affects connections that start afterwards (see the module docstring) and timers armed
    afterwards; timers already armed stay on the clock that armed them.
    """
    global clock
    previous, clock = clock, new
    return previous


def call_later(delay: float, callback: Callable[..., object], *args: Any) -> Timer:
    """Arm ``callback(*args)`` ``delay`` seconds from now on the clock in force, in an empty
    context (see the module docstring)."""
    return clock.call_later(delay, callback, *args)


class Deadline:
    """``with Deadline(seconds):`` raises ``TimeoutError`` when the block runs past the deadline
    (like ``asyncio.timeout``, whose timer would hold the context, and which would not follow
    the clock in force). asyncio only."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self.expired = False
        """True once the deadline fired (so a ``TimeoutError`` from the block itself can be told
        apart from ours)."""
        self._task: asyncio.Task[Any] | None = None
        self._handle: Timer | None = None

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
