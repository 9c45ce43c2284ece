"""The default registry: dicts in this process. No set-up, one worker."""

from __future__ import annotations

from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .._delivery import SendResult, close_session, deliver, deliver_all
from .._session import NO_GROUPS, Session, SessionState
from .._types import Message
from ._base import SessionFilter

if TYPE_CHECKING:
    from .._manager import SessionManager
    from .._presence import PresenceChange


class MemoryRegistry:
    """Keeps live sessions, groups and user keys of this process in dicts.

    Enough for one worker; with ``uvicorn --workers N`` each worker sees only its own
    connections (use :class:`~wsession.backends.redis.RedisRegistry` there).
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._groups: dict[str, dict[str, Session]] = {}
        self._users: dict[str, dict[str, Session]] = {}
        self._manager: SessionManager | None = None
        self._denied: dict[str, float] = {}  # denylist key -> monotonic deadline
        self._prune_at = 64  # size at which expired denylist entries are swept

    def bind(self, manager: SessionManager) -> None:
        """Attach the owning manager (its settings drive delivery)."""
        if self._manager is not None and self._manager is not manager:
            raise ValueError("this registry already belongs to another SessionManager")
        self._manager = manager

    @property
    def manager(self) -> SessionManager:
        if self._manager is None:
            raise RuntimeError("registry not bound: give it to a SessionManager first")
        return self._manager

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # -- membership -----------------------------------------------------------------------

    async def add(self, session: Session) -> None:
        """Register ``session``. Raises ``ValueError`` if its id is already live."""
        if session.id in self._sessions:
            raise ValueError(f"connection id {session.id!r} is already in use")
        self._sessions[session.id] = session
        if session.user_key is not None:
            self._users.setdefault(session.user_key, {})[session.id] = session

    async def remove(self, session: Session) -> None:
        """Forget ``session``, its groups and its user key (no error if not registered)."""
        self.discard(session)

    def insert(self, session: Session) -> None:
        """Index ``session`` with its user key and groups, without awaiting (a session resumed
        on this worker by a cluster registry). Raises ``ValueError`` if its id is live here."""
        if session.id in self._sessions:
            raise ValueError(f"connection id {session.id!r} is already in use")
        self._sessions[session.id] = session
        if session.user_key is not None:
            self._users.setdefault(session.user_key, {})[session.id] = session
        if session.groups:
            session.groups = set(session.groups)
            for group in session.groups:
                self._groups.setdefault(group, {})[session.id] = session

    def discard(self, session: Session) -> bool:
        """:meth:`remove` without awaiting (for callers that must finish their bookkeeping
        before their first ``await``). Returns False when ``session`` was not registered."""
        if self._sessions.get(session.id) is not session:
            return False
        del self._sessions[session.id]
        for group in session.groups:
            _discard(self._groups, group, session.id)
        session.groups = NO_GROUPS
        if session.user_key is not None:
            _discard(self._users, session.user_key, session.id)
        return True

    # -- synchronous views (for registries that wrap this one) ------------------------------

    def local_session(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None`` (no ``await``)."""
        return self._sessions.get(session_id)

    def snapshot(self) -> list[Session]:
        """Every live session now (a copy: safe to iterate while sessions come and go)."""
        return list(self._sessions.values())

    def group_snapshot(self, group: str) -> list[Session]:
        """The live members of ``group`` now (a copy)."""
        return list(self._groups.get(group, {}).values())

    def user_snapshot(self, user_key: str) -> list[Session]:
        """The live sessions of ``user_key`` now (a copy)."""
        return list(self._users.get(user_key, {}).values())

    async def send_to(
        self, targets: list[Session], message: Message, exclude: str | None = None
    ) -> int:
        """Send to ``targets`` (sessions of this registry) as :meth:`send_group` does; returns
        how many it reached. Under the ``wait`` policy this may wait for slow clients."""
        return await self._send_all(targets, message, exclude)

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None``."""
        return self._sessions.get(session_id)

    async def count(self) -> int:
        """How many sessions are live."""
        return len(self._sessions)

    async def sessions(self, where: SessionFilter | None = None) -> list[Session]:
        """Live sessions, filtered by ``where`` when given."""
        if where is None:
            return list(self._sessions.values())
        return [s for s in self._sessions.values() if where(s)]

    async def join(self, session_id: str, group: str) -> bool:
        """Add a live session to ``group``."""
        session = self._sessions.get(session_id)
        if session is None or session.state is SessionState.CLOSED:
            return False
        if not isinstance(session.groups, set):
            session.groups = set()  # sessions start with a shared empty frozenset
        session.groups.add(group)
        self._groups.setdefault(group, {})[session_id] = session
        return True

    async def leave(self, session_id: str, group: str) -> bool:
        """Remove a session from ``group``."""
        session = self._sessions.get(session_id)
        if session is None or group not in session.groups or not isinstance(session.groups, set):
            return False
        session.groups.discard(group)
        _discard(self._groups, group, session_id)
        return True

    async def members(self, group: str) -> list[str]:
        """Ids of the members of ``group``."""
        return list(self._groups.get(group, ()))

    async def user_sessions(self, user_key: str) -> list[str]:
        """Ids of the sessions of one user."""
        return list(self._users.get(user_key, ()))

    # -- delivery ---------------------------------------------------------------------------

    async def send(self, session_id: str, message: Message) -> SendResult:
        """Send to one session; ``GONE`` for an unknown or closed id."""
        session = self._sessions.get(session_id)
        if session is None:
            self.manager.stats.sends[SendResult.GONE] += 1
            return SendResult.GONE
        return await deliver(self.manager, session, message)

    async def send_group(self, group: str, message: Message, exclude: str | None = None) -> int:
        """Send to the members of ``group``."""
        return await self._send_all(list(self._groups.get(group, {}).values()), message, exclude)

    async def send_user(self, user_key: str, message: Message) -> int:
        """Send to every session of ``user_key``."""
        return await self._send_all(list(self._users.get(user_key, {}).values()), message, None)

    async def broadcast(self, message: Message, exclude: str | None = None) -> int:
        """Send to every open session."""
        return await self._send_all(list(self._sessions.values()), message, exclude)

    async def _send_all(self, targets: list[Session], message: Message, exclude: str | None) -> int:
        # Straight to each connection's outbound path, no task per connection: a slow client
        # cannot hold the others up (see _delivery.py).
        return await deliver_all(self.manager, targets, message, exclude)

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close one session from outside."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        return close_session(self.manager, session, code, reason)

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of one user."""
        targets = list(self._users.get(user_key, {}).values())
        return sum(close_session(self.manager, s, code, reason) for s in targets)

    # -- revocation denylist -------------------------------------------------------------------

    async def deny(self, key: str, ttl: float) -> None:
        """Put ``key`` on this process's denylist for ``ttl`` seconds."""
        now = monotonic()
        self._denied[key] = max(self._denied.get(key, now), now + ttl)
        if len(self._denied) >= self._prune_at:
            # Amortised sweep: memory stays bounded by the entries still in force.
            self._denied = {k: t for k, t in self._denied.items() if t > now}
            self._prune_at = max(64, 2 * len(self._denied))

    async def is_denied(self, key: str) -> bool:
        """Whether ``key`` is on the denylist and its time has not run out."""
        deadline = self._denied.get(key)
        if deadline is None:
            return False
        if deadline > monotonic():
            return True
        del self._denied[key]
        return False

    # -- presence (one process: nothing to share) --------------------------------------------

    async def publish_presence(self, changes: list[PresenceChange]) -> None:
        """Nothing to do: every session of this registry is in this process."""

    async def load_presence(self) -> dict[str, list[PresenceChange]]:
        """No other workers: ``{}``."""
        return {}


def _discard(index: dict[str, dict[str, Session]], key: str, session_id: str) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(session_id, None)
        if not members:
            del index[key]
