"""One WebSocket connection's life: connect hooks, the app, exactly-once teardown."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Coroutine, Iterator
from http import HTTPStatus
from time import perf_counter
from typing import Any

import anyio

from . import _timers
from ._admission import Ticket
from ._context import SCOPE_KEY, current_session
from ._delivery import close_session, end_later
from ._exceptions import Refuse
from ._expiry import arm as arm_expiry
from ._expiry import disarm as disarm_expiry
from ._lifecycle import (
    count_ending,
    run_disconnect_hooks,
    run_hooks,
    start_disconnect_hooks,
    unregister,
)
from ._log import log_error, log_warning
from ._manager import Hook, SessionManager
from ._outbound import Outbound
from ._resume import Resumption
from ._session import EndReason, Session, SessionState
from ._timers import call_later, timed_out
from ._types import Message, Receive, Scope, Send

_DENIAL = "websocket.http.response"
_CLOSED = SessionState.CLOSED  # bound once (see _session.py)
_APP_RETURNED = EndReason.APP_RETURNED


Opened = tuple[Session, Scope, Receive, Send, Ticket, "asyncio.Task[None] | None"]
"""What :func:`open_connection` hands the middleware: the session, the scope, ``receive`` and
``send`` the app runs with, and what :func:`close_connection` needs (the limit ticket, the
``detect_disconnect`` pump)."""


async def open_connection(
    manager: SessionManager, scope: Scope, first: Message, receive: Receive, send: Send
) -> Opened | None:
    """Admit a connection whose ``websocket.connect`` (``first``) arrived: the admission
    checks, then the connect hooks (or, for a resume, the resume hooks), then the registry.

    Returns what the app runs with, or ``None`` when it will not run: the connection was
    refused (the refusal is sent), or it was ended while being registered (its teardown done).
    Limit slots are reserved before the hooks and given back here whenever the connection is
    not admitted (refusal, failing or late hook, cancellation); once this returns an
    :class:`Opened`, the caller owns the ticket and must call :func:`close_connection`, with no
    ``await`` in between.
    """
    settings = manager.settings
    session = Session(manager.id_factory(), scope, None, manager.new_data())
    app_scope = dict(scope)  # never mutate the server's scope
    app_scope[SCOPE_KEY] = session
    current_session.set(session)  # the connection's own task: no token to keep
    try:
        admitted = await _admit(manager, session, scope, app_scope)
    except BaseException:
        current_session.set(None)  # cancelled during the connect hooks: nothing was set up
        raise
    if isinstance(admitted, Refuse):
        stats = manager.stats
        stats.refused += 1
        stats.refused_by[admitted.label] += 1
        current_session.set(None)
        await _refuse(scope, send, admitted)
        return None

    # Admitted: the ticket is released by close_connection; no await before the try below.
    # A connection that resumed a detached session gets that session.
    ticket, session = admitted
    track = settings.idle_timeout is not None
    outbound = Outbound(session, send, settings.max_backlog, settings.max_backlog_bytes, track)
    session._outbound = outbound
    pump: asyncio.Task[None] | None = None
    if settings.detect_disconnect:
        inbox: asyncio.Queue[Message] = asyncio.Queue(settings.read_ahead)
        pump = asyncio.get_running_loop().create_task(_pump(manager, session, receive, inbox))
        receive = inbox.get
    app_receive = session._bind_receive(receive, first, track)
    app_send: Send = outbound.send
    resumption = manager.resumption
    if session.resumed:
        assert resumption is not None
        app_send, app_receive = resumption.wrap(session, outbound, app_send, app_receive)
    try:  # noqa: SIM105 - contextlib.suppress would cost a context manager per connection
        session._task = asyncio.current_task()
    except RuntimeError:  # not running on asyncio (trio): forced ends are not available
        pass
    if track:
        _arm_idle_timer(manager, session)
    try:
        if not session.resumed:
            manager.stats.accepted += 1
            if resumption is not None:
                resumption.start(session)
            await manager.registry.add(session)
            session._registered = True
        if session._expiry is not None:  # a connect hook set expires_at
            arm_expiry(manager, session)
    except BaseException as exc:
        try:
            if app_ended(session, exc):
                return None
            raise
        finally:
            await close_connection(manager, session, ticket, pump)
    return session, app_scope, app_receive, app_send, ticket, pump


def app_ended(session: Session, exc: BaseException) -> bool:
    """Record why the app (or the connection's registration) ended with ``exc``; True when it
    is wsession's own cancellation (kick, slow consumer, drain): absorbed, the connection then
    ends normally, since the close frame is on its way. Else the caller re-raises ``exc``."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        if session._forced and _uncancel_own(session):
            return True
        session._end(EndReason.CANCELLED, None, None)
    else:
        session._end(EndReason.APP_RAISED, 1011, None)
    return False


async def close_connection(
    manager: SessionManager,
    session: Session,
    ticket: Ticket,
    pump: asyncio.Task[None] | None,
) -> None:
    """Teardown, exactly once per admitted connection: timers off, then the session detaches
    (``resume_window``, see :func:`_detach`) or ends: disconnect hooks (reverse order), then
    unregister.

    Nothing of an ending may be skipped by a cancellation: hooks that return awaitables are
    shielded one by one (see :func:`~wsession._lifecycle.run_hooks`), the registry removal is
    shielded, and the local bookkeeping sits in ``finally`` blocks. Registries do their own
    bookkeeping before their first ``await`` in ``remove`` and shield their I/O themselves.
    """
    if session.end_reason is None:
        session._end(_APP_RETURNED, None, None)
    timer = session._force_end
    if timer is not None:
        timer.cancel()
    timer = session._idle_timer
    if timer is not None:
        timer.cancel()
    if session._expiry is not None:
        disarm_expiry(session)
    if pump is not None:
        pump.cancel()
    session._receive = session._first = None  # drop the server's receive (or the pump's queue)
    resumption = manager.resumption
    outbound = session._outbound
    if (
        resumption is not None
        and outbound is not None
        and resumption.should_detach(session, outbound.accepted)
    ):
        await _detach(manager, resumption, session, ticket)
        current_session.set(None)
        return
    session.state = _CLOSED
    if outbound is not None and outbound.closing:  # only wsession's own close can be pending
        await outbound.finish()
    count_ending(manager, session)
    try:
        pending = start_disconnect_hooks(manager, session)
        if pending is not None:
            await pending
    finally:
        try:
            await unregister(manager, session)
        finally:
            manager.admission.release(ticket)
            manager._end_presence(session)  # once: the teardown runs once per session
            manager._forget_local(session)
            # Drop what ties a closed session to the server's connection object, so a session
            # kept by user code does not keep the connection's buffers alive.
            outbound, session._outbound = session._outbound, None
            if outbound is not None:
                outbound.shutdown()
            session._task = None
    current_session.set(None)


async def _admit(
    manager: SessionManager, session: Session, scope: Scope, app_scope: Scope
) -> Refuse | tuple[Ticket, Session]:
    """Admission checks and connect hooks (or, for a resume, the resume hooks): the refusal,
    or the admitted connection's ticket and session (``session``, or the detached session this
    connection resumes).

    Limit slots are reserved before the hooks and given back here whenever the connection is
    not admitted (refusal, failing or late hook, cancellation); once admitted, the session is in
    ``manager.local`` and the caller owns the ticket and releases it in its teardown.
    """
    if session.id in manager.local:
        # A custom id_factory repeated a live id: never let it replace that session.
        log_error(session.id, "id_factory returned the id of a live session: refusing")
        return Refuse(manager.settings.error_status, code=1011, label="duplicate_id")
    admission = manager.admission
    ticket = admission.admit(scope)
    if isinstance(ticket, Refuse):
        return ticket
    admitted = False
    try:
        resumption = manager.resumption
        asked = resumption.requested(scope) if resumption is not None else None
        if asked is not None:
            assert resumption is not None
            claimed = await resumption.claim(*asked)
            if isinstance(claimed, str):
                manager.stats.resume_failed[claimed] += 1  # a new session, as if not asked
            else:
                taken = await _take_over(manager, resumption, claimed, scope, app_scope, ticket)
                if isinstance(taken, Refuse):
                    return taken
                admitted = True
                return ticket, claimed
        outcome = _run_connect_hooks(manager, session, iter(manager.connect_hooks), perf_counter())
        refusal = outcome if outcome is None or isinstance(outcome, Refuse) else await outcome
        if refusal is None:
            refusal = admission.after_hooks(ticket, session)
            if refusal is None and session.id in manager.local:
                log_error(session.id, "id_factory returned the id of a live session: refusing")
                refusal = Refuse(manager.settings.error_status, code=1011, label="duplicate_id")
            if refusal is not None:
                # The connect hooks completed, so their disconnect hooks are owed.
                session._end(EndReason.REFUSED, None, refusal.reason)
                session.state = SessionState.CLOSED
                count_ending(manager, session)
                await run_disconnect_hooks(manager, session)
        if refusal is not None:
            return refusal
        manager.local[session.id] = session  # no await since the check: the id is ours
        admitted = True
        return ticket, session
    finally:
        if not admitted:
            admission.release(ticket)


async def _take_over(
    manager: SessionManager,
    resumption: Resumption,
    session: Session,
    scope: Scope,
    app_scope: Scope,
    ticket: Ticket,
) -> Refuse | None:
    """Let a new connection take a claimed detached session over, if its resume hooks and the
    per-user limit admit it; otherwise the session waits again (same token, rest of its
    window)."""
    session._reattach(scope)  # the hooks authenticate the new handshake
    app_scope[SCOPE_KEY] = session
    current_session.set(session)
    taken = False
    try:
        refusal = await _connect_hooks(manager, session, iter(manager.resume_hooks), perf_counter())
        if refusal is None:
            refusal = manager.admission.after_hooks(ticket, session)
        if refusal is not None:
            manager.stats.resume_failed["refused"] += 1
            return refusal
        resumption.resumed(session)
        manager.local[session.id] = session
        taken = True
        return None
    finally:
        if not taken:
            resumption.unclaim(session)


async def _pump(
    manager: SessionManager, session: Session, receive: Receive, inbox: asyncio.Queue[Message]
) -> None:
    """Read the connection ahead of the app (``detect_disconnect``), so a dropped client is
    noticed even when the app never reads; an app that does not end is then ended.

    At most ``read_ahead`` messages wait for the app: past that the pump stops reading, so the
    server's own back-pressure on the client still applies (a client that floods an app that
    never reads is then noticed only when the app reads or the session ends otherwise).
    """
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            session._client_disconnected(message)
            end_later(session, manager.settings.close_timeout)
            await inbox.put(message)
            return
        await inbox.put(message)


def _arm_idle_timer(manager: SessionManager, session: Session) -> None:
    timeout = manager.settings.idle_timeout
    assert timeout is not None
    session._last_activity = _timers.clock.now()
    session._idle_timer = call_later(timeout, _check_idle, manager, session, timeout)


def _check_idle(manager: SessionManager, session: Session, timeout: float) -> None:
    # A module-level function, not a closure that re-arms itself: that would be a reference
    # cycle keeping every closed session alive until the garbage collector runs.
    if session.end_reason is not None:
        return
    outbound = session._outbound
    last = session._last_activity
    if outbound is not None and outbound.last_write > last:
        last = outbound.last_write
    remaining = last + timeout - _timers.clock.now()
    if remaining > 0:
        session._idle_timer = call_later(remaining, _check_idle, manager, session, timeout)
    else:
        log_warning(session.id, "idle for %ss: closing %s", timeout, session.id)
        close_session(
            manager, session, manager.settings.idle_close_code, "idle timeout", resumable=True
        )


def _uncancel_own(session: Session) -> bool:
    """Absorb the cancellation wsession itself requested; False if someone else cancelled too."""
    task = session._task
    return task is not None and task.uncancel() == 0


def replay(first: Message, receive: Receive) -> Receive:
    """``receive``, with ``first`` (already read) returned once before it."""
    pending: Message | None = first

    async def receive_again() -> Message:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return receive_again


# -- connect hooks ------------------------------------------------------------------------


def _run_connect_hooks(
    manager: SessionManager, session: Session, hooks: Iterator[Hook], begun: float
) -> Refuse | Coroutine[Any, Any, Refuse | None] | None:
    """Run ``hooks`` (the connect hooks, or the resume hooks) in order: the refusal, if any,
    or ``None``; or, once a hook returned an awaitable, a coroutine that awaits it and runs the
    rest (await it at once, with no checkpoint in between). Sync hooks cost no coroutine.

    Whether a hook is async is decided per call, from what it returned: a sync callable that
    returns an awaitable (``functools.partial``, a lambda, a decorator) is awaited and bounded
    by ``connect_timeout`` (counted from ``begun``, before the first hook) like an
    ``async def`` hook.
    """
    timings = manager.stats.hook_seconds["connect"]
    try:
        for hook in hooks:
            started = perf_counter()
            try:
                result = hook(session)
            except BaseException:
                timings.observe(perf_counter() - started)
                raise
            if result is not None and inspect.isawaitable(result):
                return _await_connect_hook(manager, session, result, started, hooks, begun)
            timings.observe(perf_counter() - started)
        model = manager.data_model
        if model is not None and not isinstance(session.data, model):
            raise TypeError(
                f"session.data must stay a {model.__name__}, "
                f"a connect hook set {type(session.data).__name__}"
            )
    except Refuse as refusal:
        return refusal
    except Exception:  # a hook's own TimeoutError included: it is the hook's error, not ours
        return _hook_failed(manager, session)
    return None


async def _await_connect_hook(
    manager: SessionManager,
    session: Session,
    result: Awaitable[Any],
    started: float,
    rest: Iterator[Hook],
    begun: float,
) -> Refuse | None:
    """Await a connect (or resume) hook's awaitable within ``connect_timeout``, then run the
    hooks after it (see :func:`_run_connect_hooks`)."""
    timeout = manager.settings.connect_timeout
    try:
        try:
            if timeout is None:
                await result
            elif await timed_out(result, begun + timeout - started):
                manager.stats.hook_errors += 1
                log_warning(
                    session.id, "connect hooks exceeded %ss: refusing %s", timeout, session.id
                )
                return Refuse(manager.settings.error_status, code=1011, label="hook_timeout")
        finally:
            manager.stats.hook_seconds["connect"].observe(perf_counter() - started)
    except Refuse as refusal:
        return refusal
    except Exception:  # a hook's own TimeoutError included: it is the hook's error, not ours
        return _hook_failed(manager, session)
    return await _connect_hooks(manager, session, rest, begun)


def _hook_failed(manager: SessionManager, session: Session) -> Refuse:
    """Called while handling a hook's exception: count and log it; the refusal to send."""
    manager.stats.hook_errors += 1
    log_error(session.id, "connect hook failed for %s: refusing", session.id, exc=True)
    return Refuse(manager.settings.error_status, code=1011, label="hook_error")


async def _connect_hooks(
    manager: SessionManager, session: Session, hooks: Iterator[Hook], begun: float
) -> Refuse | None:
    """:func:`_run_connect_hooks` for callers that await anyway (the connection's own path
    calls it directly: a sync hook then costs no coroutine)."""
    outcome = _run_connect_hooks(manager, session, hooks, begun)
    if outcome is None or isinstance(outcome, Refuse):
        return outcome
    return await outcome


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


async def _detach(
    manager: SessionManager, resumption: Resumption, session: Session, ticket: Ticket
) -> None:
    """The connection is gone but the session waits for its client (``resume_window``).

    What ties the session to this connection is cut before the first ``await``, so a resume
    that claims it later gets a clean session; it becomes claimable only after the detach
    hooks ran (meanwhile messages for it are kept), even if this task is cancelled.
    """
    outbound, session._outbound = session._outbound, None
    session._task = None
    manager.admission.release(ticket)
    manager._forget_local(session)
    resumption.detach(session)
    try:
        if outbound is not None:
            if outbound.closing:  # our idle close: let the client read it
                await outbound.finish()
            outbound.shutdown()
        await run_hooks(manager, session, manager.detach_hooks, "detach")
    finally:
        resumption.park(session)
