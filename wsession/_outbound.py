"""One session's outbound path: every frame, whoever sends it, in one order.

Frames come from the app's own ``send``, from ``Session.send_*`` and from the manager (send by
id, group, user, broadcast, close). The rule is simple:

- while nothing is being written, a frame is written at once;
- while a write is pending, every later frame waits in one queue, written in order by whichever
  task holds the *writer* role (the one whose write is pending). The role is handed on, never
  shared, so frames never overtake each other.

A server's ``send`` coroutine always runs to completion in the task that started it (no
coroutine is stepped by hand), so servers whose ``send`` enters a task-bound scope work.

The app's own frames wait for their turn (the app feels back-pressure, as without wsession);
manager frames never wait for a slow client: :func:`carry` hands them to the event loop's
*courier*, one task that writes every caller's frames in order and passes the rest of its work to
a fresh task whenever one client's write blocks (no task per message).

Works on asyncio and on trio (through anyio). This module owns the queue, the writer role and
the close sequence; the policy (what to do when the queue is full) is in ``_delivery.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import types
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator
from enum import Enum
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from . import _timers
from ._exceptions import SessionClosed
from ._log import log_warning
from ._timers import EMPTY_CONTEXT
from ._types import Message, Send

if TYPE_CHECKING:
    from ._session import Session


class Offer(Enum):
    """What :meth:`Outbound.offer` did with a frame."""

    WRITE = "write"  # the caller holds the writer role now: it must call carry()
    QUEUED = "queued"
    FULL = "full"
    GONE = "gone"


class _Waiter:
    """An app frame waiting in the queue; its sender awaits ``done``."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


# Bound once: on Python 3.11 every ``Offer.X`` goes through ``EnumType.__getattr__``, a Python
# call per lookup on the hot path of every broadcast recipient.
_WRITE, _QUEUED, _FULL, _GONE = Offer.WRITE, Offer.QUEUED, Offer.FULL, Offer.GONE

_Entry = tuple[Message, "_Waiter | None", int]
_NO_QUEUE: deque[_Entry] = deque(maxlen=0)  # shared; appending to it would drop the frame


