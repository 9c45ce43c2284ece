"""The measured phases, run by the load client against one server process (tree).

Each phase reads the server's CPU time (or RSS) from /proc right at its own boundaries, so the
numbers are the server's cost per operation whatever the client's speed. Every loop is bounded
in count and in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .client import OP_TEXT, Http, WSConn, client_frame, close_all, open_many, open_ws
from .procs import cpu_ns, rss_bytes
from .settings import Settings

PATH = "/ws?name=bench-client"

Metrics = dict[str, float]


class PhaseError(RuntimeError):
    """A phase could not produce its number (the server misbehaved or was too slow)."""


class NotAvailable(Exception):
    """The variant cannot do this (e.g. wsession without ``SessionManager.broadcast``)."""


@dataclass
class Snap:
    """CPU time of the server tree and of this client, and the wall clock, at one instant."""

    server_ns: int
    client_ns: int
    wall_ns: int


@dataclass
class Target:
    """The server under test: its port, its process ids and the control HTTP client."""

    port: int
    pids: list[int]
    http: Http

    def snap(self) -> Snap:
        return Snap(cpu_ns(self.pids), time.process_time_ns(), time.perf_counter_ns())


async def live_count(target: Target) -> int:
    status, body = await target.http.request("GET", "/count")
    if status != 200 or not isinstance(body, dict):
        raise PhaseError(f"GET /count answered {status}")
    return int(body["live"])


async def wait_live(target: Target, wanted: int, timeout: float) -> None:
    """Poll ``GET /count`` until the app tracks exactly ``wanted`` connections."""
    deadline = time.monotonic() + timeout
    live = -1
    while time.monotonic() < deadline:
        live = await live_count(target)
        if live == wanted:
            return
        await asyncio.sleep(0.01)
    raise PhaseError(f"server still tracks {live} connections, expected {wanted}")


def _per(delta_ns: int, count: int, unit_ns: float) -> float:
    if count <= 0:
        raise PhaseError("no operation completed")
    return delta_ns / count / unit_ns


# -- churn: server CPU per connection -----------------------------------------------------


async def _churn(port: int, total: int, concurrency: int, timeout: float) -> tuple[int, int]:
    """Open, handshake and close ``total`` connections, ``concurrency`` at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    started = done = errors = 0

    async def worker() -> None:
        nonlocal started, done, errors
        while started < total and loop.time() < deadline:
            started += 1
            try:
                async with asyncio.timeout(10):
                    conn = await _open_one(port)
                    conn.start_close()
                    await conn.lost
                done += 1
            except (OSError, TimeoutError):
                errors += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return done, errors


async def _open_one(port: int) -> WSConn:
    return await open_ws(port, PATH)


async def phase_churn(target: Target, s: Settings) -> Metrics:
    await _churn(target.port, s.churn_warmup, s.churn_concurrency, s.phase_timeout)
    await wait_live(target, 0, s.settle_timeout)
    before = target.snap()
    done, errors = await _churn(
        target.port, s.churn_connections, s.churn_concurrency, s.phase_timeout
    )
    await wait_live(target, 0, s.settle_timeout)  # every teardown (disconnect hooks) is in
    after = target.snap()
    if errors > s.churn_connections // 100:
        raise PhaseError(f"{errors} of {s.churn_connections} connections failed")
    return {
        "conn_cpu_us": _per(after.server_ns - before.server_ns, done, 1e3),
        "conn_rate": done / ((after.wall_ns - before.wall_ns) / 1e9),
        "client_conn_cpu_us": _per(after.client_ns - before.client_ns, done, 1e3),
        "churn_errors": float(errors),
    }


# -- echo: server CPU per message -----------------------------------------------------------


class _Echoer:
    """Keeps one message in flight on every connection, answering from ``data_received``."""

    def __init__(self, frame: bytes, limit: int) -> None:
        self.frame = frame
        self.limit = limit
        self.count = 0
        self.running = True
        self.in_flight = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, conn: WSConn) -> None:
        self.count += 1
        if self.running and self.count < self.limit:
            conn.send(self.frame)
            return
        self.running = False
        self.in_flight -= 1
        if self.in_flight <= 0 and not self.finished.done():
            self.finished.set_result(None)


