"""The heartbeat renews the lease whatever else it has to do.

Two pieces of work used to run inside the heartbeat task, between two lease renewals, so a
worker whose Redis and event loop were fine could still let its lease lapse, and be declared
lost by the others (its live sessions ended as ``node lost`` there, closed with 1012 here):

- the disconnect hooks of the detached sessions its sweep ended (resumption: their window ran
  out and the worker that parked them is gone): a slow hook held the next renewal;
- after an outage, writing this worker's sessions back, one round trip each: thousands of them
  on a slow link outlast the lease.

Each test watches the lease from another client while the slow work runs, and checks what a
user relies on: no other worker declares this one lost, every hook runs exactly once (also when
the registry exits meanwhile), nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from example_app.procs import free_port, start_worker, stop, wait_for_port
from wsession import EndReason, RegistryUnavailable, Session, SessionManager
from wsession.backends import redis as redis_backend
from wsession.backends._redis_endings import Endings
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisServer
from .test_redis_burst import SlowProxy, slow_proxy
from .test_redis_healing import Recorder, live_session, manager_on, open_clients, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]

HEARTBEAT = 0.2  # lease_ttl 1.0
WINDOW = 0.1  # resume window of the parked sessions
SECRET = "s" * 32


def resumable_worker(url: str, prefix: str, **settings: Any) -> SessionManager:
    return SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=HEARTBEAT),
        resume_window=WINDOW,
        resume_secret=SECRET,
        drain_on_signal=False,
        **settings,
    )


async def park_and_leave(url: str, prefix: str, ids: list[str]) -> None:
    """A worker registers sessions, parks them in Redis (their connections ended resumably),
    then goes away without ending them (as after a drain whose process then exited): only
    another worker's sweep ends them, once their window and the sweep's grace are over."""
    parker = resumable_worker(url, prefix)
    registry = parker.registry
    assert isinstance(registry, RedisRegistry)
    async with registry:
        journal = registry.resume_store()
        for session_id in ids:
            session = live_session(parker, session_id)
            await registry.add(session)
            assert await journal.park(session, f"token-{session_id}", WINDOW, None) is not None


class BlockingHooks:
    """A disconnect hook that waits for :attr:`release` (a slow database, say)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.ended: list[tuple[str, EndReason | None]] = []

    def install(self, manager: SessionManager) -> None:
        async def hook(session: Session) -> None:
            self.started.set()
            await self.release.wait()
            self.ended.append((session.id, session.end_reason))

        manager.on_disconnect(hook)


async def watch_lease(direct: Any, prefix: str, node: str, seconds: float) -> set[str]:
    """The lease tokens of ``node`` seen over ``seconds`` (each renewal writes a new one);
    fails as soon as the lease is missing or the node has a tombstone."""
    tokens: set[str] = set()
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:  # a span of time is what is watched here
        token = await direct.get(f"{prefix}:lease:{node}")
        assert token is not None, "the lease lapsed"
        assert not await direct.exists(f"{prefix}:dead:{node}"), "declared lost"
        tokens.add(token)
        await asyncio.sleep(0.02)
    return tokens


async def test_slow_hooks_of_swept_sessions_do_not_let_the_lease_lapse(
    redis_server: RedisServer,
) -> None:
    """A's sweep ends three orphaned detached sessions whose disconnect hook blocks for 2.5
    leases. A keeps renewing its lease, B never declares it lost (A's live session is not
    ended as node lost), and each hook runs once when released."""
    prefix = f"sweep-{secrets.token_hex(4)}"
    orphans = ["o1", "o2", "o3"]
    await park_and_leave(redis_server.url, prefix, orphans)
    a = resumable_worker(redis_server.url, prefix, disconnect_timeout=30)
    hooks = BlockingHooks()
    hooks.install(a)
    b = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
    )
    recorder = Recorder()
    recorder.install(b, "b")
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with a, b:
            registry = a.registry
            assert isinstance(registry, RedisRegistry)
            node = registry.node_id
            await registry.add(live_session(a, "a-live"))
            async with asyncio.timeout(10):
                await hooks.started.wait()  # A's sweep took them; their hooks block
            tokens = await watch_lease(direct, prefix, node, 2.5 * registry.lease_ttl)
            assert len(tokens) >= 5, tokens  # renewed every heartbeat / 2 meanwhile
            assert hooks.ended == []
            hooks.release.set()

            async def all_ended() -> bool:
                return len(hooks.ended) >= len(orphans)

            await wait_for(all_ended, 10, "the swept sessions' hooks")
            assert sorted(hooks.ended) == [(i, EndReason.RESUME_EXPIRED) for i in orphans]
            assert recorder.node_lost() == []
            assert registry.node_id == node
            assert registry.state is LinkState.AVAILABLE
            assert [s.id for s in await b.sessions()] == ["a-live"]
        assert sorted(hooks.ended) == [(i, EndReason.RESUME_EXPIRED) for i in orphans]  # once
    finally:
        await direct.aclose()