class Outbound:
    """The outbound path of one connection (see the module docstring).

    Concurrency: every method may be called from any task of the connection's event loop.
    ``send`` waits for its own frame; ``offer`` and ``close`` never wait.
    """

    __slots__ = (
        "_driver",
        "_queue",
        "_room",
        "_server_send",
        "_session",
        "accepted",
        "busy",
        "close_deadline",
        "closed",
        "closing",
        "ended",
        "last_write",
        "max_bytes",
        "max_frames",
        "now",
        "queued_bytes",
        "reserved",
    )

    def __init__(
        self, session: Session, server_send: Send, max_frames: int, max_bytes: int, track: bool
    ) -> None:
        self._session = session  # told about accept, the app's close and a lost client
        self._server_send = server_send
        # Shared and empty until a frame must wait (an empty deque costs 760 bytes, and most
        # connections never queue anything).
        self._queue: deque[_Entry] = _NO_QUEUE
        self._room: anyio.Event | None = None
        self._driver: Callable[[], Any] | None = None  # cancels a helper task stuck writing
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        # The clock's now() while the idle timeout needs last_write (read once: no lookup of the
        # clock per frame), else None.
        self.now: Callable[[], float] | None = _timers.clock.now if track else None
        self.last_write = 0.0
        self.queued_bytes = 0
        self.busy = False  # a write is pending: the writer role is taken
        # The role is taken by a task that has not started writing yet. Frames queued then are
        # in transit, not waiting for a slow client: the bounds apply only once a write is
        # under way and others still see it (it blocked on the client).
        self.reserved = False
        self.accepted = False  # a websocket.accept was handed to the server (or is pending)
        self.closing = False  # wsession is closing: no more data, our close frame is queued
        self.close_deadline = 0.0  # when finish() stops waiting for our close frame (monotonic)
        self.closed = False  # a close frame (ours or the app's) or a denial was written
        self.ended = False  # nothing more can be written (closed, or the client left)

    @property
    def backlog(self) -> int:
        """Frames waiting behind the pending write."""
        return len(self._queue)

    # -- the app's own frames (and Session.send_*) ---------------------------------------------

    async def send(self, message: Message) -> None:
        """The app's ``send`` (and ``Session.send_message``): write ``message`` in order,
        waiting for its turn; raise what the server raised.

        After wsession closed the session, data frames raise :class:`SessionClosed` (an
        ``OSError``, so Starlette turns it into ``WebSocketDisconnect``) and the app's own close,
        accept or denial is dropped: the client already has wsession's close.
        """
        if message["type"] != "websocket.send" or self.busy or self.closing:
            await self._send_other(message)
            return
        # The hot path: a data frame on a writable connection, written at once.
        now = self.now
        if now is not None:
            self.last_write = now()
        self.busy = True
        try:
            await self._server_send(message)
        except OSError:
            self._lost()
            raise
        finally:
            if self._queue:
                self._release()
            else:
                self.busy = False

    async def _send_other(self, message: Message) -> None:
        if self.closing and (swallow := _after_our_close(message)) is not None:
            if swallow:
                return
            raise SessionClosed(self._session.id, "closed by the server")
        self._session._app_sends(message)
        if self.busy:
            await self._send_in_turn(message)
            return
        self.busy = True
        try:
            await self._write(message)
        finally:
            self._release()

    async def _send_in_turn(self, message: Message) -> None:
        waiter = _Waiter()
        entry: _Entry = (message, waiter, 0)
        self._queued().append(entry)
        try:
            await waiter.done.wait()
        except BaseException:
            if not waiter.done.is_set():
                _remove(self._queue, entry)  # cancelled before its turn: never written
            raise
        if waiter.error is not None:
            raise waiter.error

    # -- manager frames ----------------------------------------------------------------------------

    def offer(self, message: Message, nbytes: int) -> Offer:
        """Take a manager frame without waiting. ``WRITE``: the caller now holds the writer
        role and must pass the frame to :func:`carry`. ``FULL``: the queue is at its bounds
        (``max_frames`` frames, or ``max_bytes`` bytes once it holds anything)."""
        if self.ended or self.closing:
            return _GONE
        if not self.busy:
            # Written now (a frame dropped or left waiting is no message for the idle timeout;
            # a queued one counts when _drain writes it).
            if self.now is not None:
                self.last_write = self.now()
            self.busy = self.reserved = True
            return _WRITE
        queue = self._queue
        if not self.reserved and (
            len(queue) >= self.max_frames or (queue and self.queued_bytes + nbytes > self.max_bytes)
        ):
            return _FULL
        self._queued().append((message, None, nbytes))
        self.queued_bytes += nbytes
        return _QUEUED

    def replay(self, messages: list[Message]) -> None:
        """Queue a resumed session's missed messages, in order, ahead of any manager frame
        offered later (no bounds: the journal bounded them already)."""
        if self.ended or self.closing or not messages:
            return
        queue = self._queued()
        for message in messages:
            queue.append((message, None, 0))
        if not self.busy:
            self.busy = self.reserved = True
            spawn(self._write_queue)

    async def wait_for_room(self, timeout: float) -> bool:
        """Wait until the queue shrinks or the path ends; False after ``timeout``."""
        if self._room is None:
            self._room = anyio.Event()
        room = self._room
        with anyio.move_on_after(timeout):
            await room.wait()
            return True
        return False

    # -- closing ---------------------------------------------------------------------------------

    def close(self, code: int, reason: str, *, accept_first: bool, timeout: float) -> None:
        """Queue wsession's close frame behind the write in progress (data already queued is
        dropped; the app's frames waiting for their turn fail with :class:`SessionClosed`).

        ``accept_first``: the handshake is not accepted yet; accept it so the client can read
        the close code (a close before accept only gives it HTTP 403). ``timeout``: how long
        :meth:`finish` may wait for the close frame to be written.
        """
        if self.closing or self.ended:
            return
        self.closing = True
        self.close_deadline = monotonic() + timeout
        kept: deque[_Entry] = deque()
        for entry in self._queue:
            message, waiter, _ = entry
            if waiter is None:
                continue  # queued manager data: dropped
            if message["type"] == "websocket.accept" and accept_first:
                kept.append(entry)  # the app's own accept (it may name a subprotocol)
                accept_first = False
            else:
                self._settle(message, waiter, "closed by the server")
        if accept_first and not self.accepted:
            kept.append(({"type": "websocket.accept"}, None, 0))
        kept.append(({"type": "websocket.close", "code": code, "reason": reason}, None, -1))
        self._queue = kept
        self.queued_bytes = 0
        self._wake_room()
        if not self.busy:
            self.busy = self.reserved = True
            spawn(self._write_queue)

    async def finish(self) -> None:
        """Let wsession's queued close frame reach the server before the connection ends (the
        app may return before the writer task wrote it), until the close's deadline."""
        if not self.closing or self.ended:
            return
        with anyio.move_on_after(self.close_deadline - monotonic()):
            while not self.ended:
                if self._room is None:
                    self._room = anyio.Event()
                await self._room.wait()

    def shutdown(self) -> None:
        """The connection is over: fail every waiting frame and stop a helper task stuck on a
        client that will never read again."""
        self.ended = True
        self._fail_waiting()
        driver, self._driver = self._driver, None
        if driver is not None:
            driver()

    # -- writing -----------------------------------------------------------------------------------

    async def _write(self, message: Message) -> None:
        """Hand one frame to the server (the caller holds the writer role)."""
        self.reserved = False
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
        elif self.now is not None and kind == "websocket.send":
            self.last_write = self.now()
        try:
            await self._server_send(message)
        except OSError:
            self._lost()
            raise
        if kind == "websocket.accept":
            self._session._accepted(message)
        elif kind == "websocket.close" or kind == "websocket.http.response.body":
            self.closed = self.ended = True
            self._wake_room()

    def _lost(self) -> None:
        self.ended = True
        self._wake_room()
        self._session._connection_lost()

    async def _write_ours(self, message: Message, nbytes: int) -> None:
        """Write a frame wsession originated (a manager frame, its accept or close): errors end
        the path and never escape. They do not decide the session's end reason either: the
        app's ``receive`` reports how the client left."""
        self.reserved = False
        if nbytes == -1:
            await self._write_our_close(message)
            return
        if message["type"] == "websocket.accept":
            self.accepted = True
        elif self.now is not None:
            self.last_write = self.now()
        try:
            await self._server_send(message)
        except Exception:  # the client left, or the server refused the frame
            self._stop()

    async def _write_our_close(self, message: Message) -> None:
        try:
            await self._server_send(message)
        except OSError:
            pass
        except Exception as exc:
            # Some servers refuse some codes (daphne/autobahn: 1001 from a server). The client
            # should still learn that the server closed: fall back to 1000, once.
            log_warning(
                None,
                "server refused close code %s (%s): closing with 1000",
                message.get("code"),
                exc,
            )
            with contextlib.suppress(Exception):
                await self._server_send({**message, "code": 1000})
        self.closed = True
        self._stop()

    def _stop(self) -> None:
        """Nothing more can be written."""
        self.ended = True
        self._wake_room()

    async def _write_queue(self) -> None:
        """Write the queue in order (the caller holds the writer role; it is released here)."""
        self._driver = _canceller()
        try:
            await self._drain()
        finally:
            self._driver = None
            self._release()

    async def _drain(self) -> None:
        # self._queue is read anew each round: close() replaces it while a write is blocked.
        while self._queue and not self.ended:
            message, waiter, nbytes = self._queue.popleft()
            if nbytes > 0:
                self.queued_bytes -= nbytes
            self._wake_room()
            if waiter is None:
                await self._write_ours(message, nbytes)
                continue
            try:
                await self._write(message)
            except BaseException as exc:
                waiter.error = exc
                waiter.done.set()
                if not isinstance(exc, Exception):
                    raise
                continue
            waiter.done.set()
        if self.ended:
            self._fail_waiting()

    def _release(self) -> None:
        """Give the writer role up; if frames queued up meanwhile, hand it to a new task."""
        if self._queue and not self.ended:
            self.reserved = True  # busy stays True: the role passes to that task
            spawn(self._write_queue)
            return
        self.busy = self.reserved = False
        if self.ended:
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Nothing more will be written: wake the app frames still waiting (their sends raise
        :class:`SessionClosed`, except closes and accepts, which have nothing left to do)."""
        for message, waiter, _ in self._queue:
            if waiter is not None and not waiter.done.is_set():
                self._settle(message, waiter, "gone")
        self._queue = _NO_QUEUE
        self.queued_bytes = 0
        self._wake_room()

    def _settle(self, message: Message, waiter: _Waiter, state: str) -> None:
        """Wake an app frame that will never be written: a data frame's send raises
        :class:`SessionClosed`; an accept, close or denial has nothing left to do."""
        if message["type"] == "websocket.send":
            waiter.error = SessionClosed(self._session.id, state)
        waiter.done.set()

    def _queued(self) -> deque[_Entry]:
        if self._queue is _NO_QUEUE:
            self._queue = deque()
        return self._queue

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()


def _after_our_close(message: Message) -> bool | None:
    """For an app frame that comes after wsession's close: True to drop it silently (accept,
    close, denial), False to refuse it (data), None if not decided here."""
    kind = message["type"]
    if kind == "websocket.send":
        return False
    if kind in ("websocket.accept", "websocket.close") or kind.startswith("websocket.http."):
        return True
    return None


def _remove(queue: deque[_Entry], entry: _Entry) -> None:
    for i, queued in enumerate(queue):
        if queued is entry:
            del queue[i]
            return


# -- manager frames: carry a list of writes without blocking on any one client -----------------


class Carried:
    """How a :func:`carry` went: ``written`` frames completed, ``pending`` still being written,
    ``failed`` refused because the client had left."""

    __slots__ = ("_waiter", "failed", "pending", "written")

    def __init__(self, waiter: _Wakeup | None) -> None:
        self.written = 0
        self.pending = 0
        self.failed = 0
        self._waiter = waiter  # what carry() returns, resolved to self; None for carry_soon()

    def finish(self) -> None:
        """Every frame is written or pending: wake the caller (if it still waits)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self)


