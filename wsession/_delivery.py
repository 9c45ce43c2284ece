"""Sending to a session from any task: ordered, bounded, never blocking the caller on a
slow client, and never raising the server's send-after-close errors.

The fast path awaits nothing extra: the session's ``send`` is *stepped* once by hand. With
uvicorn a writable connection completes the send in that step (no task, no queue). Only when the
step suspends (the client is not reading and the server applied back-pressure) does the rest of
that send, and every later out-of-band message, go to a per-session backlog drained by one task:
later senders never overtake it, and the backlog's length is bounded by the slow-consumer policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Coroutine
from enum import StrEnum
from time import monotonic
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ._log import log_warning
from ._session import EndReason, Session, SessionState
from ._timers import call_later
from ._types import Message

if TYPE_CHECKING:
    from ._manager import SessionManager


class SendResult(StrEnum):
    """What happened to one out-of-band send."""

    DELIVERED = "delivered"
    """Handed to the server (written to the connection)."""
    QUEUED = "queued"
    """Accepted into the session's bounded backlog; it will be written in order."""
    DROPPED = "dropped"
    """Not sent: the backlog was full and the policy is ``drop``."""
    GONE = "gone"
    """Not sent: unknown id, or the session is not open (or the slow-consumer policy closed it)."""


class SlowConsumerPolicy(StrEnum):
    """What to do when a session's backlog reaches ``max_backlog`` messages."""

    CLOSE = "close"
    """Close the session with ``slow_consumer_code`` (default 1013, "try again later")."""
    DROP = "drop"
    """Drop the new message (``SendResult.DROPPED``); the session stays open."""
    WAIT = "wait"
    """Make the sender wait up to ``send_timeout`` seconds for room, then close as ``close``."""


def to_message(data: Any) -> Message:
    """Build a ``websocket.send`` message: ``str`` as text, ``bytes`` as binary, anything else as
    JSON text (pydantic models with ``model_dump_json``)."""
    if isinstance(data, str):
        return {"type": "websocket.send", "text": data}
    if isinstance(data, bytes | bytearray | memoryview):
        return {"type": "websocket.send", "bytes": bytes(data)}
    if isinstance(data, BaseModel):
        return {"type": "websocket.send", "text": data.model_dump_json()}
    return {"type": "websocket.send", "text": json.dumps(data, separators=(",", ":"))}


def try_deliver(manager: SessionManager, session: Session, message: Message) -> SendResult | None:
    """Send without awaiting: the result, or ``None`` when the ``wait`` policy must wait."""
    if session.state is not SessionState.OPEN or session._send is None:
        return SendResult.GONE
    backlog = session._backlog
    if backlog is None:
        return _send_eagerly(session, message)
    settings = manager.settings
    if len(backlog) < settings.max_backlog:
        backlog.append(message)
        return SendResult.QUEUED
    if settings.slow_consumer is SlowConsumerPolicy.DROP:
        manager.stats.dropped += 1
        return SendResult.DROPPED
    if settings.slow_consumer is SlowConsumerPolicy.WAIT:
        return None
    _close_slow_consumer(manager, session)
    return SendResult.GONE


async def deliver(manager: SessionManager, session: Session, message: Message) -> SendResult:
    """Send ``message`` on ``session`` from any task; see :class:`SendResult`. Never raises for
    a closed or vanished connection. Counted in ``stats.sends``."""
    result = try_deliver(manager, session, message)
    while result is None:
        if not await _wait_for_room(session, manager.settings.send_timeout):
            _close_slow_consumer(manager, session)
            result = SendResult.GONE
            break
        result = try_deliver(manager, session, message)
    manager.stats.sends[result] += 1
    return result


def _close_slow_consumer(manager: SessionManager, session: Session) -> None:
    manager.stats.slow_consumers += 1
    log_warning(session.id, "slow consumer %s: backlog full, closing", session.id)
    close_session(manager, session, manager.settings.slow_consumer_code, "slow consumer", grace=0.0)


def _send_eagerly(session: Session, message: Message) -> SendResult:
    send = session._raw_send or session._send
    assert send is not None
    if session._idle_timer is not None:
        session._last_activity = monotonic()  # outgoing frames count as activity too
    coro = send(message)
    try:
        yielded = coro.send(None)
    except StopIteration:
        return SendResult.DELIVERED
    except (OSError, RuntimeError):
        return SendResult.GONE
    # The server applied back-pressure: finish this send, then the backlog, in one task.
    session._backlog = deque()
    task = asyncio.get_running_loop().create_task(_drain(session, coro, yielded))
    session._drainer = task
    return SendResult.QUEUED


async def _drain(session: Session, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
    backlog = session._backlog
    try:
        await _resume(coro, yielded)
        while backlog and (send := session._send) is not None:
            message = backlog.popleft()
            if session._room is not None:
                session._room.set()
            await send(message)
    except (OSError, RuntimeError):
        pass  # the client left: the session's own task sees that and ends it
    finally:
        session._backlog = None
        session._drainer = None
        if session._room is not None:
            session._room.set()


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
    """Drive a coroutine that already ran up to its first suspension (what a Task would do)."""
    while True:
        if yielded is None:
            await asyncio.sleep(0)
        else:
            try:
                # Wait for the future the coroutine is blocked on without taking its result:
                # the coroutine reads that itself when resumed.
                await asyncio.wait({yielded})
            except asyncio.CancelledError:
                coro.throw(asyncio.CancelledError())
                raise
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


async def _wait_for_room(session: Session, timeout: float) -> bool:
    if session._room is None:
        session._room = asyncio.Event()
    room = session._room
    room.clear()
    try:
        async with asyncio.timeout(timeout):
            await room.wait()
    except TimeoutError:
        return False
    return True


def close_session(
    manager: SessionManager,
    session: Session,
    code: int,
    reason: str,
    *,
    grace: float | None = None,
    end_reason: EndReason = EndReason.SERVER_CLOSED,
) -> bool:
    """Close ``session`` from outside its task (kick, limits, slow consumer, drain).

    Records ``end_reason`` first (so disconnect hooks see it), sends the close frame without
    waiting on a stuck client, and ends the app's task if it has not finished within ``grace``
    seconds (``close_timeout`` by default): its disconnect hooks then run exactly once as for any
    other ending. Returns False when the session was already ending.
    """
    if session.state not in (SessionState.OPEN, SessionState.CONNECTING) or session._send is None:
        return False
    was_open = session.state is SessionState.OPEN
    session._end(end_reason, code, reason)
    if session._backlog is not None:
        session._backlog.clear()
    if session._room is not None:
        session._room.set()  # wake senders waiting for room: they will find it closed
    if was_open:
        _send_eagerly_ignoring(session, {"type": "websocket.close", "code": code, "reason": reason})
    task = session._task
    if task is not None and not task.done():
        delay = manager.settings.close_timeout if grace is None else grace
        session._force_end = call_later(delay, force_end, session)
    return True


def _send_eagerly_ignoring(session: Session, message: Message) -> None:
    assert session._send is not None
    coro = session._send(message)
    try:
        yielded = coro.send(None)
    except (StopIteration, OSError, RuntimeError):
        return
    asyncio.get_running_loop().create_task(_finish_quietly(coro, yielded))


async def _finish_quietly(coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        await _resume(coro, yielded)


def force_end(session: Session) -> None:
    """Cancel the app of a session wsession has closed, so its teardown runs now."""
    task = session._task
    if task is not None and not task.done() and session.state is not SessionState.CLOSED:
        session._forced = True
        task.cancel()
