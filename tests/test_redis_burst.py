"""A burst of Redis calls is load, not an outage (issue 17).

A reconnect burst (a thousand handshakes at once on one worker) keeps every pooled connection
busy for longer than ``command_timeout`` while Redis answers each call quickly. The worker must
not take that for Redis being down (no outage, no resync, no session written "locally only"),
its lease must keep being renewed (so no other worker declares it lost), and every call must
still get through. A Redis that really hangs under such a burst must still hold no call for
longer than ``command_timeout``.

The burst is made deterministic by latency, not by timing the test: every reply from Redis
reaches the worker ``LATENCY`` seconds late (a slow network; Redis answers every call), and the
worker has ``max_connections=2``, so ``BURST`` calls take ``BURST / 2 * LATENCY`` seconds in
all, far longer than ``command_timeout`` and than the lease, while no single call comes close
to ``command_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import monotonic
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from wsession import RegistryUnavailable, SessionManager
from wsession.backends._redis_link import CallGate
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisClusterServer, RedisServer
from .test_redis_healing import Recorder, live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]

LATENCY = 0.02  # seconds each reply from Redis is late
# 25 times one round trip: no single call comes close. The slowest call makes about six round
# trips (one on a new connection: CLIENT SETINFO, NOSCRIPT, SCRIPT LOAD...): with 0.04 s of
# latency and a 0.3 s deadline those took 0.25 s, and on a busy CI machine more.
COMMAND_TIMEOUT = 0.5
HEARTBEAT = 0.2  # lease_ttl 1.0
BURST = 160  # registrations at once: about 160 / 2 * LATENCY = 1.6 s of queueing
QUERIES = 8  # cluster queries in the same burst


class SlowProxy:
    """A loopback TCP proxy in front of Redis that forwards each reply ``latency`` seconds
    late (in order, per connection): a slow network, not a hung Redis."""

    def __init__(self, target_port: int, latency: float) -> None:
        self.target_port = target_port
        self.latency = latency
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, 0.0), self._pipe(up_reader, writer, self.latency)
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)  # the network's latency, not synchronisation
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


@asynccontextmanager
async def slow_proxy(server: RedisServer, latency: float = LATENCY) -> AsyncIterator[SlowProxy]:
    proxy = SlowProxy(server.port, latency)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


class SlowConnection(Connection):
    """A redis-py connection whose replies come ``latency`` seconds late (the cluster's slow
    network: its client follows redirections to every node, so a proxy cannot stand in). Set
    once the registry is entered: a cluster client's start-up takes many round trips."""

    latency = 0.0

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self.latency:
            await asyncio.sleep(self.latency)  # the network's latency, not synchronisation
        return await super().read_response(*args, **kwargs)


def slow_cluster_client(cluster: RedisClusterServer) -> Any:
    """A cluster client whose every connection is a :class:`SlowConnection` (redis-py takes no
    ``connection_class`` for a cluster: set it where its nodes are made, before any is)."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    client.nodes_manager.connection_kwargs["connection_class"] = SlowConnection
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = SlowConnection
    return client


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    words = ("unavailable", "locally only", "declared lost", "reachable again")
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("wsession") and any(w in r.getMessage() for w in words)
    ]


async def run_burst(
    manager: SessionManager, lease: Any, tokens: set[str]
) -> tuple[float, list[Any]]:
    """``BURST`` registrations and ``QUERIES`` counts at once; meanwhile, the lease tokens seen
    (each renewal writes a new one). Returns how long the burst took and its results."""
    registry = manager.registry
    started = monotonic()
    burst = asyncio.gather(
        *(registry.add(live_session(manager, f"burst-{i}")) for i in range(BURST)),
        *(manager.count() for _ in range(QUERIES)),
        return_exceptions=True,
    )
    while not burst.done():  # bounded by the per-test timeout; polls another client's view
        token = await lease()
        if token is not None:
            tokens.add(token)
        await asyncio.sleep(0.02)
    results = await burst
    return monotonic() - started, results


async def check_burst_is_load(
    a: SessionManager,
    b: SessionManager,
    lease: Any,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Runs the burst on A and checks it was load, not an outage, as B and Redis see it."""
    registry = a.registry
    assert isinstance(registry, RedisRegistry)
    node = registry.node_id
    tokens: set[str] = set()
    took, results = await run_burst(a, lease, tokens)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert outage_warnings(caplog) == []
    assert registry.state is LinkState.AVAILABLE
    assert registry.node_id == node
    # The burst outlasted the lease: a renewal stuck behind it would have lapsed.
    assert took > registry.lease_ttl, took
    # Every session was in Redis when its add returned: B sees them all now.
    assert await b.count() == BURST + 1
    # Renewed all along (every heartbeat / 2): far more than one token per lease.
    assert len(tokens) >= 2 * took / registry.lease_ttl, (len(tokens), took)
    # B judged A every heartbeat / 2 during the burst: no hook ran for A's sessions there.
    assert recorder.node_lost() == []


