"""The servers of ``bench.scale``: bare Starlette and wsession, each with an in-server control API.

``python -m bench.scale_apps --variant bare|wsession`` serves one of them on 127.0.0.1 (a port
the OS picks, printed as ``PORT <n>``) under uvicorn with one worker, no WebSocket pings (an
idle connection costs nothing but its memory) and a listen backlog deep enough for a burst.

Surface (both variants):

- ``WS /ws``: accept, then wait for the client to close (idle connections).
- ``GET /ctl/mem``: after ``gc.collect()`` and ``malloc_trim(0)``: this process's RSS, the
  number of GC-tracked objects (and per type), of allocated pymalloc blocks (every small
  object, str and bytes included) and the connections the app tracks.
- ``GET /ctl/ops?k=K&rounds=R``: times K registry lookups, K ``count()`` calls, K sends by id
  and K group joins (random live ids, picked before the clock starts; joins left again after
  each round), R rounds each, inside this process; answers the fastest round's mean per
  operation as CPU time (``time.process_time_ns``: ``<op>_ns``) and as wall time
  (``perf_counter_ns``: ``<op>_wall_ns``); ``<op>_hot_ns``: the same on 64 ids over and over
  (cache-hot).
- ``POST /ctl/broadcast``: one broadcast of the body; answers how many it reached and the loop
  time (``perf_counter_ns``) and this process's CPU (``process_time_ns``) for it.

The bare variant keeps what an app without wsession needs for the same operations: a dict of
id -> socket and a dict of group -> set of ids; the wsession variant uses the manager.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import SessionManager, WSessionMiddleware

from .procs import raise_fd_limit, rss_bytes
from .server import _die_with_parent

GROUPS = 64  # joins spread over this many groups
PAYLOAD = "x" * 32
HOT = 64  # ids in the cache-hot variant of each operation


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS, so RSS shows what is still in use."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mem(live: int) -> JSONResponse:
    gc.collect()
    _malloc_trim()
    objects = gc.get_objects()
    types = Counter(type(o).__qualname__ for o in objects)
    return JSONResponse(
        {
            "rss": rss_bytes([os.getpid()]),
            "objects": len(objects),
            # Every live pymalloc block: str and bytes too, which the GC does not track.
            "blocks": sys.getallocatedblocks(),
            "types": types,
            "modules": sorted(sys.modules),
            "live": live,
        }
    )


async def _time_rounds(
    op: Callable[[str], Awaitable[Any]], ids: list[str], rounds: int
) -> tuple[float, float]:
    """The fastest round's mean ns per call of ``op`` over ``ids``, as wall time
    (``perf_counter_ns``) and as this process's CPU time (``process_time_ns``, which leaves out
    the time other processes on the machine held the core); fastest: least disturbed."""
    wall = cpu = float("inf")
    for _ in range(rounds):
        started_cpu, started = time.process_time_ns(), time.perf_counter_ns()
        for session_id in ids:
            await op(session_id)
        wall = min(wall, (time.perf_counter_ns() - started) / len(ids))
        cpu = min(cpu, (time.process_time_ns() - started_cpu) / len(ids))
    return wall, cpu


class Ops:
    """The operations one variant is timed on; each takes a live connection id."""

    def __init__(
        self,
        ids: Callable[[], list[str]],
        lookup: Callable[[str], Awaitable[Any]],
        count: Callable[[str], Awaitable[Any]],
        send: Callable[[str], Awaitable[Any]],
        join: Callable[[str], Awaitable[Any]],
        leave_all: Callable[[list[str]], Awaitable[None]],
        broadcast: Callable[[str], Awaitable[int]],
        live: Callable[[], int],
    ) -> None:
        self.ids, self.lookup, self.count, self.send = ids, lookup, count, send
        self.join, self.leave_all, self.broadcast, self.live = join, leave_all, broadcast, live


def _control_routes(ops: Ops) -> list[Route]:
    async def mem(request: Request) -> JSONResponse:
        return _mem(ops.live())

    async def timed_ops(request: Request) -> JSONResponse:
        k = int(request.query_params.get("k", "1000"))
        rounds = int(request.query_params.get("rounds", "3"))
        every = ops.ids()
        if not every:
            return JSONResponse({"error": "no connections"}, status_code=409)
        ids = random.choices(every, k=k)
        # The same few ids over and over: what an operation costs when the sessions it
        # touches are in the CPU cache. Flat here but rising with N in the random-id figure
        # means memory locality (cache/TLB misses), not an O(N) algorithm.
        hot = random.choices(every, k=HOT)
        hot_ids = [hot[i % HOT] for i in range(k)]
        result: dict[str, float] = {}
        for name, op in (("lookup", ops.lookup), ("count", ops.count), ("send", ops.send)):
            result[f"{name}_wall_ns"], result[f"{name}_ns"] = await _time_rounds(op, ids, rounds)
            result[f"{name}_hot_wall_ns"], result[f"{name}_hot_ns"] = await _time_rounds(
                op, hot_ids, rounds
            )
        result["join_hot_wall_ns"] = result["join_hot_ns"] = float("inf")
        distinct = random.sample(every, min(HOT, len(every)))
        for _ in range(max(1, k // HOT) * rounds):
            wall, cpu = await _time_rounds(ops.join, distinct, 1)
            result["join_hot_wall_ns"] = min(result["join_hot_wall_ns"], wall)
            result["join_hot_ns"] = min(result["join_hot_ns"], cpu)
            await ops.leave_all(distinct)
        # A join changes state: each round joins a fresh sample, then (untimed) leaves again,
        # so memory after close is comparable with the baseline.
        result["join_wall_ns"] = result["join_ns"] = float("inf")
        for _ in range(rounds):
            joined = random.sample(every, min(k, len(every)))
            wall, cpu = await _time_rounds(ops.join, joined, 1)
            result["join_wall_ns"] = min(result["join_wall_ns"], wall)
            result["join_ns"] = min(result["join_ns"], cpu)
            await ops.leave_all(joined)
        return JSONResponse(result)

    async def broadcast(request: Request) -> JSONResponse:
        text = (await request.body()).decode()
        cpu, wall = time.process_time_ns(), time.perf_counter_ns()
        sent = await ops.broadcast(text)
        return JSONResponse(
            {
                "sent": sent,
                "loop_ns": time.perf_counter_ns() - wall,
                "cpu_ns": time.process_time_ns() - cpu,
            }
        )

    return [
        Route("/ctl/mem", mem),
        Route("/ctl/ops", timed_ops),
        Route("/ctl/broadcast", broadcast, methods=["POST"]),
    ]


async def _idle(websocket: WebSocket) -> None:
    """Wait for the client's close (a text message, if any, is ignored)."""
    with suppress(WebSocketDisconnect):
        while True:
            await websocket.receive_text()


