"""The server matrix: the same lifecycle contract under uvicorn, hypercorn, daphne and granian.

Each server runs tests/apps/matrix_app.py as a subprocess (tests/servers.py) with the invocation
the README recommends; the app writes every hook run to a file, so "exactly once" is checked
across the process boundary. Where a server deviates (a wrong close code, a dropped reason, no
lifespan), a test asserts today's behaviour, so an upstream fix is noticed and the README's
Compatibility section can be updated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from wsession import SessionManager, get_session
from wsession.backends import MemoryRegistry

from .support import mount, run_server

pytestmark = pytest.mark.anyio


# -- a manager that no lifespan entered --------------------------------------------------------


class GatedRegistry(MemoryRegistry):
    """A memory registry that counts entries and holds the first one until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = 0
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def __aenter__(self) -> GatedRegistry:
        self.entered += 1
        self.waiting.set()
        await self.release.wait()
        return self


async def test_first_connections_enter_a_manager_no_lifespan_entered_exactly_once() -> None:
    """daphne sends no lifespan scope: the manager is entered by the first connection, once,
    even when two connections arrive while the registry is still being entered."""
    registry = GatedRegistry()
    manager = SessionManager(registry=registry)

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            pass

    async def one(server: Any) -> str:
        async with connect(f"{server.ws}/ws", open_timeout=10) as ws:
            return str(await ws.recv())

    inner = mount(endpoint, manager)
    scopes = 0
    both_in = asyncio.Event()

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        nonlocal scopes
        if scope["type"] == "websocket":
            scopes += 1
            if scopes == 2:
                both_in.set()
        # Runs on synchronously into the middleware up to its first suspension: by the time the
        # test sees both_in, the second connection has entered the registry or is waiting.
        await inner(scope, receive, send)

    async with run_server(counting) as server:
        first = asyncio.ensure_future(one(server))
        second = asyncio.ensure_future(one(server))
        async with asyncio.timeout(5):
            await registry.waiting.wait()
            await both_in.wait()
        assert registry.entered == 1
        assert manager.stats.accepted == 0
        registry.release.set()
        async with asyncio.timeout(10):
            ids = await asyncio.gather(first, second)
        third = await one(server)
    assert registry.entered == 1
    assert len({*ids, third}) == 3
    assert manager.stats.accepted == 3


async def test_a_manager_entered_in_the_lifespan_is_not_entered_again() -> None:
    registry = GatedRegistry()
    registry.release.set()
    manager = SessionManager(registry=registry)

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)

    async with manager, run_server(mount(endpoint, manager)) as server:
        for _ in range(3):
            async with connect(f"{server.ws}/ws") as ws:
                await ws.recv()
    assert registry.entered == 1
