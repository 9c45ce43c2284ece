"""The pure-ASGI middleware that gives every WebSocket scope a managed session."""

from __future__ import annotations

from ._connection import serve_connection
from ._exceptions import ConfigurationError
from ._manager import SessionManager
from ._types import ASGIApp, Receive, Scope, Send


class WSessionMiddleware:
    """Give every WebSocket connection an id, a :class:`~wsession.Session` and lifecycle hooks.

    ``http`` and ``lifespan`` scopes go straight to the app; WebSocket messages pass through
    unchanged and the app's return value is returned.

    Starlette: ``Middleware(WSessionMiddleware, manager=manager)``; FastAPI:
    ``app.add_middleware(WSessionMiddleware, manager=manager)``.

    Args:
        app: the ASGI app to wrap.
        manager: the :class:`~wsession.SessionManager` holding hooks and registry. When omitted,
            a default one is made, reachable as ``middleware.manager``.

    Raises:
        ConfigurationError: ``manager`` is not a ``SessionManager``.
    """

    def __init__(self, app: ASGIApp, manager: SessionManager | None = None) -> None:
        if manager is not None and not isinstance(manager, SessionManager):
            raise ConfigurationError(f"manager: expected a SessionManager, got {manager!r}")
        self.app = app
        self.manager = manager if manager is not None else SessionManager()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        return await serve_connection(self.manager, self.app, scope, receive, send)  # type: ignore[no-any-return]