async def test_exit_while_swept_sessions_end_runs_every_hook_once(
    redis_server: RedisServer,
) -> None:
    """More swept sessions than run at once, their hooks blocked, when the worker exits: the
    exit waits for them (within drain_timeout), and every hook runs exactly once."""
    prefix = f"sweep-exit-{secrets.token_hex(4)}"
    orphans = [f"o{i:02}" for i in range(20)]
    await park_and_leave(redis_server.url, prefix, orphans)
    a = resumable_worker(redis_server.url, prefix, disconnect_timeout=30, drain_timeout=20)
    hooks = BlockingHooks()
    hooks.install(a)
    await a.__aenter__()
    exiting: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(10):
            await hooks.started.wait()

        async def all_swept() -> bool:
            # (Their windows end a few ms apart: one sweep may take only the first of them,
            # and those a sweep has not taken when the worker exits stay for another worker.)
            return await a.count_detached() == 0

        await wait_for(all_swept, 10, "the sweep to take every orphan")
        exiting = asyncio.create_task(a.__aexit__(None, None, None))
        done, _ = await asyncio.wait([exiting], timeout=0.5)
        assert not done, "the registry exited with hooks still running"
        hooks.release.set()
        async with asyncio.timeout(20):
            await exiting
        assert sorted(hooks.ended) == [(i, EndReason.RESUME_EXPIRED) for i in orphans]
    finally:
        hooks.release.set()
        if exiting is None:
            await a.__aexit__(None, None, None)


async def test_exit_while_a_lost_workers_hooks_run_runs_each_once(
    redis_server: RedisServer,
) -> None:
    """B claims the 40 sessions of a killed worker, whose node-lost hooks take 0.2 s each, and
    exits at once with drain_timeout=0.5: the exit runs every hook exactly once (none cut off
    when the deadline passes)."""
    prefix = f"heal-exit-{secrets.token_hex(4)}"
    count = 40
    recorder = Recorder()
    port = free_port()
    env = {
        **os.environ,
        "WSESSION_REDIS_URL": redis_server.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": str(HEARTBEAT),
    }
    worker = start_worker(port, env)
    clients: list[Any] = []
    b = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
        drain_timeout=0.5,
    )
    recorder.install(b, "b", delay=0.2)
    try:
        wait_for_port(port, worker, "example worker", timeout=20)
        await b.__aenter__()
        try:
            clients = await open_clients(port, count)

            async def everyone_listed() -> bool:
                return await b.count() == count

            await wait_for(everyone_listed, 10, "all sessions listed")
            worker.send_signal(signal.SIGKILL)
            worker.wait()

            async def claimed_by_b() -> bool:
                return await b.count() == 0

            await wait_for(claimed_by_b, 10, "B to claim the killed worker's sessions")
        finally:
            await b.__aexit__(None, None, None)
        lost = recorder.node_lost()
        assert len(lost) == len(set(lost)) == count, (len(lost), len(set(lost)))
    finally:
        for ws in clients:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        stop(worker)


SESSIONS = 200  # written back after the outage: 200 round trips of 40 ms each, one by one
LEASE_TTL = 2.0  # longer than the outage itself (noticed within command_timeout)


