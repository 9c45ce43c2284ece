"""Real uvicorn server, real clients: every way a connection can end runs the disconnect hooks
exactly once, and the registry ends empty."""

from __future__ import annotations

import asyncio
import random

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsession import EndReason, Session, SessionManager, get_session

from .support import HookRecorder, mount, recorded, reset_connection, run_server

pytestmark = pytest.mark.anyio


def lifecycle_app(manager: SessionManager) -> Starlette:
    async def endpoint(ws: WebSocket) -> None:
        mode = ws.query_params.get("mode", "echo")
        if mode == "raise-before":
            raise RuntimeError("app fails before accept")
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        if mode == "close":
            await ws.close(4002, "app closing")
        elif mode == "return":
            return
        elif mode == "raise-after":
            raise RuntimeError("app fails after accept")
        elif mode == "silent":
            await anyio.sleep_forever()  # never reads: only cancellation ends it
        else:
            try:
                while True:
                    await ws.send_text(await ws.receive_text())
            except WebSocketDisconnect:
                pass

    return mount(endpoint, manager)


def make() -> tuple[SessionManager, HookRecorder, Starlette]:
    manager, recorder = recorded()
    return manager, recorder, lifecycle_app(manager)


async def assert_clean(manager: SessionManager, recorder: HookRecorder, expected: int) -> None:
    await recorder.wait_ended(expected)
    assert sorted(recorder.connected) == sorted(recorder.ended_ids())
    assert len(set(recorder.ended_ids())) == len(recorder.ended_ids()) == expected
    assert await manager.count() == 0
    assert manager.stats.accepted == manager.stats.ended == expected


async def test_client_close_frame() -> None:
    manager, recorder, app = make()
    async with run_server(app) as server, connect(f"{server.ws}/ws") as ws:
        await ws.recv()
        await ws.close(4001, "client leaving")
        await assert_clean(manager, recorder, 1)
    assert recorder.ended[0][1:] == (EndReason.CLIENT_CLOSED, 4001, "client leaving")


async def test_tcp_reset_without_close_frame() -> None:
    manager, recorder, app = make()
    async with run_server(app) as server:
        ws = await connect(f"{server.ws}/ws")
        await ws.recv()
        reset_connection(ws)
        await assert_clean(manager, recorder, 1)
    # uvicorn's default implementation reports a drop without close frame as 1005.
    assert recorder.ended[0][1] is EndReason.CONNECTION_LOST
    assert recorder.ended[0][2] in (1005, 1006)


@pytest.mark.parametrize(
    ("mode", "reason", "code"),
    [
        ("close", EndReason.APP_CLOSED, 4002),
        ("return", EndReason.APP_RETURNED, None),
        ("raise-after", EndReason.APP_RAISED, 1011),
    ],
)
async def test_app_side_endings(mode: str, reason: EndReason, code: int | None) -> None:
    manager, recorder, app = make()
    async with run_server(app) as server, connect(f"{server.ws}/ws?mode={mode}") as ws:
        await ws.recv()
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        await assert_clean(manager, recorder, 1)
    assert recorder.ended[0][1:3] == (reason, code)


async def test_app_raises_before_accept() -> None:
    manager, recorder, app = make()
    async with run_server(app) as server:
        with pytest.raises(Exception, match="500"):
            await connect(f"{server.ws}/ws?mode=raise-before")
        await assert_clean(manager, recorder, 1)
    assert recorder.ended[0][1] is EndReason.APP_RAISED


async def test_server_shutdown_with_open_connections() -> None:
    """Readers get 1012 from uvicorn; apps that never read are cancelled at the graceful
    shutdown timeout. Every session's disconnect hooks run once either way."""
    manager, recorder, app = make()
    clients = []
    async with run_server(app, timeout_graceful_shutdown=1) as server:
        for mode in ["echo"] * 5 + ["silent"] * 5:
            ws = await connect(f"{server.ws}/ws?mode={mode}")
            await ws.recv()
            clients.append(ws)
        assert await manager.count() == 10
    await assert_clean(manager, recorder, 10)
    reasons = recorder.reasons()
    assert reasons.count(EndReason.SERVER_SHUTDOWN) == 5
    assert reasons.count(EndReason.CANCELLED) == 5
    for ws in clients:
        await ws.close()


async def test_http_requests_are_untouched() -> None:
    manager, _, app = make()
    async with run_server(app) as server, httpx.AsyncClient() as client:
        response = await client.get(f"{server.http}/ws")
    assert response.status_code == 404
    assert manager.stats.accepted == 0


@pytest.mark.slow
async def test_storm_of_1000_connections_leaving_in_mixed_ways() -> None:
    manager, recorder, app = make()
    seen_ids: list[str] = []
    rng = random.Random(7)
    ways = ["close", "reset", "server"] * 334

    async def one(way: str) -> None:
        mode = "close" if way == "server" else "echo"
        ws = await connect(f"{server.ws}/ws?mode={mode}", open_timeout=30)
        seen_ids.append(await ws.recv())  # type: ignore[arg-type]
        if way == "close":
            await ws.close()
        elif way == "reset":
            reset_connection(ws)
        else:
            with pytest.raises(ConnectionClosed):
                await ws.recv()

    rng.shuffle(ways)
    async with run_server(app, backlog=2048) as server:
        async with asyncio.timeout(120):
            await asyncio.gather(*(one(w) for w in ways[:1000]))
        await assert_clean(manager, recorder, 1000)
    assert len(set(seen_ids)) == 1000
    assert set(seen_ids) == set(recorder.connected)


async def test_a_finished_session_is_freed_without_the_garbage_collector() -> None:
    """Timers and the send wrapper must not keep a closed session (and the server's connection
    object behind it) alive: plain reference counting frees it. uvicorn's own keepalive timer
    snapshots the connection's context (so the Session, without the connection, lives until that
    timer's deadline); it is switched off here to see wsession's part alone."""
    import gc
    import weakref

    manager, recorder = recorded(idle_timeout=30, connect_timeout=30)
    freed = asyncio.Event()

    @manager.on_connect
    async def watch(session: Session) -> None:  # async: exercises the connect deadline
        weakref.finalize(session, freed.set)

    gc.disable()
    try:
        async with run_server(lifecycle_app(manager), ws_ping_interval=None) as server:
            async with connect(f"{server.ws}/ws") as ws:
                await ws.recv()
            await recorder.wait_ended(1)
            async with asyncio.timeout(5):  # the connection task unwinds after the hooks
                await freed.wait()
    finally:
        gc.enable()
    assert freed.is_set()