async def test_a_burst_that_fills_the_pool_is_load_not_an_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A (behind a slow network, two connections) registers 160 sessions at once and
    counts 8 times; worker B watches. A stays available, writes every session before ``add``
    returns, keeps renewing its lease, and B never declares it lost."""
    caplog.set_level(logging.WARNING, logger="wsession")
    prefix = f"burst-{secrets.token_hex(4)}"
    recorder = Recorder()
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    async with slow_proxy(redis_server) as proxy:
        registry = RedisRegistry(
            proxy.url,
            prefix=prefix,
            heartbeat=HEARTBEAT,
            max_connections=2,
            command_timeout=COMMAND_TIMEOUT,
        )
        a = SessionManager(registry=registry, drain_on_signal=False)
        b = SessionManager(
            registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
            drain_on_signal=False,
        )
        recorder.install(a, "a")
        recorder.install(b, "b")
        try:
            async with a, b:
                node = registry.node_id
                await registry.add(live_session(a, "before"))
                assert registry.state is LinkState.AVAILABLE
                caplog.clear()

                async def lease() -> Any:
                    return await direct.get(f"{prefix}:lease:{node}")

                await check_burst_is_load(a, b, lease, recorder, caplog)
                assert await direct.exists(f"{prefix}:dead:{node}") == 0
                assert await a.count() == BURST + 1
        finally:
            await direct.aclose()


async def test_a_hung_redis_under_a_burst_holds_no_call_longer_than_command_timeout(
    own_redis_server: RedisServer,
) -> None:
    """Calls waiting for a connection behind calls that Redis does not answer (SIGSTOP) end
    with the outage, within ``command_timeout`` of the wait: they do not each wait their
    turn to time out (20 calls on 2 connections would take 10 x ``command_timeout``)."""
    prefix = f"burst-hang-{secrets.token_hex(4)}"
    registry = RedisRegistry(
        own_redis_server.url, prefix=prefix, heartbeat=0.5, command_timeout=0.5, max_connections=2
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    async with manager:
        assert own_redis_server.proc is not None
        own_redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = monotonic()
            await asyncio.gather(*(registry.add(live_session(manager, f"s{i}")) for i in range(20)))
            took = monotonic() - started
            assert registry.state is LinkState.OUTAGE
            with pytest.raises(RegistryUnavailable):
                await manager.count()
        finally:
            own_redis_server.proc.send_signal(signal.SIGCONT)
        assert took < 1.5, took  # command_timeout (0.5) plus scheduling slack

        async def all_written_back() -> bool:
            try:
                return await manager.count() == 20
            except RegistryUnavailable:
                return False

        await wait_for(all_written_back, 15, "the 20 sessions to be written back")


async def test_a_hung_redis_under_a_burst_of_resumes_holds_none_longer_than_command_timeout(
    own_redis_server: RedisServer,
) -> None:
    """The same for resumes, parks and the other steps of the Redis journal, which queue
    behind a gate of their own (a quarter of max_connections) before the registry's: when the
    first step fails, those waiting there fail at once too, instead of each reaching Redis in
    turn to time out there (8 resumes through a gate of 1 would take 8 x command_timeout)."""
    prefix = f"burst-resume-hang-{secrets.token_hex(4)}"
    registry = RedisRegistry(
        own_redis_server.url, prefix=prefix, heartbeat=0.5, command_timeout=0.5, max_connections=4
    )
    manager = SessionManager(
        registry=registry, drain_on_signal=False, resume_window=30, resume_secret="s" * 32
    )
    async with manager:
        journal = registry.resume_store()
        assert own_redis_server.proc is not None
        own_redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            started = monotonic()
            results = await asyncio.gather(
                *(journal.claim(f"s{i}", f"token-{i}", 0, f"new-{i}") for i in range(8)),
                return_exceptions=True,
            )
            took = monotonic() - started
            assert registry.state is LinkState.OUTAGE
        finally:
            own_redis_server.proc.send_signal(signal.SIGCONT)
        assert [type(r) for r in results] == [RegistryUnavailable] * 8
        assert took < 1.5, took  # command_timeout (0.5) plus scheduling slack


async def test_a_burst_on_a_cluster_is_load_not_an_outage(
    redis_cluster: RedisClusterServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The same burst on a Redis Cluster, where the registry itself caps the calls in flight
    (``max_connections``): no outage, every session written, the lease renewed throughout."""
    caplog.set_level(logging.WARNING, logger="wsession")
    prefix = f"burst-{secrets.token_hex(4)}"
    recorder = Recorder()
    slow = slow_cluster_client(redis_cluster)
    direct = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    registry = RedisRegistry(
        client=slow,
        prefix=prefix,
        heartbeat=HEARTBEAT,
        max_connections=2,
        command_timeout=COMMAND_TIMEOUT,
    )
    a = SessionManager(registry=registry, drain_on_signal=False)
    b = SessionManager(
        registry=RedisRegistry(redis_cluster.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
    )
    recorder.install(a, "a")
    recorder.install(b, "b")
    try:
        async with a, b:
            node = registry.node_id
            await registry.add(live_session(a, "before"))
            assert registry.state is LinkState.AVAILABLE
            caplog.clear()
            SlowConnection.latency = LATENCY

            async def lease() -> Any:
                return await direct.get(f"{{{prefix}}}:lease:{node}")

            await check_burst_is_load(a, b, lease, recorder, caplog)
            assert await direct.exists(f"{{{prefix}}}:dead:{node}") == 0
    finally:
        SlowConnection.latency = 0.0
        await slow.aclose()
        await direct.aclose()


# -- the gate itself (no Redis) ---------------------------------------------------------------


async def test_the_call_gate_serves_in_order_and_lets_a_holder_call_again() -> None:
    gate = CallGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def call(name: str) -> None:
        async with gate.slot():
            order.append(name)
            async with gate.slot():  # a call within a call: its own slot, no wait
                order.append(f"{name} again")
            if name == "first":
                await release.wait()

    first = asyncio.create_task(call("first"))
    await asyncio.sleep(0)  # let it take the slot
    others = [asyncio.create_task(call(n)) for n in ("second", "third")]
    await asyncio.sleep(0)
    assert gate.waiting == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 5)
    assert order == ["first", "first again", "second", "second again", "third", "third again"]
    async with gate.slot():  # the slot came back
        assert gate.held()
    assert not gate.held()


