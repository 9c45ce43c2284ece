"""The default registry: a dict in this process. No set-up, one worker."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from .._session import Session
from ._base import SessionFilter


class MemoryRegistry:
    """Keeps live sessions of this process in a dict.

    Enough for one worker; with ``uvicorn --workers N`` each worker sees only its own
    connections (use the Redis registry there).
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def add(self, session: Session) -> None:
        """Register ``session``. Raises ``ValueError`` if its id is already live."""
        if session.id in self._sessions:
            raise ValueError(f"connection id {session.id!r} is already in use")
        self._sessions[session.id] = session

    async def remove(self, session: Session) -> None:
        """Forget ``session`` (no error if it is not registered)."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

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
