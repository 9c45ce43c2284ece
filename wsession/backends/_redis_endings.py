"""Endings the Redis registry runs for sessions with no connection here: detached sessions its
sweep ended, and the sessions of a lost worker (or of this node id's previous start) that it
claimed. Each runs its hooks once, in tasks of their own, never in the heartbeat task: a slow
disconnect hook must not hold the next lease renewal (else the other workers would declare this
worker lost).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from .._log import log_error, log_warning

Ending = Callable[[], Awaitable[None]]


class Endings:
    """A queue of endings run by at most ``concurrency`` tasks, in the order they came.

    Each ending is taken from the queue once and awaited once (it runs the session's hooks, which
    shield themselves from cancellation). :meth:`close` waits for them all: none is dropped, none
    runs twice.

    Concurrency: used from the event loop's tasks only; :meth:`add` never waits.
    """

    def __init__(self, concurrency: int) -> None:
        self._concurrency = concurrency
        self._queue: deque[Ending] = deque()
        self._runners: set[asyncio.Task[None]] = set()
        self._running = 0  # endings taken from the queue and not finished
        self._closing = False

    def __len__(self) -> int:
        """Endings queued or under way."""
        return len(self._queue) + self._running

    def add(self, ending: Ending) -> None:
        """Queue ``ending`` (a coroutine function that logs its own failures)."""
        self._queue.append(ending)
        if self._closing or len(self._runners) < self._concurrency:
            self._spawn()

    def _spawn(self) -> None:
        runner = asyncio.get_running_loop().create_task(self._run())
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)

    async def _run(self) -> None:
        me = asyncio.current_task()
        try:
            while self._queue:
                ending = self._queue.popleft()
                self._running += 1
                try:
                    await ending()
                except Exception:
                    log_error(None, "a session ending failed", exc=True)
                except asyncio.CancelledError:
                    if me is None or me.cancelling():
                        raise  # this runner is cancelled (the loop is closing)
                    # A hook's own (it awaited something cancelled): a failure like any
                    # other, not a reason to leave the queue with no runner.
                    log_error(None, "a session ending failed", exc=True)
                finally:
                    self._running -= 1
        finally:
            # At once, not in the done callback (which runs later): an add() in between would
            # count this runner as live and leave its ending queued with no runner.
            self._runners.discard(me)

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the queued endings; then start every one still
        queued at once and wait for all of them (each hook is bounded by
        ``disconnect_timeout``). Endings added meanwhile start at once. Never cancels one: if
        the caller is cancelled, they go on in their tasks."""
        if self._runners:
            await asyncio.wait(set(self._runners), timeout=timeout)
        self._closing = True
        if self._queue:
            log_warning(
                None,
                "%d session ending(s) still queued after %ss at shutdown: running them at once",
                len(self._queue),
                timeout,
            )
            for _ in range(len(self._queue)):
                self._spawn()
        while self._runners:  # bounded: each ending's hooks are bounded in time
            await asyncio.wait(set(self._runners))
        self._closing = False
