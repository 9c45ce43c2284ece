"""Credentials on long-lived connections: the expiry timer and in-band refresh.

A session whose connect hook set ``expires_at`` gets one timer, armed once it is registered and
re-armed by every refresh that its ``on_refresh`` hooks accept; at ``expires_at +
expiry_grace`` it closes the session with ``expiry_code``. Sessions without ``expires_at``
have no timer and no object for it.

The timer is a plain module-level callback in an empty context (``_timers.call_later``), and
the session's teardown cancels it: a cancelled asyncio handle drops its arguments, so an armed
expiry never keeps a closed session alive. When it fires, it drops its own handle before
anything else for the same reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._delivery import close_session
from ._exceptions import Refuse
from ._log import log_error, log_info, log_warning
from ._session import Session, SessionState, check_expiry
from ._timers import call_later, timed_out

if TYPE_CHECKING:
    from ._manager import SessionManager

RefreshHook = Callable[[Session, Any], Awaitable[datetime | None] | datetime | None]
"""An ``on_refresh`` hook: ``async def hook(session, credential) -> datetime | None``.

It validates ``credential`` (whatever the app passed to ``manager.refresh``) for ``session``
and returns when it expires (timezone-aware), or ``None`` (or raises
:class:`~wsession.Refuse`) to refuse it. Sync hooks work too."""

_EARLY = 0.001  # seconds: a timer this close to its deadline counts as on time
_LIVE = (SessionState.CONNECTING, SessionState.OPEN)


def _now() -> datetime:
    return datetime.now(UTC)


def arm(manager: SessionManager, session: Session) -> None:
    """(Re)arm the expiry timer of ``session`` for ``expires_at + expiry_grace``; nothing when
    it has no ``expires_at``."""
    expiry = session._expiry
    if expiry is None:
        return
    delay = (expiry.at - _now()).total_seconds() + manager.settings.expiry_grace
    expiry.set_timer(call_later(max(0.0, delay), _fire, manager, session))


def disarm(session: Session) -> None:
    """Cancel the expiry timer (the session ended)."""
    expiry = session._expiry
    if expiry is not None:
        expiry.cancel()


def _fire(manager: SessionManager, session: Session) -> None:
    # Module-level, not a closure re-arming itself: that would be a reference cycle keeping
    # every closed session alive until the garbage collector ran.
    expiry = session._expiry
    if expiry is None:
        return
    expiry.timer = None  # fired: drop the handle, whose arguments hold the session
    if session.state not in _LIVE:
        return
    grace = manager.settings.expiry_grace
    remaining = (expiry.at - _now()).total_seconds() + grace
    if remaining > _EARLY:
        # The wall clock went back (or the loop's timer ran early): wait for the rest.
        expiry.set_timer(call_later(remaining, _fire, manager, session))
        return
    settings = manager.settings
    if close_session(manager, session, settings.expiry_code, settings.expiry_reason):
        manager.stats.expired += 1
        log_info(session.id, "credentials of %s expired at %s: closing", session.id, expiry.at)


async def refresh(
    manager: SessionManager, target: Session | str, credential: Any
) -> datetime | None:
    """See :meth:`SessionManager.refresh`."""
    session = manager.local.get(target) if isinstance(target, str) else target
    if (
        session is None
        or session.state not in _LIVE
        or manager.local.get(session.id) is not session
    ):
        return None
    at, why = await _validate(manager, session, credential)
    if session.state not in _LIVE:
        return None  # it ended while the hooks ran: nothing to move or to close
    if at is None:
        manager.stats.refreshes["failed"] += 1
        log_info(session.id, "refresh of %s refused (%s): closing", session.id, why)
        close_session(manager, session, manager.settings.expiry_code, why)
        return None
    manager.stats.refreshes["ok"] += 1
    session._extend(at)
    arm(manager, session)
    return at


async def _validate(
    manager: SessionManager, session: Session, credential: Any
) -> tuple[datetime | None, str]:
    """Run the refresh hooks in order: the earliest expiry they vouch for, or ``None`` and the
    close reason. A hook that raises anything but Refuse refuses too (logged): a broken
    validator must never extend a session."""

    hooks = manager.refresh_hooks
    if not hooks:
        log_warning(session.id, "refresh of %s: no on_refresh hook validates it", session.id)
        return None, "refresh failed"
    timeout = manager.settings.connect_timeout
    deadline = None if timeout is None else perf_counter() + timeout
    earliest: datetime | None = None
    try:
        for hook in hooks:
            result = hook(session, credential)
            if inspect.isawaitable(result):
                if deadline is None:
                    result = await result
                else:
                    outcome: list[Any] = []
                    if await timed_out(_keep(result, outcome), deadline - perf_counter()):
                        manager.stats.hook_errors += 1
                        log_warning(session.id, "refresh hooks of %s timed out", session.id)
                        return None, "refresh failed"
                    result = outcome[0]
            if result is None:
                return None, "refresh failed"
            at = check_expiry(result)
            earliest = at if earliest is None else min(earliest, at)
    except Refuse as refusal:
        return None, refusal.reason or "refresh failed"
    except Exception:
        manager.stats.hook_errors += 1
        log_error(session.id, "refresh hook failed for %s: refusing", session.id, exc=True)
        return None, "refresh failed"
    if earliest is None or earliest <= _now():
        return None, "credential expired"  # an expired credential never extends a session
    return earliest, ""


async def _keep(awaitable: Awaitable[Any], into: list[Any]) -> None:
    into.append(await awaitable)