@pytest.mark.parametrize("batch", ["default", 4])
async def test_writing_sessions_back_after_an_outage_keeps_the_lease(
    own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, batch: Any
) -> None:
    """A (200 sessions, behind a link that delays every reply by 40 ms) loses Redis briefly
    (SIGSTOP) and writes its sessions back. B never declares A lost meanwhile, and every
    session is in Redis afterwards. With batches of 4 the write-back takes several leases
    even pipelined (50 pipelines): the lease is renewed between batches."""
    if batch != "default":
        monkeypatch.setattr(redis_backend, "_RESYNC_BATCH", batch, raising=False)
    server = own_redis_server
    prefix = f"resync-{secrets.token_hex(4)}"
    recorder = Recorder()
    direct = Redis.from_url(server.url, decode_responses=True)
    async with slow_proxy(server, latency=0.04) as proxy:
        registry = RedisRegistry(
            proxy.url,
            prefix=prefix,
            heartbeat=HEARTBEAT,
            lease_ttl=LEASE_TTL,
            # A call on a new connection makes about six round trips (0.24 s here), and the
            # write-back opens new ones: 0.5 s was an outage on a busy machine.
            command_timeout=0.8,
            max_connections=16,
        )
        a = SessionManager(registry=registry, drain_on_signal=False)
        b = SessionManager(
            registry=RedisRegistry(
                server.url, prefix=prefix, heartbeat=HEARTBEAT, lease_ttl=LEASE_TTL
            ),
            drain_on_signal=False,
        )
        recorder.install(a, "a")
        recorder.install(b, "b")
        try:
            async with a, b:
                node = registry.node_id
                sessions = [live_session(a, f"s{i:04}") for i in range(SESSIONS)]
                await asyncio.gather(*(registry.add(s) for s in sessions))
                assert await b.count() == SESSIONS
                assert server.proc is not None
                server.proc.send_signal(signal.SIGSTOP)
                try:

                    async def in_outage() -> bool:
                        return registry.state is LinkState.OUTAGE

                    await wait_for(in_outage, 10, "A to notice the outage")
                finally:
                    server.proc.send_signal(signal.SIGCONT)
                tokens: set[Any] = set()
                started = asyncio.get_running_loop().time()
                async with asyncio.timeout(40):
                    while registry.state is not LinkState.AVAILABLE:
                        # Polled: B's view of A while A writes its sessions back.
                        assert not await direct.exists(f"{prefix}:dead:{node}"), "declared lost"
                        assert recorder.node_lost() == []
                        token = await direct.get(f"{prefix}:lease:{node}")
                        if token is not None:
                            tokens.add(token)
                        await asyncio.sleep(0.02)
                took = asyncio.get_running_loop().time() - started
                if batch != "default":
                    # The write-back outlasted the lease: a lease renewed only around it lapses.
                    assert took > LEASE_TTL, took
                    assert len(tokens) >= 2 * took / LEASE_TTL, (len(tokens), took)
                assert not await direct.exists(f"{prefix}:dead:{node}")
                assert registry.node_id == node
                assert recorder.node_lost() == []
                assert await b.count() == SESSIONS
                assert await direct.scard(f"{prefix}:n:{node}:s") == SESSIONS
                assert await a.count() == SESSIONS
                # (Removed at once: the registry's exit removes what is left one by one.)
                await asyncio.gather(*(registry.remove(s) for s in sessions))
        finally:
            await direct.aclose()


# -- the endings queue itself (no Redis) ------------------------------------------------------


async def test_endings_run_each_once_a_few_at_a_time_and_close_finishes_the_rest() -> None:
    endings = Endings(2)
    release = asyncio.Event()
    running: list[int] = []
    most = 0
    ran: list[int] = []
    everyone_started = asyncio.Event()

    def ending(n: int) -> Any:
        async def run() -> None:
            nonlocal most
            running.append(n)
            most = max(most, len(running))
            if len(running) == 5:
                everyone_started.set()
            await release.wait()
            running.remove(n)
            ran.append(n)

        return run

    for n in range(5):
        endings.add(ending(n))
    assert len(endings) == 5
    closing = asyncio.create_task(endings.close(timeout=0.05))
    async with asyncio.timeout(5):
        await everyone_started.wait()  # past the deadline, the three queued ones start at once
    assert most == 5
    release.set()
    async with asyncio.timeout(5):
        await closing
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert len(endings) == 0


async def test_an_ending_added_as_the_last_runner_finishes_still_runs() -> None:
    """A runner that just ran out of work, and an ending added before its task's done
    callbacks ran: the ending must get a runner, not wait in the queue."""
    endings = Endings(1)
    second_ran = asyncio.Event()

    async def second() -> None:
        second_ran.set()

    async def first() -> None:
        # Runs right after this ending returns and its runner ends, before done callbacks.
        asyncio.get_running_loop().call_soon(endings.add, second)

    endings.add(first)
    async with asyncio.timeout(2):
        await second_ran.wait()
    await endings.close(timeout=1)


# -- kicks of detached sessions ----------------------------------------------------------------


