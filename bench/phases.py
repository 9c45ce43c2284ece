"""The measured phases, run by the load client against every server variant at once.

All variants' servers run side by side; each phase alternates short slices of the same traffic
between them (A B B A A B ...), reading each server's CPU time from /proc at the edges of its own
slices. Other processes on this shared 2-core machine come and go on a scale of seconds, so
fine alternation makes them hit every variant alike, and the ratios stay meaningful even when
the absolute numbers move. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from .client import OP_TEXT, Http, WSConn, client_frame, close_all, open_many, open_ws
from .procs import cpu_ns, rss_bytes
from .settings import Settings

PATH = "/ws?name=bench-client"

Metrics = dict[str, float]
Probe = Callable[[str], Awaitable[None]]


class PhaseError(RuntimeError):
    """A phase could not produce its number (the server misbehaved or was too slow)."""


class NotAvailable(Exception):
    """The variant cannot do this (e.g. wsession without ``SessionManager.broadcast``)."""


@dataclass
class Snap:
    """CPU time of one server tree and of this client, and the wall clock, at one instant."""

    server_ns: int
    client_ns: int
    wall_ns: int


@dataclass
class Target:
    """One server under test: its port, its process ids and a control HTTP client."""

    port: int
    pids: list[int]
    http: Http

    def snap(self) -> Snap:
        return Snap(cpu_ns(self.pids), time.process_time_ns(), time.perf_counter_ns())


@dataclass
class Tally:
    """Operations and CPU time accumulated over one target's slices."""

    ops: int = 0
    server_ns: int = 0
    client_ns: int = 0
    wall_ns: int = 0
    errors: int = 0

    def add(self, before: Snap, after: Snap, ops: int) -> None:
        self.ops += ops
        self.server_ns += after.server_ns - before.server_ns
        self.client_ns += after.client_ns - before.client_ns
        self.wall_ns += after.wall_ns - before.wall_ns

    def per(self, what: str, unit_ns: float) -> float:
        if self.ops <= 0:
            raise PhaseError("no operation completed")
        value: int = getattr(self, what)
        return value / self.ops / unit_ns

    def rate(self) -> float:
        return self.ops / (self.wall_ns / 1e9) if self.wall_ns else 0.0


def alternate(count: int, slices: int) -> Iterator[int]:
    """Target indices for ``slices`` rounds, each round visiting every target once, in an
    order that reverses every round (ABBA...) so no target is always first after a pause."""
    order = list(range(count))
    for round_ in range(slices):
        yield from (order if round_ % 2 == 0 else reversed(order))


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


def _ignore(conn: WSConn) -> None:
    return None


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
                    conn = await open_ws(port, PATH)
                    conn.start_close()
                    await conn.lost
                done += 1
            except (OSError, TimeoutError):
                errors += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return done, errors


