"""The example app: hooks that name each connection, an echo socket, and a JSON view.

Contract (outside checks rely on it):

- ``WS /ws?name=NAME``: NAME must be 1-32 printable characters, else HTTP 403 before accept.
  The first message after accept is ``{"type": "welcome", "id": ID, "name": NAME}``;
  ``{"type": "echo", "text": T}`` is answered with ``{"type": "echo", "text": T}``.
- ``GET /api/sessions``: ``{"sessions": [{"id", "name", "connected_at"}, ...]}``.
- ``GET /api/stats``: ``live``, ``connected_total``, ``disconnected_total``, ``rejected_total``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import Refuse, Session, SessionManager, WSessionMiddleware, get_session


class Member(BaseModel):
    """What the example keeps per connection."""

    name: str = ""


def _check_name(session: Session) -> None:
    name = session.query_params.get("name", "")
    if not (1 <= len(name) <= 32 and name.isprintable()):
        raise Refuse(403, reason="name must be 1-32 printable characters", label="bad_name")
    session.data.name = name


def create_app(manager: SessionManager | None = None) -> Starlette:
    """Build the example app around ``manager`` (a new in-memory one by default)."""
    sessions = manager or SessionManager(data_model=Member)
    sessions.on_connect(_check_name)

    async def ws_endpoint(websocket: WebSocket) -> None:
        session = get_session(websocket)
        await websocket.accept()
        await websocket.send_json({"type": "welcome", "id": session.id, "name": session.data.name})
        try:
            while True:
                message = await websocket.receive_text()
                await _handle(session, message)
        except WebSocketDisconnect:
            pass

    async def list_sessions(request: Request) -> JSONResponse:
        return JSONResponse({"sessions": [_describe(s) for s in await sessions.sessions()]})

    async def stats(request: Request) -> JSONResponse:
        counters = sessions.stats
        return JSONResponse(
            {
                "live": await sessions.count(),
                "connected_total": counters.accepted,
                "disconnected_total": counters.ended,
                "rejected_total": counters.refused,
                **counters.as_dict(),
            }
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions:
            yield

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", ws_endpoint),
            Route("/api/sessions", list_sessions),
            Route("/api/stats", stats),
        ],
        middleware=[Middleware(WSessionMiddleware, manager=sessions)],
        lifespan=lifespan,
    )
    app.state.sessions = sessions
    return app


async def _handle(session: Session, raw: str) -> None:
    try:
        message: Any = json.loads(raw)
    except ValueError:
        await session.send_json({"type": "error", "error": "messages must be JSON objects"})
        return
    if not isinstance(message, dict):
        await session.send_json({"type": "error", "error": "messages must be JSON objects"})
        return
    kind = message.get("type")
    if kind == "echo":
        await session.send_json({"type": "echo", "text": message.get("text")})
    else:
        await session.send_json({"type": "error", "error": f"unknown type {kind!r}"})


def _describe(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "name": session.data.name,
        "connected_at": session.connected_at.isoformat(),
    }


app = create_app()
