"""Ways for app code to reach the current session: scope key, ContextVar, helpers."""

from __future__ import annotations

from contextvars import ContextVar

from starlette.requests import HTTPConnection

from ._exceptions import SessionNotAvailable
from ._session import Session

SCOPE_KEY = "wsession"
"""The scope key holding the :class:`~wsession.Session` (never ``"session"``: Starlette's)."""

current_session: ContextVar[Session | None] = ContextVar("wsession.current_session", default=None)
"""The session of the connection whose code is running (set by the middleware before the
connect hooks and the app run; tasks created from there inherit it)."""


def get_session(websocket: HTTPConnection) -> Session:
    """Return the session of a Starlette ``WebSocket`` (or any ``HTTPConnection``).

    Also usable as a FastAPI dependency: ``session: Session = Depends(get_session)``.

    Raises:
        SessionNotAvailable: the middleware did not handle this connection.
    """
    session = websocket.scope.get(SCOPE_KEY)
    if not isinstance(session, Session):
        raise SessionNotAvailable(
            "no wsession session on this connection: is WSessionMiddleware mounted around it?"
        )
    return session


def connection_id(websocket: HTTPConnection) -> str:
    """Return the connection id of a Starlette ``WebSocket``. Raises like :func:`get_session`."""
    return get_session(websocket).id


def get_current_session() -> Session:
    """Return the session bound to the running context.

    Raises:
        SessionNotAvailable: called outside a connection handled by the middleware.
    """
    session = current_session.get()
    if session is None:
        raise SessionNotAvailable("no wsession session in this context")
    return session