def bare_app() -> Starlette:
    """Starlette with the dicts an app needs to find, count, group and broadcast sockets."""
    sockets: dict[str, WebSocket] = {}
    groups: dict[str, set[str]] = {}
    member_of: dict[str, set[str]] = {}

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        conn_id = secrets.token_urlsafe(16)
        sockets[conn_id] = websocket
        try:
            await _idle(websocket)
        finally:
            del sockets[conn_id]
            for group in member_of.pop(conn_id, ()):
                members = groups[group]
                members.discard(conn_id)
                if not members:
                    del groups[group]

    async def lookup(conn_id: str) -> WebSocket | None:
        return sockets.get(conn_id)

    async def count(conn_id: str) -> int:
        return len(sockets)

    async def send(conn_id: str) -> None:
        websocket = sockets.get(conn_id)
        if websocket is not None:
            with suppress(RuntimeError, OSError, WebSocketDisconnect):
                await websocket.send_text(PAYLOAD)

    async def join(conn_id: str) -> None:
        group = f"g{hash(conn_id) % GROUPS}"
        groups.setdefault(group, set()).add(conn_id)
        member_of.setdefault(conn_id, set()).add(group)

    async def leave_all(ids: list[str]) -> None:
        for conn_id in ids:
            for group in member_of.pop(conn_id, ()):
                members = groups[group]
                members.discard(conn_id)
                if not members:
                    del groups[group]

    async def broadcast(text: str) -> int:
        sent = 0
        for websocket in list(sockets.values()):
            try:
                await websocket.send_text(text)
            except (RuntimeError, OSError, WebSocketDisconnect):
                continue  # it left meanwhile
            sent += 1
        return sent

    ops = Ops(
        lambda: list(sockets), lookup, count, send, join, leave_all, broadcast, lambda: len(sockets)
    )
    return Starlette(routes=[WebSocketRoute("/ws", endpoint), *_control_routes(ops)])


def wsession_app() -> Starlette:
    """The same idle endpoint wrapped in wsession (memory registry, default settings)."""
    manager = SessionManager()
    # BENCH_SCALE_LEAK=1 (``bench.scale --leak-selftest``): keep every connection's scope, a
    # deliberate leak the harness must report.
    kept: list[Any] | None = [] if os.environ.get("BENCH_SCALE_LEAK") == "1" else None

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        if kept is not None:
            kept.append(dict(websocket.scope))
        await _idle(websocket)

    async def count(conn_id: str) -> int:
        return await manager.count()

    async def send(conn_id: str) -> None:
        await manager.send(conn_id, PAYLOAD)

    async def join(conn_id: str) -> None:
        await manager.join(conn_id, f"g{hash(conn_id) % GROUPS}")

    async def leave_all(ids: list[str]) -> None:
        for conn_id in ids:
            await manager.leave(conn_id, f"g{hash(conn_id) % GROUPS}")

    ops = Ops(
        lambda: list(manager.local),
        manager.get,
        count,
        send,
        join,
        leave_all,
        manager.broadcast,
        lambda: len(manager.local),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager:
            yield

    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint), *_control_routes(ops)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
        lifespan=lifespan,
    )


FACTORIES: dict[str, Callable[[], Starlette]] = {"bare": bare_app, "wsession": wsession_app}


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.scale_apps")
    parser.add_argument("--variant", choices=sorted(FACTORIES), required=True)
    parser.add_argument("--parent", type=int, default=os.getppid())
    parser.add_argument("--fds", type=int, default=1 << 20, help="RLIMIT_NOFILE wanted")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    raise_fd_limit(args.fds)
    config = uvicorn.Config(
        FACTORIES[args.variant](),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        backlog=4096,
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=3,
    )
    sock = config.bind_socket()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