class _Wakeup(Protocol):
    """What a caller of :func:`carry` awaits: an asyncio future, or :class:`_TrioWakeup`."""

    def done(self) -> bool: ...
    def set_result(self, result: Carried, /) -> None: ...
    def __await__(self) -> Generator[Any, Any, Carried]: ...


class _TrioWakeup:
    """The subset of an asyncio future that :func:`carry` uses, on trio."""

    __slots__ = ("_event", "_result")

    def __init__(self) -> None:
        import trio

        self._event = trio.Event()
        self._result: Carried | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, result: Carried, /) -> None:
        self._result = result
        self._event.set()

    def __await__(self) -> Generator[Any, Any, Carried]:
        yield from self._event.wait().__await__()
        assert self._result is not None
        return self._result


_Job = tuple[Iterator[tuple["Outbound", Message]], Carried]


class _Courier:
    """Writes manager frames for one event loop: jobs in order, one task at a time.

    The task in ``holder`` has the *courier* role while this object is in ``_COURIERS``. It
    writes each job's frames one after the other with the server's own ``send`` (run to
    completion in that task). When a write blocks on a slow client, that task stays the client's
    writer and the role (with the rest of the job, ``jobs[0]``, and the jobs behind it) passes to
    a fresh task, so no client holds up another. Out of work, the holder waits one loop turn for
    more (a loop of sends by id reuses it) and ends. No task per message, nor per caller.
    """

    __slots__ = ("holder", "jobs", "key", "loop")

    def __init__(self, key: object, loop: asyncio.AbstractEventLoop | None) -> None:
        self.key = key
        self.loop = loop  # None on trio
        self.jobs: deque[_Job] = deque()
        self.holder: object = None

    def waiter(self) -> _Wakeup:
        return self.loop.create_future() if self.loop is not None else _TrioWakeup()

    def start(self) -> None:
        """A fresh task takes the courier role, in a context of its own, not the caller's: it
        writes for every caller on this loop. (Trio's system tasks have their own already.)"""
        if self.loop is None:
            import trio

            self.holder = trio.lowlevel.spawn_system_task(_courier_on_trio, self)
            return
        task = self.loop.create_task(_quietly(_courier, self), context=contextvars.Context())
        self.holder = task
        _TASKS.add(task)  # the loop keeps tasks only weakly
        task.add_done_callback(self.ended)

    def ended(self, holder: object) -> None:
        """A courier task ended. If it still held the role, it was cancelled (the event loop
        is shutting down, perhaps before the task even started): wake every caller still
        waiting, and let the next carry on this loop start afresh."""
        _TASKS.discard(holder)
        if holder is not self.holder:
            return  # handed the role on, or gave it up for want of work
        self.holder = None
        del _COURIERS[self.key]
        while self.jobs:
            self.jobs.popleft()[1].finish()


