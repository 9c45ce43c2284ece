"""The registry interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from .._delivery import SendResult
from .._session import EndReason, Session
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


@dataclass
class Claim:
    """What :meth:`ResumeStore.claim` found.

    ``outcome``: ``"ok"`` (the session is this worker's now: ``session``, ``seq`` the last number
    given, ``missed`` every message numbered after the client's last, ``deadline`` the end of
    the window it had, in Unix seconds); ``"open"`` (its connection has not ended yet, on worker
    ``owner``, ``""`` while it is being parked); ``"lost"`` (the journal no longer holds all the
    client missed: the session was ended in the store, ``session`` is for its disconnect hooks);
    ``"unknown"`` (no detached session with that token).
    """

    outcome: str
    session: Session | None = None
    owner: str = ""
    parker: str = ""
    """``"ok"``: the worker that parked the session (told by the caller that it moved)."""
    seq: int = 0
    deadline: float = 0.0
    missed: list[tuple[int, Message]] = field(default_factory=list)
    presence: dict[str, Any] | None = None
    """``"ok"``: its presence as the parking worker exported it (``Presence.export``)."""


@runtime_checkable
class ResumeStore(Protocol):
    """A journal that outlives the worker: what a registry offers for resumption across workers
    (``RedisRegistry``). The store numbers every message for a session and records it before
    the send returns; a detached session waits in the store, where any worker can resume it.

    Messages for this worker's sessions are written with ``_delivery.deliver_numbered`` once
    recorded, in the order of their numbers.
    """

    async def record(self, sessions: list[Session], message: Message) -> list[SendResult]:
        """Number and record ``message`` for each of this worker's ``sessions``, then write it;
        one result per session. During an outage the message is written without a number."""

    def record_soon(self, sessions: list[Session], message: Message) -> None:
        """:meth:`record` without waiting (in order with every other record of this worker)."""

    async def park(
        self, session: Session, token: str, window: float, presence: dict[str, Any] | None
    ) -> float | None:
        """The session's connection ended resumably: it waits in the store for ``window``
        seconds, owned by no worker, with its ``presence`` (``Presence.export``). Returns when
        its window ends (Unix seconds), or ``None`` when the store could not take it (the
        session then ends here)."""

    async def claim(self, session_id: str, token: str, last: int, new_token: str) -> Claim:
        """Move the detached session ``token`` names to this worker (see :class:`Claim`)."""

    async def take(self, owner: str, session_id: str) -> None:
        """Ask worker ``owner`` to close the session's connection so it can be resumed here."""

    async def moved(self, parker: str, session_id: str) -> None:
        """Tell worker ``parker``, which parked the session, that it was resumed elsewhere (it
        drops its copy: ``Resumption.drop``)."""

    async def end_detached(
        self, session_id: str, reason: EndReason, code: int | None, close_reason: str | None
    ) -> Session | None:
        """End a detached session in the store (its window ran out, or it was closed, with
        ``reason``, ``code`` and ``close_reason``): the session (rebuilt from the store) when
        this caller won, else ``None``. When the caller gets no answer, the store ends the
        session's hooks later if it did end it (``Resumption.end_unanswered`` first)."""

    async def missed(self, session_id: str, first: int, last: int) -> list[tuple[int, Message]]:
        """The recorded messages numbered ``first`` to ``last`` (fewer when some were trimmed)."""

    async def count_detached(self) -> int:
        """How many sessions wait in the store (every worker's)."""

    def adopt(self, session: Session) -> None:
        """A resumed session is this worker's again: index it locally (groups, user key)."""
