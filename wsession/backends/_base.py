"""The registry interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from .._delivery import SendResult
from .._session import Session
from .._types import Message

if TYPE_CHECKING:
    from .._manager import SessionManager
    from .._presence import PresenceChange

SessionFilter = Callable[[Session], bool]


@runtime_checkable
class SessionRegistry(Protocol):
    """Where live sessions are kept, keyed by connection id, and how they are reached.

    A session is added once its connect hooks completed and removed after its disconnect hooks
    ran. Registries are async context managers: enter them in the app's lifespan (the memory
    registry also works without). Cluster registries answer for every worker; sends reach a
    session wherever it lives.
    """

    def bind(self, manager: SessionManager) -> None:
        """Called once by the manager that owns this registry (settings, stats, delivery)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def add(self, session: Session) -> None:
        """Register a session whose connect hooks completed (and index its ``user_key``)."""

    async def remove(self, session: Session) -> None:
        """Forget a session after its disconnect hooks ran; it leaves all its groups."""

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None``."""

    async def count(self) -> int:
        """How many sessions are live."""

    async def sessions(self, where: SessionFilter | None = None) -> list[Session]:
        """Live sessions, optionally only those for which ``where(session)`` is true."""

    async def join(self, session_id: str, group: str) -> bool:
        """Add a live session to ``group``; False if the id is unknown or closed."""

    async def leave(self, session_id: str, group: str) -> bool:
        """Remove a session from ``group``; False if it was not a member."""

    async def members(self, group: str) -> list[str]:
        """Ids of the live members of ``group``."""

    async def user_sessions(self, user_key: str) -> list[str]:
        """Ids of the live sessions whose ``user_key`` is ``user_key``."""

    async def send(self, session_id: str, message: Message) -> SendResult:
        """Send a ``websocket.send`` message to one session. Never raises for a gone id."""

    async def send_group(self, group: str, message: Message, exclude: str | None = None) -> int:
        """Send to every member of ``group`` (but ``exclude``); returns how many it reached."""

    async def send_user(self, user_key: str, message: Message) -> int:
        """Send to every session of one user; returns how many it reached."""

    async def broadcast(self, message: Message, exclude: str | None = None) -> int:
        """Send to every open session (but ``exclude``); returns how many it reached."""

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close one session (kick); its disconnect hooks run once. False if unknown/ended."""

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of one user; returns how many were closed."""

    async def deny(self, key: str, ttl: float) -> None:
        """Put ``key`` on the revocation denylist for ``ttl`` seconds (cluster registries: for
        every worker). The manager builds the keys (``user:...``, ``session:...``)."""

    async def is_denied(self, key: str) -> bool:
        """Whether ``key`` is on the denylist (its ``ttl`` has not run out)."""

    async def publish_presence(self, changes: list[PresenceChange]) -> None:
        """Store this worker's presence changes (``(topic, session_id, person, meta)``, ``meta``
        ``None`` for a leave) and tell the other workers, which apply them with
        ``manager.presence.apply_remote``. Called once per ``presence_interval`` at most;
        never raises for an unreachable store (cluster registries log it). Local registries do
        nothing."""

    async def load_presence(self) -> dict[str, list[PresenceChange]]:
        """The other workers' tracked sessions, by worker (called once, when presence is first
        used). Local registries return ``{}``.

        Raises:
            RegistryUnavailable: a cluster registry cannot reach its store.
        """