_COURIERS: dict[object, _Courier] = {}  # by event loop (trio: its token), while one runs


def _post(writes: list[tuple[Outbound, Message]], waiting: bool) -> Carried:
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        key: object = loop
    except RuntimeError:
        import trio

        loop, key = None, trio.lowlevel.current_trio_token()
    courier = _COURIERS.get(key)
    if courier is None:
        courier = _COURIERS[key] = _Courier(key, loop)
        courier.start()
    result = Carried(courier.waiter() if waiting else None)
    courier.jobs.append((iter(writes), result))
    return result


def carry(writes: list[tuple[Outbound, Message]]) -> Awaitable[Carried]:
    """Write frames whose writer role the caller took with :meth:`Outbound.offer`; the
    awaitable returned resolves once each is written or pending (never waits for a slow
    client). They are written by this event loop's courier task (see :class:`_Courier`), in
    order with everything else carried. (A plain function: no coroutine per send.)

    Cancelling the caller does not cancel the writes: the writer roles are taken already.
    """
    waiter = _post(writes, True)._waiter
    assert waiter is not None
    return waiter


def carry_soon(writes: list[tuple[Outbound, Message]]) -> None:
    """Like :func:`carry`, for callers that cannot wait at all: the writes start soon, in
    order with everything else for their sessions (the writer roles are already taken)."""
    _post(writes, False)