async def test_close_user_runs_detached_sessions_hooks_outside_its_redis_call(
    redis_server: RedisServer,
) -> None:
    """``close_user`` ends a user's sessions that wait detached in Redis (their worker went
    away), here, hooks included. A disconnect hook slower than ``command_timeout`` (a slow
    database) must not count as Redis failing: close_user ends every one of them and returns
    how many, the registry stays available, and each hook runs once. (The hooks ran inside
    close_user's Redis call, under its ``command_timeout``: the first slow hook put the worker
    in its outage state and close_user raised RegistryUnavailable with the others left
    detached.)"""
    prefix = f"kick-{secrets.token_hex(4)}"
    ids = ["d1", "d2"]
    parker = resumable_worker(redis_server.url, prefix)
    parking = parker.registry
    assert isinstance(parking, RedisRegistry)
    async with parking:
        journal = parking.resume_store()
        for session_id in ids:
            session = live_session(parker, session_id)
            session.user_key = "dora"
            await parking.add(session)
            assert await journal.park(session, f"token-{session_id}", 30, None) is not None
    command_timeout = 0.3
    registry = RedisRegistry(
        redis_server.url, prefix=prefix, heartbeat=HEARTBEAT, command_timeout=command_timeout
    )
    b = SessionManager(
        registry=registry,
        resume_window=30,
        resume_secret=SECRET,
        drain_on_signal=False,
        disconnect_timeout=30,
    )
    ended: list[tuple[str, EndReason | None, int | None]] = []

    @b.on_disconnect
    async def slow_hook(session: Session) -> None:
        await asyncio.sleep(2 * command_timeout)  # the hook's own work, not synchronisation
        ended.append((session.id, session.end_reason, session.close_code))

    async with b:
        assert await b.count_detached() == len(ids)
        assert await b.close_user("dora", 4000, "bye") == len(ids)
        assert registry.state is LinkState.AVAILABLE
        assert await b.count_detached() == 0
    assert sorted(ended) == [(i, EndReason.SERVER_CLOSED, 4000) for i in ids]


# -- the sweep's reply is the only record of what it took ------------------------------------


