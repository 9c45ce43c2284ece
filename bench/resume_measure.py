"""The measurements behind ``bench.resume``, each run on managers from a factory, so the same code
measures resumption off, on with the memory registry and on with ``RedisRegistry``.

Every manager is entered (``async with``) and left by the function that made it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import SessionManager, WSessionMiddleware, get_session

from .inproc import _connection, _scope

Make = Callable[[], SessionManager]
CpuReader = Callable[[], int]
"""CPU ns another process (the redis-server) has used so far."""

ECHO = '{"type":"echo","text":"0123456789"}'
PAYLOAD = {"type": "dm", "from": "server", "text": "0123456789"}
WARM = 300
BURST = 100
"""Sends made at once in a burst (one turn of the event loop: one Redis pipeline)."""
BATCH = 50
"""In-process connections opened (or dropped) at once: far more at once queue on the Redis
registry's pool past its command timeout (see ``bench.scale_redis``)."""


def app(manager: SessionManager) -> Starlette:
    """Welcome (raw, unnumbered: id, token, resumed), then echo every text through
    ``session.send_text`` (numbered and kept with ``resume_window``)."""

    async def endpoint(websocket: WebSocket) -> None:
        session = get_session(websocket)
        await websocket.accept()
        welcome = {"id": session.id, "resume": session.resume_token, "resumed": session.resumed}
        await websocket.send_json({"type": "welcome", **welcome})
        try:
            while True:
                await session.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


def _never() -> int:
    return 0


# -- per-message cost ------------------------------------------------------------------------------


async def echo_cost(make: Make, messages: int, other: CpuReader = _never) -> tuple[float, float]:
    """CPU µs per message of an in-process connection echoing ``messages`` texts (a long
    connection minus an empty one), in this process and in ``other``."""
    async with make() as manager:
        echo = app(manager)
        await _connection(echo, WARM, ECHO)
        before = other()
        long = await _connection(echo, messages, ECHO)
        middle = other()
        empty = await _connection(echo, 0, ECHO)
        after = other()
    return (long - empty) / messages / 1e3, ((middle - before) - (after - middle)) / messages / 1e3


@dataclass
class Calls:
    """``count`` sequential calls of one send: CPU µs per call here and in the other process,
    and each call's wall time (µs)."""

    cpu: float
    other_cpu: float
    wall: list[float] = field(default_factory=list)