async def phase_churn(targets: list[Target], s: Settings) -> list[Metrics]:
    for target in targets:
        await _churn(target.port, s.churn_warmup, s.churn_concurrency, s.phase_timeout)
        await wait_live(target, 0, s.settle_timeout)
    tallies = [Tally() for _ in targets]
    slices = max(1, -(-s.churn_connections // s.churn_slice))
    for i in alternate(len(targets), slices):
        target, tally = targets[i], tallies[i]
        size = min(s.churn_slice, s.churn_connections - tally.ops - tally.errors)
        if size <= 0:
            continue
        before = target.snap()
        done, errors = await _churn(target.port, size, s.churn_concurrency, s.phase_timeout)
        await wait_live(target, 0, s.settle_timeout)  # every teardown (disconnect hooks) is in
        tally.add(before, target.snap(), done)
        tally.errors += errors
    results = []
    for tally in tallies:
        if tally.errors > s.churn_connections // 100:
            raise PhaseError(f"{tally.errors} of {s.churn_connections} connections failed")
        results.append(
            {
                "conn_cpu_us": tally.per("server_ns", 1e3),
                "conn_rate": tally.rate(),
                "client_conn_cpu_us": tally.per("client_ns", 1e3),
                "churn_errors": float(tally.errors),
            }
        )
    return results


# -- echo: server CPU per message -----------------------------------------------------------


class _Echoer:
    """Keeps one message in flight on every connection while running, answering from
    ``data_received``; ``stop()`` lets the in-flight messages land."""

    def __init__(self, frame: bytes, limit: int) -> None:
        self.frame = frame
        self.limit = limit
        self.count = 0
        self.running = False
        self.in_flight = 0
        self.idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle.set_result(None)

    def start(self, conns: list[WSConn]) -> None:
        self.running = True
        self.in_flight = len(conns)
        self.idle = asyncio.get_running_loop().create_future()
        for conn in conns:
            conn.send(self.frame)

    def on_message(self, conn: WSConn) -> None:
        self.count += 1
        if self.running and self.count < self.limit:
            conn.send(self.frame)
            return
        self.running = False
        self.in_flight -= 1
        if self.in_flight <= 0 and not self.idle.done():
            self.idle.set_result(None)


async def phase_echo(targets: list[Target], s: Settings) -> list[Metrics]:
    payload = ("0123456789abcdef" * (s.echo_bytes // 16 + 1))[: s.echo_bytes].encode()
    frame = client_frame(OP_TEXT, payload)
    echoers = [_Echoer(frame, s.echo_limit) for _ in targets]
    pools: list[list[WSConn]] = []
    try:
        for target, echoer in zip(targets, echoers, strict=True):
            pools.append(
                await open_many(
                    target.port,
                    PATH,
                    s.echo_connections,
                    s.open_concurrency,
                    echoer.on_message,
                    s.phase_timeout,
                )
            )
            await wait_live(target, s.echo_connections, s.settle_timeout)
        tallies = [Tally() for _ in targets]
        slices = max(1, round(s.echo_seconds / s.echo_slice))
        for i in alternate(len(targets), slices):
            target, echoer = targets[i], echoers[i]
            echoer.start(pools[i])
            await asyncio.sleep(s.echo_warmup)
            count, before = echoer.count, target.snap()
            await asyncio.sleep(s.echo_slice)
            after = target.snap()
            tallies[i].add(before, after, echoer.count - count)
            if not echoer.running:
                raise PhaseError(f"echo_limit ({s.echo_limit}) reached inside a measured slice")
            echoer.running = False
            async with asyncio.timeout(s.settle_timeout):
                await echoer.idle
    finally:
        for pool in pools:
            await close_all(pool, s.settle_timeout)
    for target in targets:
        await wait_live(target, 0, s.settle_timeout)
    return [
        {
            "echo_cpu_us": t.per("server_ns", 1e3),
            "echo_rate": t.rate(),
            "client_echo_cpu_us": t.per("client_ns", 1e3),
        }
        for t in tallies
    ]


# -- idle: RSS per open connection ------------------------------------------------------------


async def phase_idle(
    targets: list[Target], s: Settings, probe: Probe | None = None
) -> list[Metrics]:
    """RSS growth per held-open connection, one server at a time (memory does not suffer from
    other processes the way CPU time does). ``probe("before"/"after")`` runs where RSS is read
    (bench.profile takes tracemalloc snapshots there)."""
    results = []
    for target in targets:
        # Warm the code paths (imports, caches) so they are not charged to the connections.
        warm = await open_many(
            target.port, PATH, s.idle_warmup, s.open_concurrency, _ignore, s.phase_timeout
        )
        await close_all(warm, s.settle_timeout)
        await wait_live(target, 0, s.settle_timeout)
        await asyncio.sleep(s.idle_settle)
        if probe is not None:
            await probe("before")
        before = rss_bytes(target.pids)
        conns = await open_many(
            target.port, PATH, s.idle_connections, s.open_concurrency, _ignore, s.phase_timeout
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
        results.append({"idle_rss_kib": (after - before) / len(conns) / 1024})
    return results


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


async def phase_broadcast(targets: list[Target], s: Settings) -> list[Metrics | NotAvailable]:
    """Trigger ``POST /broadcast`` and time it to the last of N receipts; rounds alternate
    between the servers. A variant answering 501 is reported as not available."""
    payload = ("broadcast-" * 4)[: s.echo_bytes].encode()
    receipts = [_Receipts() for _ in targets]
    pools: list[list[WSConn]] = []
    outcome: list[Metrics | NotAvailable] = [{} for _ in targets]
    walls: list[list[int]] = [[] for _ in targets]
    loops: list[list[int]] = [[] for _ in targets]
    tallies = [Tally() for _ in targets]
    try:
        for target, receipt in zip(targets, receipts, strict=True):
            pools.append(
                await open_many(
                    target.port,
                    PATH,
                    s.broadcast_connections,
                    s.open_concurrency,
                    receipt.on_message,
                    s.phase_timeout,
                )
            )
            await wait_live(target, s.broadcast_connections, s.settle_timeout)
        n = s.broadcast_connections
        rounds = s.broadcast_warmup + s.broadcast_rounds
        done = [0 for _ in targets]
        for i in alternate(len(targets), rounds):
            if isinstance(outcome[i], NotAvailable):
                continue
            target, receipt = targets[i], receipts[i]
            receipt.reset(n)
            before = target.snap()
            status, body = await target.http.request("POST", "/broadcast", payload)
            if status == 501:
                outcome[i] = NotAvailable(str(body))
                continue
            if status != 200 or not isinstance(body, dict) or body.get("sent") != n:
                raise PhaseError(f"POST /broadcast answered {status} {body!r}, expected sent={n}")
            async with asyncio.timeout(s.settle_timeout):
                last = await receipt.last
            after = target.snap()
            if done[i] >= s.broadcast_warmup:
                walls[i].append(last - before.wall_ns)
                loops[i].append(int(body["loop_ns"]))
                tallies[i].add(before, after, 1)
            done[i] += 1
            await asyncio.sleep(s.broadcast_gap)
    finally:
        for pool in pools:
            await close_all(pool, s.settle_timeout)
    for target in targets:
        await wait_live(target, 0, s.settle_timeout)
    for i, tally in enumerate(tallies):
        if not isinstance(outcome[i], NotAvailable):
            outcome[i] = {
                "bcast_wall_ms": _median(walls[i]) / 1e6,
                "bcast_loop_ms": _median(loops[i]) / 1e6,
                "bcast_cpu_ms": tally.per("server_ns", 1e6),
            }
    return outcome


def _median(values: list[int]) -> float:
    if not values:
        raise PhaseError("no round completed")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
