"""A recorder of the hooks a SessionManager ran, with assertions about them."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from types import EllipsisType, TracebackType
from typing import Any, Literal

import anyio

from .._exceptions import Refuse
from .._manager import Hook, SessionManager
from .._session import EndReason, Session

Phase = Literal["connect", "disconnect"]
Outcome = Literal["running", "ok", "refused", "raised", "abandoned"]


@dataclass
class HookCall:
    """One call of one of the manager's hooks, as the recorder saw it."""

    phase: Phase
    hook: str
    """The hook's ``__name__`` (``repr`` for callables without one)."""
    session_id: str
    end_reason: EndReason | None
    """``session.end_reason`` when the hook was called (None for connect hooks)."""
    outcome: Outcome = "running"
    """``ok``, ``refused`` (raised :class:`~wsession.Refuse`), ``raised`` (another exception),
    ``abandoned`` (cancelled: its deadline passed) or ``running``."""
    error: BaseException | None = None


@dataclass(frozen=True)
class Ending:
    """A session's disconnect phase, recorded after every disconnect hook ran."""

    session_id: str
    end_reason: EndReason | None
    close_code: int | None
    close_reason: str | None


def _name(hook: Any) -> str:
    return getattr(hook, "__name__", None) or repr(hook)


class HookRecorder:
    """Records which of a manager's hooks ran, in what order, and how each session ended.

    Attaching wraps every hook registered on ``manager`` so far (sync hooks stay sync, a hook
    that returns an awaitable still does: wsession's rules are unchanged) and adds two hooks of
    its own: one after the last connect hook (``connected``) and one that runs after every
    other disconnect hook (``endings``). :meth:`detach` (or leaving the ``with`` block) puts
    the manager's hooks back. Hooks registered after attaching are not wrapped, but the
    endings still cover every session.

    Safe to read from the test's thread while the app runs on another (``TestClient``).

    Args:
        manager: the manager whose hooks to record.

    Example::

        with HookRecorder(sessions) as recorder, connect(client, "/ws") as conn:
            conn.drop()
        recorder.assert_ended_once(conn.session.id, EndReason.CONNECTION_LOST)
        recorder.assert_hooks(conn.session.id, ["authenticate", "cleanup"])
    """

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.calls: list[HookCall] = []
        """Every recorded hook call, in the order the calls started."""
        self.connected: list[str] = []
        """Ids of sessions whose connect hooks all completed, in order."""
        self.endings: list[Ending] = []
        """One entry per disconnect phase, in order (exactly once per connected session)."""
        self._lock = threading.Lock()
        self._originals: dict[int, Hook] = {}  # id(wrapper) -> the hook it wraps
        self._attached = False
        self.attach()

    # -- attaching ----------------------------------------------------------------------------

    def attach(self) -> None:
        """Wrap the manager's hooks (done by the constructor; again after :meth:`detach`)."""
        if self._attached:
            return
        manager = self.manager
        manager.connect_hooks = (
            *(self._wrap("connect", h) for h in manager.connect_hooks),
            self._on_connected,
        )
        manager.disconnect_hooks = (
            self._on_ended,  # registered first, so it runs last
            *(self._wrap("disconnect", h) for h in manager.disconnect_hooks),
        )
        self._attached = True

    def detach(self) -> None:
        """Put the manager's own hooks back (keeping any registered since)."""
        if not self._attached:
            return
        ours = (self._on_connected, self._on_ended)
        manager = self.manager
        manager.connect_hooks = tuple(
            self._originals.get(id(h), h) for h in manager.connect_hooks if h not in ours
        )
        manager.disconnect_hooks = tuple(
            self._originals.get(id(h), h) for h in manager.disconnect_hooks if h not in ours
        )
        self._originals.clear()
        self._attached = False

    def __enter__(self) -> HookRecorder:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def _wrap(self, phase: Phase, hook: Hook) -> Hook:
        name = _name(hook)

        def recorded(session: Session) -> Awaitable[None] | None:
            call = HookCall(
                phase, name, session.id, session.end_reason if phase == "disconnect" else None
            )
            with self._lock:
                self.calls.append(call)
            try:
                result = hook(session)
            except BaseException as exc:
                _finish(call, exc)
                raise
            if result is not None and inspect.isawaitable(result):
                return _awaited(call, result)
            call.outcome = "ok"
            return None

        recorded.__name__ = name
        recorded.__wrapped__ = hook  # type: ignore[attr-defined]
        self._originals[id(recorded)] = hook
        return recorded

    def _on_connected(self, session: Session) -> None:
        with self._lock:
            self.connected.append(session.id)

    def _on_ended(self, session: Session) -> None:
        ending = Ending(session.id, session.end_reason, session.close_code, session.close_reason)
        with self._lock:
            self.endings.append(ending)

    # -- reading ------------------------------------------------------------------------------

    def hooks(self, session_id: str, phase: Phase | None = None) -> list[str]:
        """Names of the hooks called for ``session_id`` (of ``phase``, or both), in order."""
        with self._lock:
            return [
                c.hook
                for c in self.calls
                if c.session_id == session_id and (phase is None or c.phase == phase)
            ]

    def endings_of(self, session_id: str) -> list[Ending]:
        """The recorded endings of ``session_id`` (one, once it ended)."""
        with self._lock:
            return [e for e in self.endings if e.session_id == session_id]

    # -- asserting ----------------------------------------------------------------------------

    def assert_hooks(self, session_id: str, expected: Iterable[str]) -> None:
        """Assert the hooks called for ``session_id`` were exactly ``expected``, in order.

        Raises:
            AssertionError: they were not (the message lists what ran).
        """
        ran = self.hooks(session_id)
        want = list(expected)
        if ran != want:
            raise AssertionError(f"hooks for {session_id}: expected {want}, ran {ran}")

    def assert_ended_once(
        self,
        session_id: str,
        reason: EndReason | None = None,
        *,
        code: int | EllipsisType | None = ...,
    ) -> Ending:
        """Assert ``session_id`` ended exactly once (with ``reason`` and ``code`` if given);
        return its ending.

        Raises:
            AssertionError: it did not end, ended more than once, or otherwise.
        """
        endings = self.endings_of(session_id)
        if len(endings) != 1:
            raise AssertionError(
                f"{session_id} ended {len(endings)} times (expected once): {endings}"
            )
        ending = endings[0]
        if reason is not None and ending.end_reason != reason:
            raise AssertionError(
                f"{session_id} ended with {ending.end_reason!r}, expected {reason!r}"
            )
        if code is not ... and ending.close_code != code:
            raise AssertionError(f"{session_id} ended with code {ending.close_code}, not {code}")
        return ending

    def assert_not_ended(self, session_id: str) -> None:
        """Assert no disconnect phase was recorded for ``session_id`` (yet).

        Raises:
            AssertionError: it was.
        """
        endings = self.endings_of(session_id)
        if endings:
            raise AssertionError(f"{session_id} ended: {endings}")


def _finish(call: HookCall, exc: BaseException) -> None:
    if isinstance(exc, Refuse):
        call.outcome = "refused"
    elif isinstance(exc, anyio.get_cancelled_exc_class()):
        call.outcome = "abandoned"
    else:
        call.outcome = "raised"
    call.error = exc


async def _awaited(call: HookCall, result: Awaitable[Any]) -> None:
    try:
        await result
    except BaseException as exc:
        _finish(call, exc)
        raise
    call.outcome = "ok"
