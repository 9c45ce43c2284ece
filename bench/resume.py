"""``python -m bench.resume`` (``make bench-resume``): what session resumption costs.

Three numbers, each against resumption off in the same run:

- **per-message cost of recording**: an in-process connection (no server, no network, as in
  ``bench.inproc``) whose app answers every message through ``session.send_text`` (numbered and
  kept with ``resume_window``), and ``manager.send`` to an open session; CPU time per message.
- **resume latency**: a real uvicorn server on 127.0.0.1 and a ``websockets`` client: the
  client drops its TCP connection, 300 messages are sent to its detached session, and the time
  from the reconnect to the 300th replayed message is measured, ``--rounds`` times (p50, p99).
- **memory per detached session**: ``tracemalloc`` bytes still held per session after
  ``--sessions`` in-process connections were dropped and detached, next to an open idle one.

Memory registry only: Redis-backed resumption is not built yet.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import statistics
import sys
import time
import tracemalloc
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import SessionManager, WSessionMiddleware, get_session

from .inproc import _connection, _scope

ECHO = '{"type":"echo","text":"0123456789"}'

MISSED = 300
ON: dict[str, Any] = {"resume_window": 120.0, "resume_seq_field": "seq"}


def _app(manager: SessionManager) -> Starlette:
    async def endpoint(websocket: WebSocket) -> None:
        session = get_session(websocket)
        await websocket.accept()
        await websocket.send_json({"type": "welcome", "resume": session.resume_token})
        try:
            while True:
                await session.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


# -- per-message cost ------------------------------------------------------------------------------


async def _manager_sends(manager: SessionManager, sends: int) -> int:
    """CPU ns for ``sends`` calls of ``manager.send`` to one open in-process session."""
    app = _app(manager)
    opened = asyncio.Event()
    release = asyncio.Event()

    async def receive() -> Message:
        if not opened.is_set():
            opened.set()
            return {"type": "websocket.connect"}
        await release.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        return None

    task = asyncio.create_task(app(_scope(), receive, send))
    while not manager.local:  # noqa: ASYNC110 - a benchmark harness polling its own app
        await asyncio.sleep(0)
    (session_id,) = manager.local
    payload = {"type": "dm", "from": "server", "text": "0123456789"}
    started = time.process_time_ns()
    for _ in range(sends):
        await manager.send(session_id, payload)
    spent = time.process_time_ns() - started
    release.set()
    await task
    return spent


async def per_message(rounds: int, messages: int) -> list[str]:
    echo: dict[str, list[float]] = {"off": [], "on": []}
    sends: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        plain: dict[str, Any] = {}
        for name, settings in (("off", plain), ("on", ON)):
            app = _app(SessionManager(**settings))
            await _connection(app, 500, ECHO)  # warm
            long = await _connection(app, messages, ECHO)
            empty = await _connection(app, 0, ECHO)
            echo[name].append((long - empty) / messages / 1e3)
            sends[name].append(
                await _manager_sends(SessionManager(**settings), messages) / messages / 1e3
            )
    lines = [
        "| per message (CPU µs) | resumption off | on (numbered, kept) | difference |",
        "|---|---|---|---|",
    ]
    for label, data in (
        ("echo via session.send_text", echo),
        ("manager.send to one session", sends),
    ):
        off, on = statistics.median(data["off"]), statistics.median(data["on"])
        diff = statistics.median(a - b for a, b in zip(data["on"], data["off"], strict=True))
        lines.append(f"| {label} | {off:.2f} | {on:.2f} | {diff:+.2f} |")
    return lines


# -- resume latency on a real server -----------------------------------------------------------


async def resume_latency(rounds: int) -> list[str]:
    import uvicorn
    from websockets.asyncio.client import connect

    manager = SessionManager(**ON)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(manager), log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no start event
            await asyncio.sleep(0.01)
        url = f"ws://127.0.0.1:{port}/ws"
        times: list[float] = []
        for _ in range(rounds):
            ws = await connect(url)
            hello = await ws.recv()
            import json

            token = json.loads(hello)["resume"]
            (session_id,) = [s for s in manager.local if s not in manager.detached]
            ws.transport.abort()  # TCP gone without a close frame
            async with asyncio.timeout(10):
                while session_id not in manager.detached:  # noqa: ASYNC110 - bounded poll
                    await asyncio.sleep(0.001)
            for i in range(MISSED):
                await manager.send(session_id, {"type": "dm", "n": i})
            started = time.perf_counter()
            ws = await connect(f"{url}?resume={token}&last=0")
            welcome = json.loads(await ws.recv())
            assert "resume" in welcome
            for _ in range(MISSED):
                await ws.recv()
            times.append((time.perf_counter() - started) * 1e3)
            await ws.close()
            async with asyncio.timeout(10):
                while manager.local:  # noqa: ASYNC110 - bounded poll
                    await asyncio.sleep(0.001)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return [
        f"| resume and replay {MISSED} missed messages (memory registry, uvicorn, loopback) "
        f"| p50 {statistics.median(times):.1f} ms | p99 {p99:.1f} ms | max {times[-1]:.1f} ms "
        f"| {rounds} rounds |",
    ]


# -- memory per detached session ---------------------------------------------------------------


async def detached_memory(count: int) -> list[str]:
    results = {}
    for label, drop in (("open, idle", False), ("detached", True)):
        manager = SessionManager(**ON)
        app = _app(manager)
        gates: list[asyncio.Event] = []
        tasks = []
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            gate = asyncio.Event()
            gates.append(gate)
            tasks.append(asyncio.create_task(_idle_connection(app, gate)))
        while len(manager.local) < count:  # noqa: ASYNC110 - bounded by the tasks it started
            await asyncio.sleep(0)
        if drop:
            for gate in gates:
                gate.set()
            await asyncio.gather(*tasks)
            while len(manager.detached) < count:  # noqa: ASYNC110 - as above
                await asyncio.sleep(0)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        results[label] = held / count
        for gate in gates:
            gate.set()
        await asyncio.gather(*tasks)
        if manager.resumption is not None:
            await manager.resumption.end_all()
    return [
        f"| memory per session ({count} sessions, tracemalloc) "
        f"| open, idle: {results['open, idle'] / 1024:.2f} KiB "
        f"| detached: {results['detached'] / 1024:.2f} KiB | |",
    ]


async def _idle_connection(app: Any, gate: asyncio.Event) -> None:
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "websocket.connect"}
        await gate.wait()
        return {"type": "websocket.disconnect", "code": 1006}

    async def send(message: Message) -> None:
        return None

    await app(_scope(), receive, send)


async def _main(args: argparse.Namespace) -> None:
    print("## Resumption (bench.resume)\n")
    print("\n".join(await per_message(args.rounds, args.messages)))
    print()
    print("| measure | | | | |\n|---|---|---|---|---|")
    print("\n".join(await resume_latency(args.resumes)))
    print("\n".join(await detached_memory(args.sessions)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--resumes", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=2000)
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
