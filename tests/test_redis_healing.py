"""Healing must never take a live worker for a dead one.

Two ways the cluster could heal the wrong worker, each checked on a real redis-server:

- the worker that heals a dead one runs the lost sessions' disconnect hooks; slow hooks must not
  stop its own heartbeat (else its lease lapses and a third worker "heals" it too);
- when every worker loses Redis for longer than the lease while Redis keeps running (a network
  partition, not a restart), the leases expire in Redis; when the network returns, no worker may
  end the others' live sessions as ``node lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from example_app.procs import free_port, start_worker, stop, wait_for_port
from wsession import EndReason, RegistryUnavailable, Session, SessionManager
from wsession.backends.redis import RedisRegistry

from .redis_support import RedisServer
from .support import open_session, read_until_closed

pytestmark = [pytest.mark.anyio, pytest.mark.redis]
HEARTBEAT = 0.2


def live_session(manager: SessionManager, session_id: str) -> Session:
    """An open session whose frames go nowhere: enough for the registry, no server needed."""

    async def send(message: Any) -> None:
        return None

    return open_session(session_id, send, manager.new_data())


class Recorder:
    """Disconnect hooks that take ``delay`` seconds each and record which worker ran them."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str, EndReason | None]] = []

    def install(self, manager: SessionManager, worker: str, delay: float = 0.0) -> None:
        async def slow_hook(session: Session) -> None:
            await asyncio.sleep(delay)  # the hook's own work, not synchronisation
            self.ended.append((worker, session.id, session.end_reason))

        manager.on_disconnect(slow_hook)

    def node_lost(self) -> list[str]:
        return [sid for _, sid, reason in self.ended if reason is EndReason.NODE_LOST]


def manager_on(url: str, prefix: str) -> SessionManager:
    return SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=HEARTBEAT), drain_on_signal=False
    )


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll an async ``condition()`` until it is true (bounded by ``timeout``)."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():  # noqa: ASYNC110 (state of other workers / Redis)
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def open_clients(port: int, count: int) -> list[ClientConnection]:
    """``count`` clients of the example worker on ``port``, each past its welcome."""
    clients = []
    for i in range(count):
        ws = await connect(f"ws://127.0.0.1:{port}/ws?name=a{i}")
        await ws.recv()
        clients.append(ws)
    return clients


async def cluster_count(manager: SessionManager) -> int | None:
    try:
        return await manager.count()
    except RegistryUnavailable:
        return None


@pytest.mark.timeout(60)
async def test_slow_node_lost_hooks_do_not_get_the_healer_healed(
    redis_server: RedisServer,
) -> None:
    """B heals the killed worker A with hooks that take 0.15 s each (1.5 s in all, five leases
    of B). C starts while B runs them: it must find B's lease renewed, not lapsed."""
    prefix = f"heal-{secrets.token_hex(4)}"
    lost_count = 10
    recorder = Recorder()
    port = free_port()
    env = {
        **os.environ,
        "WSESSION_REDIS_URL": redis_server.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": str(HEARTBEAT),
    }
    worker = start_worker(port, env)
    clients: list[ClientConnection] = []
    b, c = manager_on(redis_server.url, prefix), manager_on(redis_server.url, prefix)
    recorder.install(b, "b", delay=0.15)
    recorder.install(c, "c")
    try:
        wait_for_port(port, worker, "example worker", timeout=20)
        async with b:
            await b.registry.add(live_session(b, "b-live"))
            for i in range(lost_count):
                ws = await connect(f"ws://127.0.0.1:{port}/ws?name=a{i}")
                await ws.recv()  # welcome: registered cluster-wide
                clients.append(ws)

            async def everyone_listed() -> bool:
                return await b.count() == lost_count + 1

            await wait_for(everyone_listed, 10, "all sessions listed")
            worker.send_signal(signal.SIGKILL)
            worker.wait()

            async def claimed_by_b() -> bool:
                return await b.count() == 1

            await wait_for(claimed_by_b, 10, "B to claim the killed worker's sessions")
            assert len(recorder.node_lost()) < lost_count, "hooks finished too soon to check"
            async with c:  # C's first look at the cluster happens while B runs the hooks
                await c.registry.add(live_session(c, "c-live"))

                async def hooks_done() -> bool:
                    return len(recorder.node_lost()) >= lost_count

                await wait_for(hooks_done, 20, "the node-lost hooks of the killed worker")
                lost = recorder.node_lost()
                assert len(set(lost)) == len(lost) == lost_count  # once each
                assert {w for w, _, _ in recorder.ended} == {"b"}
                assert "b-live" not in lost
                for manager in (b, c):
                    listed = {s.id for s in await manager.sessions()}
                    assert listed == {"b-live", "c-live"}, listed
    finally:
        for ws in clients:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        stop(worker)