async def _courier(courier: _Courier) -> None:
    jobs = courier.jobs
    me = _canceller()
    writing: Outbound | None = None  # whose write is pending (this task is suspended in it)
    armed = False  # a hand_on is scheduled
    handed_on = False

    def hand_on() -> None:
        # Runs when this task gave the loop control: if that was in a write, the write blocked.
        nonlocal armed, handed_on
        armed = False
        if writing is None or handed_on:
            return  # it was waiting for more work
        handed_on = True
        writing._driver = me  # this task stays the blocked client's writer
        jobs[0][1].pending += 1
        courier.start()  # the rest of jobs[0], and the jobs behind it

    while True:
        if not jobs:
            await (_one_turn() if courier.loop is not None else _trio_checkpoint())
            if not jobs:  # give the role up: the next carry starts a new courier
                courier.holder = None
                del _COURIERS[courier.key]
                return
        if not armed:
            armed = True
            call_soon(hand_on)
        writes, result = jobs[0]
        for outbound, message in writes:
            # A manager data frame: the server's send, with no wrapper around it (the hot path
            # of a broadcast).
            outbound.reserved = False
            writing = outbound
            try:
                await outbound._server_send(message)
            except Exception:  # the client left, or the server refused the frame
                outbound._stop()
            except BaseException:  # cancelled (the loop is ending): give the role back
                outbound._driver = None
                outbound._release()
                raise
            if handed_on:
                writing = None
                await outbound._write_queue()  # what queued up behind the blocked write
                return
            if outbound._queue or outbound.ended:
                outbound._release()
            else:
                outbound.busy = False  # what _release() does then, without a call per recipient
            if outbound.ended and not outbound.closed:
                result.failed += 1
            else:
                result.written += 1
        writing = None
        jobs.popleft()
        result.finish()


async def _courier_on_trio(courier: _Courier) -> None:
    import trio

    try:
        await _quietly(_courier, courier)
    finally:
        courier.ended(trio.lowlevel.current_task())


@types.coroutine
def _one_turn() -> Generator[None, None, None]:
    """``asyncio.sleep(0)`` without its extra coroutine: a task yielding ``None`` is
    rescheduled after the callbacks already due."""
    yield


async def _trio_checkpoint() -> None:
    import trio

    await trio.lowlevel.checkpoint()


# -- the event loop, whichever it is ---------------------------------------------------------------


def spawn(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run ``function(*args)`` in a new task that nobody waits for (asyncio or trio), in a
    context of its own: it writes frames other tasks sent, so it must not carry the context of
    the task that happened to start it (trio's system tasks have their own already)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        trio.lowlevel.spawn_system_task(_quietly, function, *args)
        return
    task = loop.create_task(_quietly(function, *args), context=contextvars.Context())
    _TASKS.add(task)  # the loop keeps tasks only weakly
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[Any]] = set()


async def _quietly(function: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await function(*args)
    except anyio.get_cancelled_exc_class():
        pass
    except Exception:
        from ._log import log_error

        log_error(None, "wsession writer task failed", exc=True)


def call_soon(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` once the event loop next gets control; returns a canceller."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        cancelled = False

        def guarded() -> None:
            if not cancelled:
                callback()

        def cancel() -> None:
            nonlocal cancelled
            cancelled = True

        trio.lowlevel.current_trio_token().run_sync_soon(guarded)
        return cancel
    return loop.call_soon(callback, context=EMPTY_CONTEXT).cancel


def _canceller() -> Callable[[], Any] | None:
    """Something that cancels the current helper task (asyncio only; None on trio)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    return task.cancel if task is not None else None
