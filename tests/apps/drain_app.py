"""A small app for subprocess tests: records every hook call as a line in a file.

``WSESSION_EVENTS_FILE``: where to append ``connect ID`` / ``disconnect ID REASON CODE`` lines.
``MODE``: ``read`` (the endpoint reads until disconnect) or ``silent`` (it never reads).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import Session, SessionManager, WSessionMiddleware, get_session

EVENTS = os.environ["WSESSION_EVENTS_FILE"]
manager = SessionManager(drain_timeout=float(os.environ.get("WSESSION_DRAIN_TIMEOUT", "5")))


def _record(line: str) -> None:
    with open(EVENTS, "a", encoding="utf-8") as events:
        events.write(line + "\n")


@manager.on_connect
def on_connect(session: Session) -> None:
    _record(f"connect {session.id}")


@manager.on_disconnect
def on_disconnect(session: Session) -> None:
    _record(f"disconnect {session.id} {session.end_reason} {session.close_code}")


async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text(get_session(ws).id)
    if ws.query_params.get("mode") == "silent":
        await asyncio.Event().wait()
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with manager:
        yield


app = Starlette(
    routes=[WebSocketRoute("/ws", endpoint)],
    middleware=[Middleware(WSessionMiddleware, manager=manager)],
    lifespan=lifespan,
)
