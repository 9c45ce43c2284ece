"""The pure-ASGI middleware that gives every WebSocket scope a managed session."""

from __future__ import annotations

from ._connection import app_ended, close_connection, open_connection, replay
from ._exceptions import ConfigurationError
from ._manager import SessionManager
from ._types import ASGIApp, Message, Receive, Scope, Send


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
        # The whole connection runs in this one coroutine (an ``async def``, so servers detect
        # ASGI 3): every message the app awaits resumes through each frame between the server
        # and the app, so fewer is faster. Admission and teardown are helpers it awaits.
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        manager = self.manager
        if not manager._entered:
            await manager._ensure_started()  # no lifespan entered it (daphne): enter it now
        first: Message | None = await receive()
        if first is None:
            return await self.app(scope, receive, send)
        if first["type"] != "websocket.connect":
            # The client left before the handshake reached us: nothing to manage, pass it on.
            return await self.app(scope, replay(first, receive), send)
        opened = await open_connection(manager, scope, first, receive, send)
        first = None  # the session holds it until the app reads it, not this frame
        if opened is None:
            return None  # refused, or ended while it was being registered
        # The app's scope, receive and send take the server's names: this frame waits in every
        # open connection, and each name is a slot of it (8 bytes) for the connection's life.
        session, scope, receive, send, ticket, pump = opened
        del opened
        try:
            return await self.app(scope, receive, send)
        except BaseException as exc:
            if app_ended(session, exc):
                return None  # wsession ended it (kick, drain): the close frame is on its way
            raise  # the same object, never wrapped
        finally:
            await close_connection(manager, session, ticket, pump)