class HoldingProxy(SlowProxy):
    """A loopback proxy in front of Redis that forwards requests at once and replies at once,
    except while :attr:`flowing` is clear: then replies wait (Redis has run the commands; the
    replies are late); and while :attr:`requests` is clear, requests wait too (cut off)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port, latency=1.0)  # (the direction of replies, not a delay)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.requests = asyncio.Event()
        self.requests.set()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                await (self.flowing if delay else self.requests).wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def hold_the_sweep_when_all_are_due(
    registry: RedisRegistry, proxy: Any, direct: Redis, prefix: str, orphans: list[str]
) -> Any:
    """``registry``'s SWEEP sweeps nothing until every orphan is due, then runs with its reply
    held in ``proxy`` (the script is loaded first: else the held reply is NOSCRIPT and nothing
    ran). Returns the real SWEEP."""
    sweep = registry._scripts["SWEEP"]
    await direct.script_load(sweep.script)
    grace = int((registry.lease_ttl + registry.heartbeat) * 1000)

    async def sweep_when_all_are_due(**kwargs: Any) -> Any:
        seconds, micros = await direct.time()
        due_before = int(seconds) * 1000 + int(micros) // 1000 - grace
        if await direct.zcount(f"{prefix}:detached", "-inf", due_before) < len(orphans):
            return 0  # (what SWEEP answers when nothing is due)
        proxy.flowing.clear()
        return await sweep(**kwargs)

    registry._scripts["SWEEP"] = sweep_when_all_are_due
    return sweep


async def test_exit_while_the_sweep_is_in_flight_still_ends_what_it_took(
    redis_server: RedisServer,
) -> None:
    """The registry exits while its heartbeat's SWEEP is in flight: Redis has run it (the
    orphaned sessions are ended there) and its reply is on its way. Their hooks must still run,
    once: the reply is the only record of what was taken (cancelling the call dropped it, and
    those sessions ended in Redis with no hook anywhere). The reply is held back by a proxy
    until the exit has cancelled the heartbeat."""
    prefix = f"sweep-cut-{secrets.token_hex(4)}"
    orphans = ["o1", "o2", "o3"]
    await park_and_leave(redis_server.url, prefix, orphans)
    proxy = HoldingProxy(redis_server.port)
    await proxy.start()
    registry = RedisRegistry(proxy.url, prefix=prefix, heartbeat=HEARTBEAT, command_timeout=5)
    a = SessionManager(
        registry=registry,
        resume_window=WINDOW,
        resume_secret=SECRET,
        drain_on_signal=False,
        drain_timeout=10,
    )
    ended: list[tuple[str, EndReason | None]] = []

    @a.on_disconnect
    def record(session: Session) -> None:
        ended.append((session.id, session.end_reason))

    direct = Redis.from_url(redis_server.url, decode_responses=True)
    await a.__aenter__()
    exiting: asyncio.Task[None] | None = None
    try:
        await hold_the_sweep_when_all_are_due(registry, proxy, direct, prefix, orphans)

        async def redis_took_them() -> bool:
            return not proxy.flowing.is_set() and await direct.zcard(f"{prefix}:detached") == 0

        await wait_for(redis_took_them, 10, "the sweep to run in Redis")
        beater = registry._beater
        assert beater is not None
        exiting = asyncio.create_task(a.__aexit__(None, None, None))
        async with asyncio.timeout(5):
            while not beater.cancelling():  # noqa: ASYNC110 - bounded; set by the exit at once
                await asyncio.sleep(0)
        proxy.flowing.set()  # the reply arrives after the cancellation
        async with asyncio.timeout(20):
            await exiting
        assert sorted(ended) == [(i, EndReason.RESUME_EXPIRED) for i in orphans]
    finally:
        proxy.flowing.set()
        if exiting is None:
            await a.__aexit__(None, None, None)
        await direct.aclose()
        await proxy.close()


async def test_a_sweep_whose_reply_comes_too_late_still_ends_what_it_took(
    redis_server: RedisServer,
) -> None:
    """The heartbeat's SWEEP ends orphaned detached sessions in Redis, but its reply comes after
    command_timeout (a Redis that stalled after running it). Their hooks must still run, once,
    once Redis answers again."""
    prefix = f"sweep-late-{secrets.token_hex(4)}"
    orphans = ["o1", "o2", "o3"]
    await park_and_leave(redis_server.url, prefix, orphans)
    proxy = HoldingProxy(redis_server.port)
    await proxy.start()
    registry = RedisRegistry(proxy.url, prefix=prefix, heartbeat=HEARTBEAT, command_timeout=0.5)
    a = SessionManager(
        registry=registry, resume_window=WINDOW, resume_secret=SECRET, drain_on_signal=False
    )
    ended: list[tuple[str, EndReason | None]] = []

    @a.on_disconnect
    def record(session: Session) -> None:
        ended.append((session.id, session.end_reason))

    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with a:
            sweep = await hold_the_sweep_when_all_are_due(registry, proxy, direct, prefix, orphans)

            async def timed_out() -> bool:
                return registry.state is LinkState.OUTAGE

            await wait_for(timed_out, 10, "the sweep's reply to time out")
            assert await direct.zcard(f"{prefix}:detached") == 0  # Redis ended them
            registry._scripts["SWEEP"] = sweep
            proxy.flowing.set()

            async def all_ended() -> bool:
                return len(ended) >= len(orphans)

            await wait_for(all_ended, 5, "the swept sessions' hooks")
        assert sorted(ended) == [(i, EndReason.RESUME_EXPIRED) for i in orphans]
    finally:
        proxy.flowing.set()
        await direct.aclose()
        await proxy.close()


async def kill_9(registry: RedisRegistry) -> None:
    """``registry``'s worker dies as kill -9 leaves it: no heartbeat, no subscription, nothing
    removed from Redis."""
    for task in (registry._beater, registry._listener):
        assert task is not None
        await redis_backend._stop(task)


def lost_and_healer(
    url: str, prefix: str
) -> tuple[SessionManager, RedisRegistry, SessionManager, RedisRegistry, Recorder]:
    """Worker A (to be lost) and its healer B, each with its registry; B's hooks recorded."""
    a = manager_on(url, prefix)
    b = manager_on(url, prefix)
    lost, registry = a.registry, b.registry
    assert isinstance(lost, RedisRegistry) and isinstance(registry, RedisRegistry)
    recorder = Recorder()
    recorder.install(b, "b")
    return a, lost, b, registry, recorder


async def kill_and_hold_the_claims_reply(
    registry: RedisRegistry, lost: RedisRegistry, proxy: Any, direct: Redis, owned: str
) -> None:
    """``lost`` dies as kill -9 would leave it (no heartbeat, no subscription, nothing
    removed); ``registry`` (behind ``proxy``) then claims its sessions, and the claim's reply is
    held in the proxy. Returns once Redis has run the claim (``owned``, the lost worker's
    session set, is empty)."""
    claim = registry._scripts["CLAIM"]
    await direct.script_load(claim.script)  # else the held reply is NOSCRIPT: nothing ran

    async def claim_and_hold_the_reply(**kwargs: Any) -> Any:
        proxy.flowing.clear()
        return await claim(**kwargs)

    registry._scripts["CLAIM"] = claim_and_hold_the_reply
    await kill_9(lost)

    async def redis_ran_the_claim() -> bool:
        return not proxy.flowing.is_set() and await direct.scard(owned) == 0

    await wait_for(redis_ran_the_claim, 10, "the claim to run in Redis")


