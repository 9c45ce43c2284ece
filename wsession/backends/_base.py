"""The registry interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .._session import Session

SessionFilter = Callable[[Session], bool]


@runtime_checkable
class SessionRegistry(Protocol):
    """Where live sessions are kept, keyed by connection id.

    A session is added once its connect hooks completed and removed after its disconnect hooks
    ran. Registries are async context managers: enter them in the app's lifespan (the memory
    registry also works without).
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def add(self, session: Session) -> None:
        """Register a session whose connect hooks completed."""

    async def remove(self, session: Session) -> None:
        """Forget a session after its disconnect hooks ran (also drops its groups)."""

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None``."""

    async def count(self) -> int:
        """How many sessions are live."""

    async def sessions(self, where: SessionFilter | None = None) -> list[Session]:
        """Live sessions, optionally only those for which ``where(session)`` is true."""
