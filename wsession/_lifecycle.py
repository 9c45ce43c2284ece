"""How a session ends: disconnect hooks exactly once, and the ending counted once.

The one owner of "a session has ended". The connection code calls it for local endings; cluster
registries call :func:`end_without_connection` for sessions whose worker died.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import anyio

from ._log import log_error, log_warning
from ._session import EndReason, Session, SessionState
from ._shield import run_shielded

if TYPE_CHECKING:
    from ._manager import Hook, SessionManager
    from ._stats import Histogram


def count_ending(manager: SessionManager, session: Session) -> None:
    """Count one ended session (``stats.ended`` and ``stats.ended_by``)."""
    manager.stats.ended += 1
    manager.stats.ended_by[str(session.end_reason)] += 1


async def run_disconnect_hooks(manager: SessionManager, session: Session) -> None:
    """Run the disconnect hooks in reverse order, each at most once (see :func:`run_hooks`)."""
    pending = start_disconnect_hooks(manager, session)
    if pending is not None:
        await pending


def start_disconnect_hooks(manager: SessionManager, session: Session) -> Awaitable[None] | None:
    """:func:`start_hooks` for the disconnect hooks (reverse order)."""
    return start_hooks(
        manager,
        session,
        reversed(manager.disconnect_hooks),
        "disconnect",
        manager.stats.hook_seconds["disconnect"],
    )


async def run_hooks(
    manager: SessionManager,
    session: Session,
    hooks: Iterable[Hook],
    what: str,
    timings: Histogram | None = None,
) -> None:
    """Run notification hooks (disconnect, detach) in the given order, each at most once.

    Whether a hook is async is decided per call, from what it returned (a sync callable may
    return an awaitable). Each awaitable is bounded by ``disconnect_timeout`` and shielded from
    cancellation of the caller; a failing or late hook is logged and counted, the others still
    run. If the caller was cancelled meanwhile, the cancellation is re-raised after the last hook.
    """
    pending = start_hooks(manager, session, hooks, what, timings)
    if pending is not None:
        await pending


def start_hooks(
    manager: SessionManager,
    session: Session,
    hooks: Iterable[Hook],
    what: str,
    timings: Histogram | None = None,
) -> Awaitable[None] | None:
    """:func:`run_hooks` without a coroutine while the hooks stay sync: runs them up to the
    first one that returns an awaitable and returns ``None`` if none did, else an awaitable
    that runs the rest. Await it at once (no checkpoint in between): until then that hook's
    awaitable and the remaining hooks have not run."""
    rest = iter(hooks)
    pending = _until_awaitable(manager, session, rest, what, timings)
    if pending is None:
        return None
    return _finish_hooks(manager, session, pending, rest, what, timings)


_Pending = tuple["Hook", Awaitable[Any], float]


def _until_awaitable(
    manager: SessionManager,
    session: Session,
    rest: Iterator[Hook],
    what: str,
    timings: Histogram | None,
) -> _Pending | None:
    """Call the next hooks of ``rest`` while they return plain values; the first that returns
    an awaitable stops it (that hook, its awaitable and when it started)."""
    for hook in rest:
        started = perf_counter()
        try:
            result = hook(session)
        except Exception:
            _hook_failed(manager, session, hook, what)
        else:
            if result is not None and inspect.isawaitable(result):
                return hook, result, started
        if timings is not None:
            timings.observe(perf_counter() - started)
    return None


async def _finish_hooks(
    manager: SessionManager,
    session: Session,
    pending: _Pending | None,
    rest: Iterator[Hook],
    what: str,
    timings: Histogram | None,
) -> None:
    cancelled: BaseException | None = None
    timeout = manager.settings.disconnect_timeout
    while pending is not None:
        hook, result, started = pending
        try:
            await run_shielded(_bounded(manager, session, hook, result, timeout, what))
        except anyio.get_cancelled_exc_class() as exc:
            cancelled = exc  # the hook finished anyway; the others must run too
        except Exception:
            _hook_failed(manager, session, hook, what)
        if timings is not None:
            timings.observe(perf_counter() - started)
        pending = _until_awaitable(manager, session, rest, what, timings)
    if cancelled is not None:
        raise cancelled


def _hook_failed(manager: SessionManager, session: Session, hook: Any, what: str) -> None:
    manager.stats.hook_errors += 1
    log_error(session.id, "%s hook %r failed for %s", what, hook, session.id, exc=True)


async def _bounded(
    manager: SessionManager,
    session: Session,
    hook: Any,
    result: Awaitable[Any],
    timeout: float,
    what: str,
) -> None:
    with anyio.move_on_after(timeout) as scope:
        await result
    if scope.cancelled_caught:
        manager.stats.hook_errors += 1
        log_warning(
            session.id, "%s hook %r abandoned after %ss for %s", what, hook, timeout, session.id
        )


async def unregister(manager: SessionManager, session: Session) -> None:
    """Remove an ended session from the registry; a failure is logged, never raised
    (registries shield their own I/O)."""
    try:
        await manager.registry.remove(session)
    except Exception:
        log_error(session.id, "registry could not remove %s", session.id, exc=True)


async def end_without_connection(
    manager: SessionManager,
    session: Session,
    reason: EndReason,
    code: int | None = None,
    close_reason: str | None = None,
) -> None:
    """End a session that has no connection in this process (its worker died, or it was
    detached in a cluster store): record ``reason`` (and the close ``code`` and
    ``close_reason`` of a kick), count the ending and run the disconnect hooks once, shielded
    from cancellation.

    Used by cluster registries on the worker that claimed the session.
    """
    session._end(reason, code, close_reason)
    session.state = SessionState.CLOSED
    count_ending(manager, session)
    await run_shielded(run_disconnect_hooks(manager, session))