async def send_calls(make: Make, count: int, via: str, other: CpuReader = _never) -> Calls:
    """``count`` messages to one open in-process session, after ``WARM``: ``manager.send``
    (``via="manager"``) or ``session.send_text`` (``"session"``) called one after the other,
    or ``manager.send`` in bursts of ``BURST`` at once (``"burst"``; the wall times are then
    per burst)."""
    async with make() as manager, _held_open(manager) as session:
        call: Callable[[], Awaitable[Any]]
        per_call = 1
        if via == "manager":
            call = lambda: manager.send(session.id, PAYLOAD)  # noqa: E731
        elif via == "session":
            call = lambda: session.send_text(ECHO)  # noqa: E731
        else:
            per_call = BURST
            call = lambda: asyncio.gather(  # noqa: E731
                *(manager.send(session.id, PAYLOAD) for _ in range(BURST))
            )
        for _ in range(WARM // per_call):
            await call()
        wall: list[float] = []
        before, started = other(), time.process_time_ns()
        for _ in range(count // per_call):
            at = time.perf_counter_ns()
            await call()
            wall.append((time.perf_counter_ns() - at) / 1e3)
        spent, other_spent = time.process_time_ns() - started, other() - before
    sent = count // per_call * per_call
    return Calls(spent / sent / 1e3, other_spent / sent / 1e3, wall)


@asynccontextmanager
async def _held_open(manager: SessionManager) -> AsyncIterator[Any]:
    """One open in-process session of ``app(manager)`` whose client sends nothing and ignores
    what it gets; it disconnects (1000) on exit."""
    opened = asyncio.Event()
    welcomed = asyncio.Event()
    release = asyncio.Event()

    async def receive() -> Message:
        if not opened.is_set():
            opened.set()
            return {"type": "websocket.connect"}
        await release.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        if message["type"] == "websocket.send":
            welcomed.set()

    task = asyncio.create_task(app(manager)(_scope(), receive, send))
    async with asyncio.timeout(10):
        await welcomed.wait()
    (session,) = manager.local.values()
    try:
        yield session
    finally:
        release.set()
        await task


# -- resume latency on real servers ------------------------------------------------------------


@asynccontextmanager
async def serving(manager: SessionManager) -> AsyncIterator[str]:
    """``app(manager)`` on a uvicorn server on a free 127.0.0.1 port; yields its ws URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app(manager), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@dataclass
class Worker:
    """A manager and the URL of its server."""

    manager: SessionManager
    url: str


@asynccontextmanager
async def workers(make: Make, count: int) -> AsyncIterator[list[Worker]]:
    """``count`` managers from ``make``, each entered and serving its own uvicorn server."""
    async with AsyncExitStack() as stack:
        found = []
        for _ in range(count):
            manager = await stack.enter_async_context(make())
            found.append(Worker(manager, await stack.enter_async_context(serving(manager))))
        yield found


async def resume_round(first: Worker, resumer: Worker, missed: int) -> tuple[float, float]:
    """One round: a client on ``first`` drops its TCP connection; ``missed`` messages are sent
    to its detached session (by ``first``'s manager, one after the other); the client resumes
    on ``resumer``. Returns ms from the start of the resume handshake to the welcome and to the
    last replayed message (each replayed message is checked: numbered 1..missed, in order)."""
    from websockets.asyncio.client import connect

    async with asyncio.timeout(30):
        ws = await connect(first.url)
        hello = json.loads(await ws.recv())
        session_id = hello["id"]
        ws.transport.abort()  # TCP gone without a close frame
        while session_id not in first.manager.detached:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.001)
        for i in range(missed):
            await first.manager.send(session_id, {"type": "dm", "n": i})
        started = time.perf_counter()
        ws = await connect(f"{resumer.url}?resume={hello['resume']}&last=0")
        welcome = json.loads(await ws.recv())
        at_welcome = time.perf_counter()
        if not welcome["resumed"] or welcome["id"] != session_id:
            raise RuntimeError(f"the resume failed: {welcome}")
        for i in range(missed):
            message = json.loads(await ws.recv())
            if message.get("n") != i or message.get("seq") != i + 1:
                raise RuntimeError(f"replayed out of order: {message} as message {i + 1}")
        done = time.perf_counter()
        await ws.close()
        while first.manager.local or resumer.manager.local:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.001)
    return (at_welcome - started) * 1e3, (done - started) * 1e3


# -- memory per detached session ---------------------------------------------------------------


class Store(Protocol):
    """What ``session_memory`` reads from a store besides this process (Redis)."""

    async def reset(self) -> None:
        """Forget everything (what a previous pass left: detached sessions stay in Redis after
        their worker exits, for another worker to resume)."""
        ...

    async def used(self) -> int:
        """Bytes the store uses now."""
        ...

    async def sample(self, manager: SessionManager, detached: bool) -> dict[str, int]:
        """Bytes of one session's keys (an open one, or a detached one), by key kind."""
        ...


class NoStore:
    """The memory registry: nothing outside this process."""

    async def reset(self) -> None:
        return None

    async def used(self) -> int:
        return 0

    async def sample(self, manager: SessionManager, detached: bool) -> dict[str, int]:
        return {}


@dataclass
class Memory:
    """Bytes per session, by state: in this process (tracemalloc), in the store (its whole
    use, divided), and one sample session's keys in the store."""

    worker: dict[str, float] = field(default_factory=dict)
    store: dict[str, float] = field(default_factory=dict)
    keys: dict[str, dict[str, int]] = field(default_factory=dict)


async def session_memory(make: Make, count: int, missed: int, store: Store | None = None) -> Memory:
    """Bytes per session of ``count`` in-process sessions: open and idle; detached; detached
    and missing ``missed`` broadcasts (``PAYLOAD``). Each state against the state before any
    was opened, in this process (tracemalloc, after a GC) and in ``store``."""
    store = store or NoStore()
    memory = Memory()
    for drop in (False, True):
        await store.reset()
        await _memory_pass(make, count, missed, store, memory, drop=drop)
    return memory


async def _memory_pass(
    make: Make, count: int, missed: int, store: Store, memory: Memory, *, drop: bool
) -> None:
    async with make() as manager, _Idle(manager) as idle:
        await idle.open(BATCH)  # warm: a Redis registry's pool grows to its size
        await idle.drop()
        gc.collect()
        tracemalloc.start()
        try:
            base, base_store = tracemalloc.get_traced_memory()[0], await store.used()

            async def take(label: str) -> None:
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - base
                memory.worker[label] = held / count
                memory.store[label] = (await store.used() - base_store) / count
                memory.keys[label] = await store.sample(manager, drop)

            await idle.open(count)
            if not drop:
                await take("open, idle")
                return
            await idle.drop()
            await take("detached")
            for i in range(missed):
                await manager.broadcast({**PAYLOAD, "n": i})
            await take(f"detached, {missed} missed")
        finally:
            tracemalloc.stop()


class _Idle:
    """In-process connections of ``app(manager)`` that send nothing; dropped (1006) in batches,
    each batch once it is detached. Any still open are dropped on exit, and every detached
    session is ended with the manager (``end_all``)."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.gates: list[asyncio.Event] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        self.welcomed = 0

    async def __aenter__(self) -> _Idle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drop()

    async def open(self, count: int) -> None:
        """Open ``count`` more; return when each has its welcome."""
        app_ = app(self.manager)
        for start in range(0, count, BATCH):
            for _ in range(min(BATCH, count - start)):
                gate = asyncio.Event()
                self.gates.append(gate)
                self.tasks.append(asyncio.create_task(self._connection(app_, gate)))
            await self._until(lambda: self.welcomed >= len(self.tasks))

    async def drop(self) -> None:
        """Drop every open connection; return when each is detached."""
        while self.dropped < len(self.gates):
            batch = self.gates[self.dropped : self.dropped + BATCH]
            for gate in batch:
                gate.set()
            async with asyncio.timeout(60):
                await asyncio.gather(*self.tasks[self.dropped : self.dropped + len(batch)])
            self.dropped += len(batch)
            await self._until(lambda: len(self.manager.detached) >= self.dropped)

    async def _until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(60):
            while not done():  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.001)

    async def _connection(self, asgi: Any, gate: asyncio.Event) -> None:
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "websocket.connect"}
            await gate.wait()
            return {"type": "websocket.disconnect", "code": 1006}

        async def send(message: Message) -> None:
            if message["type"] == "websocket.send" and "resume" in message.get("text", ""):
                self.welcomed += 1

        await asgi(_scope(), receive, send)