@dataclass
class ClaimScene:
    """Lost worker A (``lost``, holding ``ids``) and healer B (``b``, its ``registry`` behind
    ``proxy``), B's hooks in ``recorder``; ``owned`` is A's session set in Redis."""

    lost: RedisRegistry
    b: SessionManager
    registry: RedisRegistry
    proxy: HoldingProxy
    recorder: Recorder
    direct: Redis
    owned: str


@asynccontextmanager
async def claim_scene(
    redis_server: RedisServer, prefix: str, ids: list[str], **b_settings: Any
) -> AsyncIterator[ClaimScene]:
    """A (entered, its sessions registered, still alive) and B (not entered): see ClaimScene.
    ``b_settings``: ``command_timeout`` for B's registry, the rest for its manager."""
    lost = RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT)
    a = SessionManager(registry=lost, drain_on_signal=False)
    proxy = HoldingProxy(redis_server.port)
    await proxy.start()
    registry = RedisRegistry(
        proxy.url,
        prefix=prefix,
        heartbeat=HEARTBEAT,
        command_timeout=b_settings.pop("command_timeout"),
    )
    b = SessionManager(registry=registry, drain_on_signal=False, **b_settings)
    recorder = Recorder()
    recorder.install(b, "b")
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    await lost.__aenter__()
    try:
        for session_id in ids:
            await lost.add(live_session(a, session_id))
        owned = f"{prefix}:n:{lost.node_id}:s"
        yield ClaimScene(lost, b, registry, proxy, recorder, direct, owned)
    finally:
        proxy.flowing.set()
        await lost._close_own_client()
        await direct.aclose()
        await proxy.close()


async def test_exit_while_a_claim_is_in_flight_still_ends_what_it_took(
    redis_server: RedisServer,
) -> None:
    """B heals lost worker A and exits while its CLAIM is in flight (Redis has run it: A's
    sessions are B's to end) and past drain_timeout, so the healing task is cancelled. The
    claimed sessions' node-lost hooks must still run, once: the reply is the only record of
    them. The reply is held back by a proxy until the exit has cancelled the healing task."""
    prefix = f"claim-cut-{secrets.token_hex(4)}"
    ids = ["a1", "a2", "a3"]
    async with claim_scene(redis_server, prefix, ids, command_timeout=5, drain_timeout=0.2) as sc:
        exiting: asyncio.Task[None] | None = None
        await sc.b.__aenter__()
        try:
            # A dies (as kill -9 would leave it); B's claim runs in Redis, its reply held.
            await kill_and_hold_the_claims_reply(
                sc.registry, sc.lost, sc.proxy, sc.direct, sc.owned
            )
            healing = list(sc.registry._healing.values())
            assert len(healing) == 1
            exiting = asyncio.create_task(sc.b.__aexit__(None, None, None))
            async with asyncio.timeout(5):
                while not healing[0].cancelling():  # noqa: ASYNC110 - bounded; after drain_timeout
                    await asyncio.sleep(0.01)
            sc.proxy.flowing.set()  # the reply arrives after the cancellation
            async with asyncio.timeout(20):
                await exiting
            assert sorted(sc.recorder.node_lost()) == ids
        finally:
            sc.proxy.flowing.set()
            if exiting is None:
                await sc.b.__aexit__(None, None, None)


async def test_a_start_that_fails_after_taking_over_still_ends_what_it_claimed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start under a fixed node id claims what its crashed predecessor left, then fails
    (Redis goes away before its first heartbeat): entering raises, and the claimed sessions'
    node-lost hooks have run by then. They are claimed in Redis (no other worker will end
    them) and the app's start-up has failed, so its process is about to exit: hooks still
    running in the background would be cut off with it."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    prefix = f"start-fails-{secrets.token_hex(4)}"
    ids = ["p1", "p2", "p3"]
    crashed = RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT, node_id="pod")
    a = SessionManager(registry=crashed, drain_on_signal=False)
    await crashed.__aenter__()
    for session_id in ids:
        await crashed.add(live_session(a, session_id))
    await kill_9(crashed)
    await crashed._close_own_client()
    registry = RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT, node_id="pod")
    b = SessionManager(registry=registry, drain_on_signal=False, drain_timeout=10)
    recorder = Recorder()
    recorder.install(b, "b", delay=0.2)

    async def redis_goes_away() -> None:
        raise RedisConnectionError("Redis went away right after the take-over")

    monkeypatch.setattr(registry, "_tick", redis_goes_away)
    with pytest.raises(RegistryUnavailable):
        await b.__aenter__()
    assert sorted(recorder.node_lost()) == ids