async def phase_echo(target: Target, s: Settings) -> Metrics:
    payload = ("0123456789abcdef" * (s.echo_bytes // 16 + 1))[: s.echo_bytes].encode()
    echoer = _Echoer(client_frame(OP_TEXT, payload), s.echo_limit)
    conns = await open_many(
        target.port,
        PATH,
        s.echo_connections,
        s.open_concurrency,
        echoer.on_message,
        s.phase_timeout,
    )
    try:
        await wait_live(target, len(conns), s.settle_timeout)
        echoer.in_flight = len(conns)
        for conn in conns:
            conn.send(echoer.frame)
        await asyncio.sleep(s.echo_warmup)
        count_before, before = echoer.count, target.snap()
        await asyncio.sleep(s.echo_seconds)
        count_after, after = echoer.count, target.snap()
        if not echoer.running:
            raise PhaseError(f"echo_limit ({s.echo_limit}) reached inside the measured window")
        echoer.running = False
        async with asyncio.timeout(s.settle_timeout):
            await echoer.finished
    finally:
        await close_all(conns, s.settle_timeout)
    await wait_live(target, 0, s.settle_timeout)
    echoes = count_after - count_before
    return {
        "echo_cpu_us": _per(after.server_ns - before.server_ns, echoes, 1e3),
        "echo_rate": echoes / ((after.wall_ns - before.wall_ns) / 1e9),
        "client_echo_cpu_us": _per(after.client_ns - before.client_ns, echoes, 1e3),
    }


# -- idle: RSS per open connection ------------------------------------------------------------


async def phase_idle(
    target: Target, s: Settings, probe: Callable[[str], Awaitable[None]] | None = None
) -> Metrics:
    """RSS growth per held-open connection; ``probe("before"/"after")`` runs where RSS is read
    (bench.profile takes tracemalloc snapshots there)."""

    def ignore(conn: WSConn) -> None:
        return None

    # Warm the code paths (imports, caches) so they are not charged to the connections.
    warm = await open_many(
        target.port, PATH, s.idle_warmup, s.open_concurrency, ignore, s.phase_timeout
    )
    await close_all(warm, s.settle_timeout)
    await wait_live(target, 0, s.settle_timeout)
    await asyncio.sleep(s.idle_settle)
    if probe is not None:
        await probe("before")
    before = rss_bytes(target.pids)
    conns = await open_many(
        target.port, PATH, s.idle_connections, s.open_concurrency, ignore, s.phase_timeout
    )
    try:
        await wait_live(target, len(conns), s.settle_timeout)
        await asyncio.sleep(s.idle_settle)
        after = rss_bytes(target.pids)
        if probe is not None:
            await probe("after")
    finally:
        await close_all(conns, s.settle_timeout)
    await wait_live(target, 0, s.settle_timeout)
    return {"idle_rss_kib": (after - before) / len(conns) / 1024}


# -- broadcast: one message to N connections ---------------------------------------------------


class _Receipts:
    def __init__(self) -> None:
        self.expected = 0
        self.count = 0
        self.last: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def reset(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last = asyncio.get_running_loop().create_future()

    def on_message(self, conn: WSConn) -> None:
        self.count += 1
        if self.count == self.expected:
            self.last.set_result(time.perf_counter_ns())


async def phase_broadcast(target: Target, s: Settings) -> Metrics:
    receipts = _Receipts()
    conns = await open_many(
        target.port,
        PATH,
        s.broadcast_connections,
        s.open_concurrency,
        receipts.on_message,
        s.phase_timeout,
    )
    n = len(conns)
    payload = ("broadcast-" * 4)[: s.echo_bytes].encode()
    walls: list[int] = []
    loops: list[int] = []
    try:
        await wait_live(target, n, s.settle_timeout)
        before = target.snap()
        for round_ in range(s.broadcast_warmup + s.broadcast_rounds):
            if round_ == s.broadcast_warmup:
                before = target.snap()
            receipts.reset(n)
            sent_at = time.perf_counter_ns()
            status, body = await target.http.request("POST", "/broadcast", payload)
            if status == 501:
                raise NotAvailable(str(body))
            if status != 200 or not isinstance(body, dict) or body.get("sent") != n:
                raise PhaseError(f"POST /broadcast answered {status} {body!r}, expected sent={n}")
            async with asyncio.timeout(s.settle_timeout):
                last = await receipts.last
            if round_ >= s.broadcast_warmup:
                walls.append(last - sent_at)
                loops.append(int(body["loop_ns"]))
            await asyncio.sleep(s.broadcast_gap)
        after = target.snap()
    finally:
        await close_all(conns, s.settle_timeout)
    await wait_live(target, 0, s.settle_timeout)
    rounds = len(walls)
    return {
        "bcast_wall_ms": _median(walls) / 1e6,
        "bcast_loop_ms": _median(loops) / 1e6,
        "bcast_cpu_ms": _per(after.server_ns - before.server_ns, rounds, 1e6),
    }


def _median(values: list[int]) -> float:
    if not values:
        raise PhaseError("no round completed")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
