"""A clock that moves only when the test says so."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .. import _timers


class _ManualTimer:
    """One call armed on a :class:`ManualClock` (``wsession._timers.Timer``)."""

    __slots__ = ("args", "callback", "cancelled", "loop", "when")

    def __init__(
        self,
        when: float,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:
        self.when = when
        self.loop = loop
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (no effect once it ran)."""
        self.cancelled = True

    def run(self) -> None:
        if not self.cancelled:
            self.cancelled = True  # run at most once
            # A fresh empty context, as the system clock's timers run in (see wsession._timers).
            contextvars.Context().run(self.callback, *self.args)


class ManualClock:
    """A clock for tests: wsession's time stands still until :meth:`advance` moves it.

    Installed (``with ManualClock() as clock:``, or the ``wsession_clock`` pytest fixture), it
    replaces the clock wsession reads and arms its timers on (see ``wsession._timers``): the idle
    timeout, the force-end after ``close_timeout``, and the ``connect_timeout`` deadline. Those
    timers then fire only inside :meth:`advance`, in time order, each on its own event loop::

        with ManualClock() as clock, connect(client, "/ws") as conn:  # idle_timeout=300
            clock.advance(299)   # nothing happens
            clock.advance(1)     # the idle check runs: wsession closes the session
            assert conn.receive_close() == (4408, "idle timeout")

    Install it before opening the connections it should govern: a connection keeps the clock
    that was in force when it started.

    Thread safety: :meth:`advance` may be called from the test's thread while the app runs on
    another thread (Starlette's ``TestClient``): each due callback is handed to its loop and
    ``advance`` waits until it ran. Called from the loop's own thread (async tests), it runs
    the callbacks directly.

    Args:
        start: the initial reading of :meth:`now` (default: the real ``time.monotonic()``, so
            times taken before the clock was installed stay comparable).
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.monotonic() if start is None else float(start)
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()  # equal deadlines fire in the order they were armed
        self._lock = threading.Lock()
        self._previous: list[_timers.Clock] = []

    # -- the Clock protocol (called by wsession) --------------------------------------------

    def now(self) -> float:
        """The current reading in seconds (moves only in :meth:`advance`)."""
        return self._now

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> _timers.Timer:
        """Arm ``callback(*args)`` at ``now() + delay`` on the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            timer = _ManualTimer(self._now + max(delay, 0.0), loop, callback, args)
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    # -- driving it (called by the test) ----------------------------------------------------

    def advance(self, seconds: float, *, timeout: float = 5.0) -> None:
        """Move time forward by ``seconds``, running every timer that falls due on the way (in
        deadline order; a timer armed by one of them runs too if it falls due in the window).

        Args:
            seconds: how far to move (0 runs what is due now).
            timeout: how long to wait for one callback on another thread's loop.

        Raises:
            ValueError: ``seconds`` is negative (a monotonic clock does not go back).
            TimeoutError: a callback's loop did not run it within ``timeout`` (the loop is
                blocked, or no longer running).
        """
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        target = self._now + seconds
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > target:
                    break
                when, _, timer = heapq.heappop(self._timers)
                if timer.cancelled:
                    continue
                self._now = max(self._now, when)
            self._fire(timer, timeout)
        with self._lock:
            self._now = max(self._now, target)

    @property
    def pending(self) -> int:
        """How many armed timers have neither run nor been cancelled."""
        with self._lock:
            return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_deadline(self) -> float | None:
        """Seconds from now until the next armed timer, or None if none is armed."""
        with self._lock:
            live = [when for when, _, timer in self._timers if not timer.cancelled]
        return None if not live else max(min(live) - self._now, 0.0)

    @staticmethod
    def _fire(timer: _ManualTimer, timeout: float) -> None:
        loop = timer.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            timer.run()
            return
        if loop.is_closed():
            return  # its connection's loop is gone: nothing left to act on
        ran = threading.Event()
        failure: list[BaseException] = []

        def run_on_loop() -> None:
            try:
                timer.run()
            except BaseException as exc:  # reported in the test's thread
                failure.append(exc)
            finally:
                ran.set()

        try:
            loop.call_soon_threadsafe(run_on_loop)
        except RuntimeError:
            return  # closed between the check and the call
        if not ran.wait(timeout):
            raise TimeoutError(f"the event loop did not run {timer.callback!r} within {timeout}s")
        if failure:
            raise failure[0]

    # -- installing it ----------------------------------------------------------------------

    def install(self) -> None:
        """Make this the clock wsession uses (undo with :meth:`uninstall`)."""
        self._previous.append(_timers.set_clock(self))

    def uninstall(self) -> None:
        """Put back the clock that was in force before :meth:`install`.

        Raises:
            RuntimeError: the clock is not installed.
        """
        if not self._previous:
            raise RuntimeError("this ManualClock is not installed")
        _timers.set_clock(self._previous.pop())

    def __enter__(self) -> ManualClock:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()
