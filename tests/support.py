"""Test helpers: a real uvicorn server on a free port, and a recorder of hook calls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    EndReason,
    Session,
    SessionManager,
    SessionState,
    WSessionMiddleware,
    get_session,
)


@dataclass
class Server:
    """A running uvicorn server: its base URLs and the object to stop it."""

    server: uvicorn.Server
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@asynccontextmanager
async def run_server(app: Any, **config: Any) -> AsyncIterator[Server]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a port the OS picks) in this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A safety net: apps that never read are cancelled 5 s into shutdown rather than hanging.
    config.setdefault("timeout_graceful_shutdown", 5)
    cfg = uvicorn.Config(app, log_level="warning", lifespan="auto", **config)
    server = uvicorn.Server(cfg)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)  # uvicorn offers no start event; this polls a flag
        yield Server(server, port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@dataclass
class HookRecorder:
    """Connect and disconnect hooks that record every call, with a way to wait for counts."""

    connected: list[str] = field(default_factory=list)
    ended: list[tuple[str, EndReason | None, int | None, str | None]] = field(default_factory=list)
    _changed: Any = None  # an anyio.Event while someone waits (works on asyncio and trio)

    def install(self, manager: SessionManager) -> SessionManager:
        manager.on_connect(self._on_connect)
        manager.on_disconnect(self._on_disconnect)
        return manager

    def _on_connect(self, session: Session) -> None:
        self.connected.append(session.id)
        self._notify()

    def _on_disconnect(self, session: Session) -> None:
        self.ended.append(
            (session.id, session.end_reason, session.close_code, session.close_reason)
        )
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_ended(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` disconnect hooks ran (fail after ``timeout`` seconds)."""
        with anyio.fail_after(timeout):
            while len(self.ended) < count:
                self._changed = anyio.Event()
                await self._changed.wait()

    def ended_ids(self) -> list[str]:
        return [entry[0] for entry in self.ended]

    def reasons(self) -> list[EndReason | None]:
        return [entry[1] for entry in self.ended]


def reset_connection(ws: Any) -> None:
    """Drop a websockets client connection with a TCP reset: no close frame, no FIN."""
    import struct

    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def read_until_closed(ws: Any, timeout: float = 10.0) -> Any:
    """Read and discard messages until the server closes; return the close frame it sent."""
    from websockets.exceptions import ConnectionClosed

    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd


def mount(endpoint: Any, manager: SessionManager) -> Starlette:
    """A Starlette app with ``endpoint`` at ``/ws``, wrapped by wsession's middleware."""
    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


def recorded(**settings: Any) -> tuple[SessionManager, HookRecorder]:
    """A new manager (``settings`` as keyword arguments) with a HookRecorder installed."""
    manager = SessionManager(**settings)
    recorder = HookRecorder()
    recorder.install(manager)
    return manager, recorder


async def wait_unregistered(manager: SessionManager, live: int = 0, timeout: float = 10.0) -> None:
    """Wait until at most ``live`` local sessions remain registered (registries unregister a
    session after its disconnect hooks, and a networked one takes a round trip to do it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    await manager._wait_local(lambda: len(manager.local) <= live, deadline)
    assert len(manager.local) <= live, f"{len(manager.local)} sessions still registered"


async def next_of(ws: Any, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON message of type ``kind`` from a websockets client (others skipped)."""
    import json

    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return message  # type: ignore[no-any-return]


def open_session(session_id: str, send: Any, data: Any = None) -> Session:
    """An open session outside any server, whose frames go to ``send``: enough for registry
    tests. Its outbound path has the default bounds."""
    from wsession._outbound import Outbound

    session = Session(session_id, {"type": "websocket", "path": "/ws"}, None, data)
    session._outbound = Outbound(session, send, 256, 1 << 20, track=False)
    session.state = SessionState.OPEN
    return session


async def announce_and_read(ws: WebSocket) -> None:
    """An endpoint: accept, send the session id, then read until the client leaves."""
    await ws.accept()
    await ws.send_text(get_session(ws).id)
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass


def id_echo_app(manager: SessionManager, *, reads: bool = True) -> Starlette:
    """An app at ``/ws`` that sends the session id, then echoes (or, with ``reads=False``,
    never reads)."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        if not reads:
            await asyncio.Event().wait()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass

    return mount(endpoint, manager)