async def test_a_waiter_cancelled_as_it_is_handed_the_slot_passes_it_on() -> None:
    gate = CallGate(1)
    got: list[str] = []

    async def call(name: str) -> None:
        async with gate.slot():
            got.append(name)

    async with gate.slot():
        second = asyncio.create_task(call("second"))
        third = asyncio.create_task(call("third"))
        await asyncio.sleep(0)
        assert gate.waiting == 2
    second.cancel()  # handed the slot on leaving the block, cancelled before it ran
    await asyncio.wait_for(asyncio.gather(second, third, return_exceptions=True), 5)
    assert got == ["third"]
    async with asyncio.timeout(5), gate.slot():  # and the slot is free again
        pass


async def test_refused_waiting_fails_the_waiters_at_once_until_allowed_again() -> None:
    gate = CallGate(1)

    async def call() -> None:
        async with gate.slot():
            pass

    async with gate.slot():
        waiter = asyncio.create_task(call())
        await asyncio.sleep(0)
        gate.refuse_waiting(lambda: ConnectionRefusedError("down"))
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(waiter, 5)
        with pytest.raises(ConnectionRefusedError):  # no free slot: fails without waiting
            await asyncio.wait_for(call(), 5)
        gate.allow_waiting()
        waiter = asyncio.create_task(call())
        await asyncio.sleep(0)
        assert gate.waiting == 1
    await asyncio.wait_for(waiter, 5)
    gate.refuse_waiting(lambda: ConnectionRefusedError("down"))
    await asyncio.wait_for(call(), 5)  # a free slot is taken even then