class Proxy:
    """A loopback TCP proxy in front of Redis that can cut every connection (a partition)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_off = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()

    def heal(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@asynccontextmanager
async def proxied(redis_server: RedisServer) -> AsyncIterator[Proxy]:
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.mark.timeout(60)
async def test_a_partition_longer_than_the_lease_ends_no_live_session(
    redis_server: RedisServer,
) -> None:
    prefix = f"partition-{secrets.token_hex(4)}"
    recorder = Recorder()
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    async with proxied(redis_server) as proxy:
        a, b = manager_on(proxy.url, prefix), manager_on(proxy.url, prefix)
        recorder.install(a, "a")
        recorder.install(b, "b")
        async with a, b:
            await a.registry.add(live_session(a, "a-live"))
            await b.registry.add(live_session(b, "b-live"))

            async def both_listed() -> bool:
                return await cluster_count(a) == await cluster_count(b) == 2

            await wait_for(both_listed, 10, "both sessions listed")
            proxy.cut()  # Redis keeps running: the leases expire there

            async def leases_expired() -> bool:
                return not await direct.keys(f"{prefix}:lease:*")

            await wait_for(leases_expired, 10, "the leases to expire in Redis")
            proxy.heal()
            await wait_for(both_listed, 15, "both workers back, both sessions listed")

            # Each worker has renewed its lease at least twice since: it ran its dead-worker
            # check after the other was back, so a wrong verdict would have shown by now.
            renewals = {n: 0 for n in (a.registry.node_id, b.registry.node_id)}  # type: ignore[attr-defined]
            last_ttl: dict[str, int] = {}

            async def renewed_twice() -> bool:
                for node in renewals:
                    ttl = int(await direct.pttl(f"{prefix}:lease:{node}"))
                    if ttl > last_ttl.get(node, 1 << 30):
                        renewals[node] += 1
                    last_ttl[node] = ttl
                return min(renewals.values()) >= 2

            await wait_for(renewed_twice, 10, "two lease renewals of each worker")
            assert recorder.node_lost() == []
            assert await cluster_count(a) == await cluster_count(b) == 2
            for manager in (a, b):
                assert {s.id for s in await manager.sessions()} == {"a-live", "b-live"}
    await direct.aclose()


@pytest.mark.timeout(60)
async def test_a_stalled_worker_declared_lost_closes_those_sessions_and_rejoins(
    redis_server: RedisServer,
) -> None:
    """SIGSTOP freezes worker A past its lease (its sockets stay open: only the lease tells).
    B ends A's sessions as node lost, once. When A resumes it must not bring them back: it
    closes them with 1012, and new connections to A are listed by the cluster again."""
    prefix = f"stall-{secrets.token_hex(4)}"
    recorder = Recorder()
    port = free_port()
    env = {
        **os.environ,
        "WSESSION_REDIS_URL": redis_server.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": str(HEARTBEAT),
    }
    worker = start_worker(port, env)
    clients: list[ClientConnection] = []
    b = manager_on(redis_server.url, prefix)
    recorder.install(b, "b")
    try:
        wait_for_port(port, worker, "example worker", timeout=20)
        async with b:
            clients += await open_clients(port, 3)
            stalled_ids = {s.id for s in await b.sessions()}
            assert len(stalled_ids) == 3
            worker.send_signal(signal.SIGSTOP)
            try:

                async def healed() -> bool:
                    return len(recorder.node_lost()) >= 3

                await wait_for(healed, 15, "B to end the stalled worker's sessions")
            finally:
                worker.send_signal(signal.SIGCONT)
            assert sorted(recorder.node_lost()) == sorted(stalled_ids)
            assert await b.count() == 0
            for ws in clients:
                closed = await read_until_closed(ws)
                assert closed is not None and closed.code == 1012, closed
            fresh = await connect(f"ws://127.0.0.1:{port}/ws?name=again")
            clients.append(fresh)
            fresh_id = json.loads(await fresh.recv())["id"]

            async def fresh_listed() -> bool:
                return {s.id for s in await b.sessions()} == {fresh_id}

            await wait_for(fresh_listed, 10, "the new connection on A to be listed")
            assert sorted(recorder.node_lost()) == sorted(stalled_ids)  # still once each
    finally:
        for ws in clients:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        if worker.poll() is None:
            worker.send_signal(signal.SIGCONT)
        stop(worker)


@pytest.mark.timeout(60)
async def test_a_connection_right_after_a_redis_restart_does_not_get_its_worker_healed(
    own_redis_server: RedisServer,
) -> None:
    """Redis restarts empty. B (slow heartbeat: its next renewal is seconds away) registers a new
    connection at once; A (fast heartbeat) looks at the cluster first. B must not look dead to
    A. Two defences, each enough here: a registration takes a lease before it makes its worker
    known, and a worker that finds its own lease gone waits one lease before judging others."""
    prefix = f"restart-{secrets.token_hex(4)}"
    url = own_redis_server.url
    recorder = Recorder()
    a = manager_on(url, prefix)
    b = SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=5.0), drain_on_signal=False
    )
    recorder.install(a, "a")
    recorder.install(b, "b")
    async with a, b:
        await a.registry.add(live_session(a, "a-live"))
        own_redis_server.restart()  # empty again: no persistence
        await b.registry.add(live_session(b, "b-new"))
        direct = Redis.from_url(url, decode_responses=True)
        try:
            renewals, last_ttl = 0, 1 << 30

            async def a_renewed_three_times() -> bool:
                nonlocal renewals, last_ttl
                ttl = int(await direct.pttl(f"{prefix}:lease:{a.registry.node_id}"))  # type: ignore[attr-defined]
                if ttl > last_ttl:
                    renewals += 1
                last_ttl = ttl
                return renewals >= 3

            await wait_for(a_renewed_three_times, 10, "three lease renewals of A")
        finally:
            await direct.aclose()

        async def both_listed() -> bool:
            return await cluster_count(a) == 2

        await wait_for(both_listed, 10, "A's session written back")
        assert recorder.node_lost() == []
        assert {s.id for s in await a.sessions()} == {"a-live", "b-new"}


@pytest.mark.timeout(60)
async def test_a_stalled_worker_with_resumption_leaves_its_sessions_detached_hooks_once(
    redis_server: RedisServer,
) -> None:
    """With resumption on both sides, the survivor turns a stalled worker's sessions into
    detached ones (detach hooks there, no disconnect hook); when the stalled worker wakes up
    it closes them with 1012 but runs no hook for them (they are the cluster's now), and
    their clients can resume them."""
    prefix = f"stall-{secrets.token_hex(4)}"
    recorder = Recorder()
    detached_here: list[str] = []
    port = free_port()
    env = {
        **os.environ,
        "WSESSION_REDIS_URL": redis_server.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": str(HEARTBEAT),
        "WSESSION_RESUME_SECRET": "s" * 32,
    }
    worker = start_worker(port, env)
    clients: list[ClientConnection] = []
    b = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
        resume_window=30,
        resume_secret="s" * 32,
    )
    recorder.install(b, "b")
    b.on_detach(lambda session: detached_here.append(session.id))
    try:
        wait_for_port(port, worker, "example worker", timeout=20)
        async with b:
            clients += await open_clients(port, 3)
            stalled_ids = {s.id for s in await b.sessions()}
            worker.send_signal(signal.SIGSTOP)
            try:

                async def healed() -> bool:
                    return len(detached_here) >= 3

                await wait_for(healed, 15, "B to detach the stalled worker's sessions")
            finally:
                worker.send_signal(signal.SIGCONT)
            assert sorted(detached_here) == sorted(stalled_ids)
            assert await b.count_detached() == 3
            for ws in clients:
                closed = await read_until_closed(ws)
                assert closed is not None and closed.code == 1012, closed
            # Worker A runs no disconnect hook for them (its /api/stats counts the endings),
            # and they are still detached, waiting for their clients.
            import httpx

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def settled() -> bool:
                    stats = (await http.get("/api/stats")).json()
                    return bool(stats["live"] == 0)

                await wait_for(settled, 10, "worker A to let its sessions go")
                stats = (await http.get("/api/stats")).json()
            assert stats["disconnected_total"] == 0, stats
            assert await b.count_detached() == 3
            assert recorder.ended == []
    finally:
        for ws in clients:
            with contextlib.suppress(Exception):
                await ws.close()
        stop(worker)