async def test_an_ending_whose_hook_raises_cancelled_error_does_not_stop_the_rest() -> None:
    """A disconnect hook may raise CancelledError itself (it awaits a task of its own that was
    cancelled) without anyone cancelling the ending: that is its failure, logged like any
    other. The runner goes on with the queue (it stopped, and the next ending waited for the
    next add or the registry's exit)."""
    endings = Endings(1)
    second_ran = asyncio.Event()

    async def first() -> None:
        loop = asyncio.get_running_loop()
        helper = loop.create_task(asyncio.Event().wait())
        helper.cancel()
        await helper  # raises CancelledError: the helper was cancelled, not this ending

    async def second() -> None:
        second_ran.set()

    endings.add(first)
    endings.add(second)
    async with asyncio.timeout(2):
        await second_ran.wait()
    await endings.close(timeout=1)


async def test_a_claim_whose_reply_comes_too_late_still_ends_what_it_took(
    redis_server: RedisServer,
) -> None:
    """B heals lost worker A; Redis runs B's CLAIM but the reply comes after command_timeout
    (a slow link, a Redis that stalled after running it). A's sessions are gone from Redis,
    and their node-lost hooks must still run somewhere."""
    ids = ["a1", "a2", "a3"]
    prefix = f"claim-late-{secrets.token_hex(4)}"
    async with claim_scene(redis_server, prefix, ids, command_timeout=0.5) as sc, sc.b:
        await kill_and_hold_the_claims_reply(sc.registry, sc.lost, sc.proxy, sc.direct, sc.owned)

        async def claim_timed_out() -> bool:
            return sc.registry.state is LinkState.OUTAGE

        await wait_for(claim_timed_out, 5, "B's claim to time out")
        sc.proxy.flowing.set()

        async def all_ended() -> bool:
            return sorted(sc.recorder.node_lost()) == ids

        await wait_for(all_ended, 3, "the claimed sessions' hooks")


async def test_a_claimer_that_dies_before_reading_what_it_took_leaves_it_to_its_healer(
    redis_server: RedisServer,
) -> None:
    """B claims lost worker A's sessions (Redis runs the CLAIM) and dies before it reads what
    it took: the reply never comes, and its heartbeat and listener stop. C heals B and takes
    over what B had taken: A's sessions' node-lost hooks run on C, once, and nowhere else."""
    prefix = f"claim-chain-{secrets.token_hex(4)}"
    ids = ["a1", "a2", "a3"]
    async with claim_scene(redis_server, prefix, ids, command_timeout=5, drain_timeout=0.2) as sc:
        claimer, recorder, direct = sc.registry, sc.recorder, sc.direct
        async with sc.b:
            await kill_and_hold_the_claims_reply(claimer, sc.lost, sc.proxy, direct, sc.owned)
            assert sorted(await direct.hkeys(f"{prefix}:taken:{claimer.node_id}")) == ids
            await kill_9(claimer)
            await sc.proxy.close()  # and its connections with it: the reply never comes
            c = manager_on(redis_server.url, prefix)
            recorder.install(c, "c")
            async with c:

                async def c_ended_them() -> bool:
                    return sorted(recorder.node_lost()) == ids

                await wait_for(c_ended_them, 10, "C to heal B and end A's sessions")
                assert {worker for worker, _, _ in recorder.ended} == {"c"}
                assert await direct.exists(f"{prefix}:taken:{claimer.node_id}") == 0
                healer = c.registry
                assert isinstance(healer, RedisRegistry)
                assert await direct.exists(f"{prefix}:taken:{healer.node_id}") == 0
        assert sorted(recorder.node_lost()) == ids  # B's exit ran none of them


