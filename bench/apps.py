"""The benchmarked servers: one Starlette app, bare or wrapped in wsession.

Each factory is served by ``python -m bench.server --app bench.apps:NAME``. Every variant has
the same surface, which the load client relies on:

- ``WS /ws?name=N``: accept, then echo every text message back until the client closes.
- ``POST /broadcast`` (body: the text): send the body to every connected WebSocket; answers
  ``{"sent": N, "loop_ns": NS}`` (NS: the send loop alone, timed in the handler), or 501 when the
  variant cannot broadcast.
- ``GET /count``: ``{"live": N}``, connections the app still tracks (0 once every teardown ran).

The bare app keeps its own ``set`` of sockets, which is what an app without wsession needs in
order to broadcast; the wsession app uses the manager's registry instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import Session, SessionManager, WSessionMiddleware

WS_PATH = "/ws"


async def _echo(websocket: WebSocket) -> None:
    while True:
        text = await websocket.receive_text()
        await websocket.send_text(text)


def bare_app() -> Starlette:
    """The floor: Starlette's WebSocket echo, with the set of sockets a broadcast needs."""
    clients: set[WebSocket] = set()

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        clients.add(websocket)
        try:
            await _echo(websocket)
        except WebSocketDisconnect:
            pass
        finally:
            clients.discard(websocket)

    async def broadcast(request: Request) -> JSONResponse:
        text = (await request.body()).decode()
        started = time.perf_counter_ns()
        sent = 0
        for websocket in list(clients):
            try:
                await websocket.send_text(text)
            except (RuntimeError, OSError, WebSocketDisconnect):
                continue  # it left meanwhile
            sent += 1
        return JSONResponse({"sent": sent, "loop_ns": time.perf_counter_ns() - started})

    async def count(request: Request) -> JSONResponse:
        return JSONResponse({"live": len(clients)})

    return Starlette(
        routes=[
            WebSocketRoute(WS_PATH, echo),
            Route("/broadcast", broadcast, methods=["POST"]),
            Route("/count", count),
        ]
    )


def wsession_app() -> Starlette:
    """The same echo wrapped in wsession (memory registry) with small, realistic sync hooks."""
    disconnected = {"total": 0}

    def remember_name(session: Session) -> None:
        session.data["name"] = session.query_params.get("name", "")

    def count_disconnect(session: Session) -> None:
        disconnected["total"] += 1

    manager = SessionManager(on_connect=[remember_name], on_disconnect=[count_disconnect])
    return _wsession_starlette(manager)


def _wsession_starlette(manager: SessionManager) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with suppress(WebSocketDisconnect):
            await _echo(websocket)

    # manager.broadcast is new: a wsession without it makes this row "n/a", not a failure.
    send_all: Callable[[str], Awaitable[Any]] | None = getattr(manager, "broadcast", None)

    async def broadcast(request: Request) -> JSONResponse:
        if send_all is None:
            return JSONResponse({"error": "SessionManager.broadcast missing"}, status_code=501)
        text = (await request.body()).decode()
        started = time.perf_counter_ns()
        sent = await send_all(text)
        return JSONResponse({"sent": sent, "loop_ns": time.perf_counter_ns() - started})

    async def count(request: Request) -> JSONResponse:
        return JSONResponse({"live": await manager.count()})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager:
            yield

    return Starlette(
        routes=[
            WebSocketRoute(WS_PATH, echo),
            Route("/broadcast", broadcast, methods=["POST"]),
            Route("/count", count),
        ],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
        lifespan=lifespan,
    )


# -- more variants ------------------------------------------------------------------------
# REDIS VARIANT GOES HERE (when wsession's Redis registry lands): a factory such as
#
#     def wsession_redis_app() -> Starlette:
#         registry = RedisRegistry(os.environ["BENCH_REDIS_URL"])
#         manager = SessionManager(registry=registry, on_connect=[...], on_disconnect=[...])
#         return _wsession_starlette(manager)
#
# with the same hooks as wsession_app, then a Variant for it in bench/variants.py.
