"""``python -m bench.scale_redis``: what RedisRegistry asks of Redis per operation.

The inputs of the capacity model in BENCHMARKS.md. A private ``redis-server`` on a free port
(never the machine's 6379); two workers, A and B, in this process: two SessionManagers with
their own RedisRegistry (their own node ids, pools and listeners) on that Redis, each wrapping
a small ASGI app driven in memory (no sockets: ``receive`` and ``send`` are Python callables),
so every Redis command comes from wsession itself. Each operation runs many times; around each
phase the script reads ``INFO commandstats`` (calls per command; commands run inside Lua
scripts are counted under their own names as well as the ``evalsha``), ``INFO stats``
(``total_commands_processed``, ``total_net_input_bytes``, ``total_net_output_bytes``, which
include the pub/sub pushes to subscribers) and the Redis process's CPU time from ``/proc``, and
this process's CPU (both workers together). The INFO calls themselves are measured on an empty
phase and subtracted.

Phases: connect (A), join (A's sessions into groups), send by id A->A (local) and B->A
(remote), group send from B to groups with members on both workers, broadcast from B,
disconnect (A), and the heartbeat (both workers idle, short heartbeat).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from example_app.procs import free_port, redis_binary, start_redis, stop
from wsession import SessionManager, WSessionMiddleware
from wsession.backends.redis import RedisRegistry

from .procs import cpu_ns

GROUP_MEMBERS = 50  # members per group on each worker
# Handshakes (and disconnects) in flight per worker. Far more at once (1,000 in one loop
# tick) queue on the registry's connection pool (64) past command_timeout (1 s): the worker
# then takes Redis for unavailable and resyncs, which is not the steady state measured here.
BATCH = 50


def _scope(n: int) -> Scope:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 10000 + n % 50000),
        "root_path": "",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench.scale_redis"),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"sec-websocket-version", b"13"),
        ],
        "subprotocols": [],
        "state": {},
    }


async def _idle_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Accept, then wait for the disconnect."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


class Worker:
    """One SessionManager + RedisRegistry and its in-memory connections."""

    def __init__(self, name: str, url: str | None, heartbeat: float) -> None:
        self.name = name
        # url None: the memory registry, as a reference for what Redis adds to the worker.
        registry = RedisRegistry(url, heartbeat=heartbeat, prefix="cap") if url else None
        self.manager = SessionManager(registry=registry)
        self.app = WSessionMiddleware(_idle_app, manager=self.manager)
        self.received = 0
        self.accepted = 0
        self._leave: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _connection(self, n: int, leave: asyncio.Event) -> None:
        connected = False

        async def receive() -> Message:
            nonlocal connected
            if not connected:
                connected = True
                return {"type": "websocket.connect"}
            await leave.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(message: Message) -> None:
            if message["type"] == "websocket.send":
                self.received += 1
            elif message["type"] == "websocket.accept":
                self.accepted += 1

        await self.app(_scope(n), receive, send)

    async def open(self, count: int) -> None:
        """Open ``count`` connections; return once all are accepted (registered in Redis:
        the middleware passes the accept on after the registry's ``add``)."""
        for start in range(0, count, BATCH):
            size = min(BATCH, count - start)
            goal = self.accepted + size
            for _ in range(size):
                leave = asyncio.Event()
                self._leave.append(leave)
                n = len(self._leave)
                self._tasks.append(asyncio.create_task(self._connection(n, leave)))
            await _until(partial(self._accepted_at_least, goal), f"{self.name}: connect")

    def _accepted_at_least(self, goal: int) -> bool:
        return self.accepted >= goal

    async def close_all(self) -> None:
        """Disconnect every connection, ``BATCH`` at a time; return once all are removed."""
        for start in range(0, len(self._leave), BATCH):
            for leave in self._leave[start : start + BATCH]:
                leave.set()
            await asyncio.wait_for(asyncio.gather(*self._tasks[start : start + BATCH]), 30)
        self._leave, self._tasks = [], []
        await _until(lambda: not self.manager.local, f"{self.name}: disconnect")

    def ids(self) -> list[str]:
        return list(self.manager.local)


async def _until(done: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # bounded by the deadline
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:g}s")
        await asyncio.sleep(0.005)


@dataclass
class Cost:
    """What one phase cost, per operation."""

    phase: str
    ops: int
    commands: dict[str, float] = field(default_factory=dict)  # calls per op, by command
    processed: float = 0.0  # total_commands_processed per op (counts script-inner ones too)
    bytes_in: float = 0.0
    bytes_out: float = 0.0
    redis_cpu_us: float = 0.0
    worker_cpu_us: float = 0.0
    note: str = ""


class Probe:
    """Snapshots of the Redis counters (through a plain client of the script's own)."""

    def __init__(self, url: str, redis_pid: int) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.redis_pid = redis_pid
        self.overhead: dict[str, float] = {}

    async def snapshot(self) -> dict[str, Any]:
        stats = await self.client.info("stats")
        commands = await self.client.info("commandstats")
        calls = Counter(
            {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commands.items()}
        )
        return {
            "calls": calls,
            "processed": int(stats["total_commands_processed"]),
            "in": int(stats["total_net_input_bytes"]),
            "out": int(stats["total_net_output_bytes"]),
            "redis_cpu": cpu_ns([self.redis_pid]),
            "cpu": time.process_time_ns(),
        }

    async def measure(
        self, phase: str, ops: int, action: Callable[[], Awaitable[None]], note: str = ""
    ) -> Cost:
        before = await self.snapshot()
        await action()
        after = await self.snapshot()
        calls = after["calls"] - before["calls"]
        for probe_command in ("info",):
            calls.pop(probe_command, None)
        over = self.overhead
        return Cost(
            phase=phase,
            ops=ops,
            commands={name: round(c / ops, 3) for name, c in sorted(calls.items())},
            processed=(after["processed"] - before["processed"] - over.get("processed", 0)) / ops,
            bytes_in=(after["in"] - before["in"] - over.get("in", 0)) / ops,
            bytes_out=(after["out"] - before["out"] - over.get("out", 0)) / ops,
            redis_cpu_us=(after["redis_cpu"] - before["redis_cpu"]) / ops / 1000,
            worker_cpu_us=(after["cpu"] - before["cpu"]) / ops / 1000,
            note=note,
        )

    async def calibrate(self) -> None:
        """What a pair of snapshots costs by itself (subtracted from every phase)."""
        samples = []
        for _ in range(5):
            before = await self.snapshot()
            after = await self.snapshot()
            samples.append({k: after[k] - before[k] for k in ("processed", "in", "out")})
        self.overhead = {k: min(s[k] for s in samples) for k in ("processed", "in", "out")}


@asynccontextmanager
async def _workers(url: str | None, heartbeat: float) -> AsyncIterator[tuple[Worker, Worker]]:
    a, b = Worker("A", url, heartbeat), Worker("B", url, heartbeat)
    async with a.manager, b.manager:
        try:
            yield a, b
        finally:
            async with asyncio.timeout(60):
                await a.close_all()
                await b.close_all()


async def _phases(url: str, redis_pid: int, n: int, heartbeat_seconds: float) -> list[Cost]:
    probe = Probe(url, redis_pid)
    await probe.calibrate()
    costs: list[Cost] = []
    async with _workers(None, heartbeat=60.0) as (a, _):  # the memory registry: a reference
        await a.open(n)  # warm-up (the first send imports what sending needs)
        for session_id in a.ids():
            await a.manager.send(session_id, "hello")
        await a.close_all()
        costs.append(await probe.measure("connect, memory registry", n, lambda: a.open(n)))
        a_ids = a.ids()

        async def send_memory() -> None:
            for session_id in a_ids:
                await a.manager.send(session_id, "hello")

        costs.append(await probe.measure("send by id, memory registry", n, send_memory))
        costs.append(await probe.measure("disconnect, memory registry", n, a.close_all))
    async with _workers(url, heartbeat=60.0) as (a, b):  # no heartbeat inside the phases
        for worker in (a, b):  # warm-up: connection pools grown, scripts loaded
            await worker.open(n)
            for i, session_id in enumerate(worker.ids()):
                await worker.manager.join(session_id, f"warm-{i % 4}")
            await worker.close_all()
        costs.append(await probe.measure("connect", n, lambda: a.open(n)))
        await b.open(n)
        a_ids, b_ids = a.ids(), b.ids()
        groups = max(1, n // GROUP_MEMBERS)

        async def join() -> None:
            for i, session_id in enumerate(a_ids):
                await a.manager.join(session_id, f"room-{i % groups}")

        costs.append(await probe.measure("join (local session)", n, join))
        for i, session_id in enumerate(b_ids):
            await b.manager.join(session_id, f"room-{i % groups}")

        async def send_local() -> None:
            for session_id in a_ids:
                await a.manager.send(session_id, "hello")

        costs.append(await probe.measure("send by id, local", n, send_local))

        async def send_remote() -> None:
            goal = a.received + n
            for session_id in a_ids:
                await b.manager.send(session_id, "hello")
            await _until(lambda: a.received >= goal, "remote sends delivered")

        costs.append(
            await probe.measure("send by id, other worker", n, send_remote, "B -> a session on A")
        )

        async def group_send() -> None:
            goal = a.received + n
            for g in range(groups):
                await b.manager.send_group(f"room-{g}", "hello")
            await _until(lambda: a.received >= goal, "group sends delivered")

        members = 2 * n // groups
        costs.append(
            await probe.measure(
                "group send",
                groups,
                group_send,
                f"from B; {members} members each, half on A",
            )
        )
        rounds = 20

        async def broadcast() -> None:
            goal = a.received + rounds * n
            for _ in range(rounds):
                await b.manager.broadcast("hello")
            await _until(lambda: a.received >= goal, "broadcasts delivered")

        costs.append(
            await probe.measure(
                "broadcast", rounds, broadcast, f"from B; {n} sessions on each of 2 workers"
            )
        )
        costs.append(await probe.measure("disconnect", n, a.close_all))
    # Redis's own housekeeping (serverCron) over the same time: subtracted from the heartbeat.
    ticks = round(2 * heartbeat_seconds / 0.5)  # two workers, a tick every half heartbeat
    idle = await probe.measure("idle", ticks, lambda: asyncio.sleep(heartbeat_seconds))
    # The heartbeat, apart: two idle workers with N sessions each.
    beat = 1.0  # RedisRegistry's default
    async with _workers(url, heartbeat=beat) as (a, b):
        await a.open(n)
        await b.open(n)
        await asyncio.sleep(beat)  # the first ticks out of the way
        tick = await probe.measure(
            "heartbeat tick",
            ticks,
            lambda: asyncio.sleep(heartbeat_seconds),
            f"per worker per tick (2 per heartbeat); 2 workers, {n} sessions each; "
            "Redis's idle CPU over the same time subtracted",
        )
        tick.redis_cpu_us -= idle.redis_cpu_us
        costs.append(tick)
    await probe.client.aclose()
    return costs


def render(costs: list[Cost]) -> str:
    lines = [
        "| operation | Redis commands | of which (calls per operation; inside scripts too) "
        "| bytes in | bytes out | Redis CPU (µs) | worker CPU (µs) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for c in costs:
        listed = ", ".join(f"{name} {calls:g}" for name, calls in c.commands.items()) or "none"
        label = c.phase + (f" ({c.note})" if c.note else "")
        lines.append(
            f"| {label} | {c.processed:.2f} | {listed} | {c.bytes_in:,.0f} | {c.bytes_out:,.0f} "
            f"| {c.redis_cpu_us:.1f} | {c.worker_cpu_us:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_redis", description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="sessions per worker")
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    binary = redis_binary()
    if binary is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    faulthandler.dump_traceback_later(240, exit=False)
    with tempfile.TemporaryDirectory(prefix="wsession-cap-") as folder:
        port = free_port()
        proc = start_redis(binary, port, folder)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            costs = asyncio.run(
                asyncio.wait_for(_phases(url, proc.pid, args.n, args.heartbeat_seconds), 300)
            )
        finally:
            stop(proc)
    print(render(costs))
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in costs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