async def test_a_lost_worker_with_many_sessions_is_read_in_pages_each_ended_once(
    redis_server: RedisServer,
) -> None:
    """600 sessions of a lost worker: three CLAIM batches, a taken hash read in pages (HSCAN;
    a hash of over 128 entries is a real hash table there). Each node-lost hook runs once."""
    prefix = f"claim-many-{secrets.token_hex(4)}"
    ids = [f"m{i:03}" for i in range(600)]
    a, lost, b, registry, recorder = lost_and_healer(redis_server.url, prefix)
    await lost.__aenter__()
    try:
        await asyncio.gather(*(lost.add(live_session(a, i)) for i in ids))
        async with b:
            await kill_9(lost)

            async def all_ended() -> bool:
                return len(recorder.ended) >= len(ids)

            await wait_for(all_ended, 20, "the lost worker's 600 hooks")
            assert await registry.redis.exists(registry._keys.taken(registry.node_id)) == 0
    finally:
        await lost._close_own_client()
    assert sorted(recorder.node_lost()) == ids  # once each, B's exit included


async def test_a_claimer_whose_delete_of_what_it_read_fails_queues_nothing_twice(
    redis_server: RedisServer,
) -> None:
    """B claims lost worker A's sessions and reads what it took; the delete that follows fails
    (Redis unreachable for that call), so the entries are still there when B reads again after
    its outage. Their hooks run once, and the entries are then deleted."""
    prefix = f"claim-undeleted-{secrets.token_hex(4)}"
    ids = ["a1", "a2", "a3"]
    a, lost, b, registry, recorder = lost_and_healer(redis_server.url, prefix)
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    await lost.__aenter__()
    try:
        for session_id in ids:
            await lost.add(live_session(a, session_id))
        async with b:
            client = registry.redis
            real_hdel = client.hdel
            failed: list[tuple[Any, ...]] = []

            async def hdel_fails_once(*args: Any) -> Any:
                if not failed and str(args[0]).startswith(f"{prefix}:taken:"):
                    failed.append(args)
                    raise RedisConnectionError("lost on the way (a test)")
                return await real_hdel(*args)

            client.hdel = hdel_fails_once
            await kill_9(lost)
            taken = f"{prefix}:taken:{registry.node_id}"

            async def read_again_and_deleted() -> bool:
                return bool(failed) and not await direct.exists(taken)

            await wait_for(read_again_and_deleted, 10, "B to read what it took again")

            async def all_ended() -> bool:
                return len(recorder.ended) >= len(ids)

            await wait_for(all_ended, 5, "the claimed sessions' hooks")
            assert sorted(recorder.node_lost()) == ids
    finally:
        await lost._close_own_client()
        await direct.aclose()
    assert sorted(recorder.node_lost()) == ids  # none ran twice, B's exit included


async def test_a_registration_whose_reply_was_lost_is_closed_when_its_worker_is_declared_lost(
    redis_server: RedisServer,
) -> None:
    """A registers a session; Redis writes it but the reply comes after command_timeout, so A
    counts it as written "locally only". A is then cut off past its lease: B declares A lost and
    runs the session's node-lost hooks (Redis had it). When A is back it must close that
    session as it closes every session the cluster ended (1012, end reason node lost), not write
    it back under its new node id as a live session whose hooks already ran."""
    prefix = f"lost-reply-{secrets.token_hex(4)}"
    proxy = HoldingProxy(redis_server.port)
    await proxy.start()
    registry = RedisRegistry(proxy.url, prefix=prefix, heartbeat=HEARTBEAT, command_timeout=0.3)
    a = SessionManager(registry=registry, drain_on_signal=False)
    b = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
    )
    recorder = Recorder()
    recorder.install(b, "b")
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with a, b:
            node = registry.node_id
            session = live_session(a, "s1")
            await direct.script_load(registry._scripts["REGISTER"].script)  # (not NOSCRIPT)
            # Connections open (a new one's handshake would wait for its held reply instead).
            await asyncio.gather(*(registry.redis.ping() for _ in range(4)))
            proxy.flowing.clear()
            await registry.add(session)  # the reply is late: "registered locally only"
            assert await direct.hget(f"{prefix}:s:s1", "node") == node  # but Redis has it
            proxy.requests.clear()  # cut off: A's lease lapses

            async def b_ended_it() -> bool:
                return recorder.node_lost() == ["s1"]

            await wait_for(b_ended_it, 10, "B to end A's session as node lost")
            proxy.requests.set()
            proxy.flowing.set()

            async def a_rejoined() -> bool:
                return registry.node_id != node and registry.state is LinkState.AVAILABLE

            await wait_for(a_rejoined, 10, "A to come back under a new node id")
            assert session.end_reason is EndReason.NODE_LOST
            assert session.close_code == 1012
            assert recorder.node_lost() == ["s1"]
    finally:
        proxy.requests.set()
        proxy.flowing.set()
        await direct.aclose()
        await proxy.close()
