"""The app every server in the server matrix runs (tests/test_server_matrix.py).

Every hook run is appended to ``WSESSION_EVENTS_FILE`` as one JSON line, so a test in another
process can check that each session's hooks ran exactly once::

    {"event": "connect", "id": ..., "tag": ...}
    {"event": "disconnect", "id": ..., "tag": ..., "end_reason": ..., "code": ..., "reason": ...}

``tag`` is the ``tag`` query parameter: tests sharing one server process filter by it.

``/ws?mode=``: ``echo`` (default: echo until the client leaves), ``close`` (close 4002 "app
closing"), ``close1001`` (close 1001 "going away"), ``return``, ``raise-after`` (raise after
accept), ``raise-before`` (raise before accept), ``silent`` (never reads). ``refuse=1``: the
connect hook refuses with HTTP 403 and body "go away". The first message of an accepted
connection is its session id.

HTTP: ``GET /stats`` (the manager's counters, live count and ``started_lazily``);
``POST /kick?id=&code=&reason=``
(``manager.close``). ``WSESSION_DRAIN_TIMEOUT`` and ``WSESSION_DRAIN_CODE`` set ``drain_timeout``
and ``drain_code``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import Refuse, Session, SessionManager, WSessionMiddleware, get_session

EVENTS = os.environ["WSESSION_EVENTS_FILE"]
manager = SessionManager(
    drain_timeout=float(os.environ.get("WSESSION_DRAIN_TIMEOUT", "5")),
    drain_code=int(os.environ.get("WSESSION_DRAIN_CODE", "1001")),
)


def _record(**fields: Any) -> None:
    # One write of one short line per call: appends from one process never interleave.
    with open(EVENTS, "a", encoding="utf-8") as events:
        events.write(json.dumps(fields) + "\n")


@manager.on_connect
def on_connect(session: Session) -> None:
    tag = session.query_params.get("tag", "")
    if session.query_params.get("refuse") == "1":
        raise Refuse(403, body="go away", label="test")
    _record(event="connect", id=session.id, tag=tag)


@manager.on_disconnect
def on_disconnect(session: Session) -> None:
    _record(
        event="disconnect",
        id=session.id,
        tag=session.query_params.get("tag", ""),
        end_reason=str(session.end_reason),
        code=session.close_code,
        reason=session.close_reason,
    )


async def endpoint(ws: WebSocket) -> None:
    mode = ws.query_params.get("mode", "echo")
    if mode == "raise-before":
        raise RuntimeError("app fails before accept")
    await ws.accept()
    await ws.send_text(get_session(ws).id)
    if mode == "close":
        await ws.close(4002, "app closing")
    elif mode == "close1001":
        await ws.close(1001, "going away")
    elif mode == "return":
        return
    elif mode == "raise-after":
        raise RuntimeError("app fails after accept")
    elif mode == "silent":
        await asyncio.Event().wait()  # never reads: only cancellation or a drain ends it
    else:
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass


async def stats(request: Request) -> JSONResponse:
    live = await manager.count()
    return JSONResponse(
        {**manager.stats.as_dict(), "live": live, "started_lazily": manager.started_lazily}
    )


async def kick(request: Request) -> JSONResponse:
    params = request.query_params
    closed = await manager.close(
        params["id"], int(params.get("code", "1000")), params.get("reason", "")
    )
    return JSONResponse({"closed": closed})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with manager:
        yield


app = Starlette(
    routes=[
        WebSocketRoute("/ws", endpoint),
        Route("/stats", stats),
        Route("/kick", kick, methods=["POST"]),
    ],
    middleware=[Middleware(WSessionMiddleware, manager=manager)],
    lifespan=lifespan,
)
