"""One WebSocket connection's life: connect hooks, the app, exactly-once teardown."""

from __future__ import annotations

import asyncio
import inspect
from contextlib import nullcontext
from http import HTTPStatus
from time import monotonic, perf_counter
from typing import Any

import anyio

from ._context import SCOPE_KEY, current_session
from ._delivery import close_session, force_end
from ._exceptions import Refuse
from ._lifecycle import count_ending, run_disconnect_hooks
from ._log import log_error, log_warning
from ._manager import SessionManager
from ._session import EndReason, Session, SessionState
from ._shield import run_shielded
from ._timers import Deadline, call_later
from ._types import ASGIApp, Message, Receive, Scope, Send

_DENIAL = "websocket.http.response"


async def serve_connection(
    manager: SessionManager, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> Any:
    """Run ``app`` for one WebSocket scope inside a managed session; return what it returns.

    One coroutine for the whole connection (admission, the app, teardown): every message the app
    awaits resumes through each frame between the server and the app, so fewer is faster.
    """
    await manager._ensure_started()  # no lifespan entered it (daphne): enter it once, now
    first: Message | None = await receive()
    assert first is not None
    if first["type"] != "websocket.connect":
        # The client left before the handshake reached us: nothing to manage, pass it on.
        return await app(scope, _replay(first, receive), send)

    scope = dict(scope)  # never mutate the server's scope
    session = Session(manager.id_factory(), scope, None, manager.new_data())
    scope[SCOPE_KEY] = session
    current_session.set(session)  # the connection's own task: no token to keep
    refusal = await _admit(manager, session, scope)
    if refusal is not None:
        manager.stats.refused += 1
        manager.stats.refused_by[refusal.label] += 1
        current_session.set(None)
        await _refuse(scope, send, refusal)
        return None

    settings = manager.settings
    track = settings.idle_timeout is not None
    pump: asyncio.Task[None] | None = None
    if settings.detect_disconnect:
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        pump = asyncio.get_running_loop().create_task(_pump(manager, session, receive, inbox))
        receive = inbox.get

    async def receive_wrapper() -> Message:
        nonlocal first
        if first is not None:
            message, first = first, None
            return message
        message = await receive()
        if message["type"] == "websocket.disconnect":
            session._client_disconnected(message)
        elif track:
            session._last_activity = monotonic()
        return message

    async def send_wrapper(message: Message) -> None:
        if message["type"] != "websocket.send":
            return await _send_control(session, send, message)
        if track:
            session._last_activity = monotonic()
        try:
            await send(message)
        except OSError:
            # uvicorn's ClientDisconnected: the peer is gone. Let the app see it unchanged.
            session._end(EndReason.CONNECTION_LOST, 1006, None)
            raise

    session._send = send_wrapper
    # Out-of-band data frames may skip the wrapper when the server's send is a coroutine
    # function (it can be stepped by hand, see _delivery.py).
    session._raw_send = send if inspect.iscoroutinefunction(send) else send_wrapper
    session._task = _current_task()
    manager.stats.accepted += 1
    manager.admission.acquire(session)
    manager.local[session.id] = session
    if track:
        _arm_idle_timer(manager, session)
    try:
        await manager.registry.add(session)
        return await app(scope, receive_wrapper, send_wrapper)
    except BaseException as exc:
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            if session._forced and _uncancel_own(session):
                # We cancelled the app to end a closed session (kick, slow consumer, drain):
                # the close frame is on its way, so end normally rather than as an error.
                return None
            session._end(EndReason.CANCELLED, None, None)
        else:
            session._end(EndReason.APP_RAISED, 1011, None)
        raise  # the same object, never wrapped
    finally:
        if session.end_reason is None:
            session._end(EndReason.APP_RETURNED, None, None)
        session.state = SessionState.CLOSED
        for timer in (session._force_end, session._idle_timer):
            if timer is not None:
                timer.cancel()
        if pump is not None:
            pump.cancel()
        await _teardown(manager, session)
        current_session.set(None)


async def _admit(manager: SessionManager, session: Session, scope: Scope) -> Refuse | None:
    """Admission checks and connect hooks; the refusal, if any."""
    admission = manager.admission
    refusal = admission.before_hooks(session, scope, len(manager.local))
    if refusal is not None:
        return refusal
    refusal = await _run_connect_hooks(manager, session)
    if refusal is None and (refusal := admission.after_hooks(session)) is not None:
        # The connect hooks completed, so their disconnect hooks are owed.
        session._end(EndReason.REFUSED, None, refusal.reason)
        session.state = SessionState.CLOSED
        await run_shielded(run_disconnect_hooks(manager, session))
    return refusal


async def _send_control(session: Session, send: Send, message: Message) -> None:
    """Send a non-data message (accept, close, denial), tracking the session's state."""
    kind = message["type"]
    if kind == "websocket.close":
        session._end(EndReason.APP_CLOSED, int(message.get("code", 1000)), message.get("reason"))
    elif kind == "websocket.http.response.start":
        session._end(EndReason.APP_CLOSED, None, f"HTTP {message.get('status')}")
    try:
        await send(message)
    except OSError:
        session._end(EndReason.CONNECTION_LOST, 1006, None)
        raise
    if kind == "websocket.accept" and session.state is SessionState.CONNECTING:
        session.subprotocol = message.get("subprotocol")
        session.state = SessionState.OPEN


async def _pump(
    manager: SessionManager, session: Session, receive: Receive, inbox: asyncio.Queue[Message]
) -> None:
    """Read the connection ahead of the app (``detect_disconnect``), so a dropped client is
    noticed even when the app never reads; an app that does not end is then ended."""
    while True:
        message = await receive()
        inbox.put_nowait(message)
        if message["type"] == "websocket.disconnect":
            session._client_disconnected(message)
            session._force_end = call_later(manager.settings.close_timeout, force_end, session)
            return


def _arm_idle_timer(manager: SessionManager, session: Session) -> None:
    timeout = manager.settings.idle_timeout
    assert timeout is not None
    session._last_activity = monotonic()
    session._idle_timer = call_later(timeout, _check_idle, manager, session, timeout)


def _check_idle(manager: SessionManager, session: Session, timeout: float) -> None:
    # A module-level function, not a closure that re-arms itself: that would be a reference
    # cycle keeping every closed session alive until the garbage collector runs.
    if session.end_reason is not None:
        return
    remaining = session._last_activity + timeout - monotonic()
    if remaining > 0:
        session._idle_timer = call_later(remaining, _check_idle, manager, session, timeout)
    else:
        log_warning(session.id, "idle for %ss: closing %s", timeout, session.id)
        close_session(manager, session, manager.settings.idle_close_code, "idle timeout")


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # not running on asyncio (trio): forced ends are not available
        return None


def _uncancel_own(session: Session) -> bool:
    """Absorb the cancellation wsession itself requested; False if someone else cancelled too."""
    task = session._task
    return task is not None and task.uncancel() == 0


def _connect_deadline(timeout: float | None, manager: SessionManager) -> Any:
    # Sync hooks cannot be interrupted, so only async ones get a timer; on asyncio a timer that
    # does not capture the connection's context (see _timers.py).
    if timeout is None or not manager._async_connect_hooks:
        return nullcontext()
    if _current_task() is None:
        return anyio.fail_after(timeout)
    return Deadline(timeout)


def _replay(first: Message, receive: Receive) -> Receive:
    pending: Message | None = first

    async def receive_again() -> Message:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return receive_again


# -- connect hooks ------------------------------------------------------------------------


async def _run_connect_hooks(manager: SessionManager, session: Session) -> Refuse | None:
    """Run every connect hook in order; return the refusal, if any."""
    timeout = manager.settings.connect_timeout
    try:
        timings = manager.stats.hook_seconds["connect"]
        with _connect_deadline(timeout, manager):
            for hook in manager.connect_hooks:
                started = perf_counter()
                try:
                    result = hook(session)
                    if result is not None and inspect.isawaitable(result):
                        await result
                finally:
                    timings.observe(perf_counter() - started)
        if manager.data_model is not None and not isinstance(session.data, manager.data_model):
            raise TypeError(
                f"session.data must stay a {manager.data_model.__name__}, "
                f"a connect hook set {type(session.data).__name__}"
            )
    except Refuse as refusal:
        return refusal
    except TimeoutError:
        manager.stats.hook_errors += 1
        log_warning(session.id, "connect hooks exceeded %ss: refusing %s", timeout, session.id)
        return Refuse(manager.settings.error_status, code=1011, label="hook_timeout")
    except Exception:
        manager.stats.hook_errors += 1
        log_error(session.id, "connect hook failed for %s: refusing", session.id, exc=True)
        return Refuse(manager.settings.error_status, code=1011, label="hook_error")
    return None


async def _refuse(scope: Scope, send: Send, refusal: Refuse) -> None:
    """Answer the handshake with the refusal; the app is never called."""
    try:
        if refusal.status is not None and _DENIAL in scope.get("extensions", {}):
            body = (
                refusal.body
                if refusal.body is not None
                else (refusal.reason or HTTPStatus(refusal.status).phrase)
            )
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in refusal.headers.items()
            ]
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": refusal.status,
                    "headers": headers,
                }
            )
            await send(
                {
                    "type": "websocket.http.response.body",
                    "body": body.encode() if isinstance(body, str) else body,
                }
            )
        elif refusal.status is not None:
            # No denial extension: a close before accept; servers answer HTTP 403.
            await send(
                {"type": "websocket.close", "code": refusal.code or 1008, "reason": refusal.reason}
            )
        else:
            # A close code is only visible to the client after the handshake completes.
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": refusal.code, "reason": refusal.reason})
    except OSError:
        pass  # the client already left; nothing else to tell it


# -- teardown -------------------------------------------------------------------------------


async def _teardown(manager: SessionManager, session: Session) -> None:
    """Disconnect hooks (reverse order) then unregister; runs exactly once per session.

    Nothing here may be skipped by a cancellation: hooks that return awaitables are shielded one
    by one (see :func:`run_disconnect_hooks`), the registry removal is shielded, and the local
    bookkeeping sits in ``finally`` blocks. Registries do their own bookkeeping before their
    first ``await`` in ``remove`` and shield their I/O themselves.
    """
    count_ending(manager, session)
    try:
        await run_disconnect_hooks(manager, session)
    finally:
        try:
            await _unregister(manager, session)
        finally:
            manager.admission.release(session)
            manager._forget_local(session)
            # Drop what ties a closed session to the server's connection object, so a session
            # kept by user code does not keep the connection's buffers alive.
            session._send = session._raw_send = None
            session._task = None


async def _unregister(manager: SessionManager, session: Session) -> None:
    try:
        await manager.registry.remove(session)
    except Exception:
        log_error(session.id, "registry could not remove %s", session.id, exc=True)
