"""Redis misbehaving: hanging (SIGSTOP), refusing writes (OOM), failing one removal; and one
stuck client on a worker must not hold up that worker's other cross-worker messages."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import monotonic
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from wsession import RegistryUnavailable, SessionManager, SessionState, get_session
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisServer
from .support import mount, open_session, run_server
from .test_redis_healing import live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


def echo_app(manager: SessionManager) -> Any:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        try:
            while True:
                text = await ws.receive_text()
                if text == "broadcast":
                    await manager.broadcast("hello all", exclude=get_session(ws).id)
                await ws.send_text(f"echo:{text}")
        except WebSocketDisconnect:
            pass

    return mount(endpoint, manager)


@asynccontextmanager
async def stopped(server: RedisServer) -> AsyncIterator[None]:
    """Redis frozen (SIGSTOP: its sockets stay open, it answers nothing), thawed on exit."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


async def test_a_hung_redis_holds_nothing_longer_than_command_timeout(
    own_redis_server: RedisServer,
) -> None:
    prefix = f"faults-{secrets.token_hex(4)}"
    registry = RedisRegistry(
        own_redis_server.url, prefix=prefix, heartbeat=0.5, command_timeout=0.5
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    bound = 2.0  # command_timeout plus scheduling slack on a loaded machine
    async with manager, run_server(echo_app(manager)) as server:
        first = await connect(f"{server.ws}/ws")
        await first.recv()
        async with stopped(own_redis_server):
            started = monotonic()
            await first.send("broadcast")
            async with asyncio.timeout(bound):
                assert await first.recv() == "echo:broadcast"
            echo_after = monotonic() - started

            started = monotonic()
            async with asyncio.timeout(bound):
                second = await connect(f"{server.ws}/ws")
                second_id = await second.recv()
            handshake = monotonic() - started

            started = monotonic()
            async with asyncio.timeout(bound):
                with pytest.raises(RegistryUnavailable):
                    await manager.count()
            stats = monotonic() - started
            assert registry.state is LinkState.OUTAGE
            await second.send("still local")
            async with asyncio.timeout(bound):
                assert await second.recv() == "echo:still local"
        print(f"hung Redis: echo {echo_after:.2f}s, handshake {handshake:.2f}s, count {stats:.2f}s")

        async def both_written_back() -> bool:
            try:
                return await manager.count() == 2
            except RegistryUnavailable:
                return False

        await wait_for(both_written_back, 15, "the handshake made during the hang to be written")
        assert second_id in {s.id for s in await manager.sessions()}
        await first.close()
        await second.close()


async def test_redis_out_of_memory_leaves_connections_local_only_then_writes_them(
    own_redis_server: RedisServer,
) -> None:
    prefix = f"faults-{secrets.token_hex(4)}"
    registry = RedisRegistry(own_redis_server.url, prefix=prefix, heartbeat=0.4)
    manager = SessionManager(registry=registry, drain_on_signal=False)
    direct = Redis.from_url(own_redis_server.url, decode_responses=True)
    try:
        async with manager, run_server(echo_app(manager)) as server:
            await direct.config_set("maxmemory-policy", "noeviction")
            await direct.config_set("maxmemory", "1")
            try:
                # The lease cannot be renewed (SET is refused): wait until it lapsed, as it
                # would in a real OOM, so a registration has to take a new lease.
                lease = f"{prefix}:lease:{registry.node_id}"

                async def lease_lapsed() -> bool:
                    return not await direct.exists(lease)

                await wait_for(lease_lapsed, 10, "the lease to lapse under OOM")
                ws = await connect(f"{server.ws}/ws")
                session_id = str(await ws.recv())  # not a 500 / 1011
                await ws.send("hi")
                assert await ws.recv() == "echo:hi"
                assert not registry.available
                with pytest.raises(RegistryUnavailable):
                    await manager.count()
            finally:
                await direct.config_set("maxmemory", "0")

            async def written() -> bool:
                return bool(await direct.sismember(f"{prefix}:sessions", session_id))

            await wait_for(written, 10, "the session to be written once Redis takes writes")
            await wait_for(lambda: _is_available(registry), 10, "the registry to be available")
            await ws.close()
    finally:
        await direct.aclose()


async def _is_available(registry: RedisRegistry) -> bool:
    return registry.available


async def test_a_removal_that_fails_once_is_replayed(redis_server: RedisServer) -> None:
    prefix = f"faults-{secrets.token_hex(4)}"
    registry = RedisRegistry(redis_server.url, prefix=prefix, heartbeat=0.4)
    manager = SessionManager(registry=registry, drain_on_signal=False)
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with manager:
            session = live_session(manager, "leaving")
            await registry.add(session)
            script = registry._scripts["REMOVE"]
            failures = 0

            async def fails_once(*args: Any, **kwargs: Any) -> Any:
                nonlocal failures
                if failures == 0:
                    failures += 1
                    raise ResponseError("READONLY You can't write against a read only replica.")
                return await script(*args, **kwargs)

            registry._scripts["REMOVE"] = fails_once
            await registry.remove(session)  # never raises for it
            assert failures == 1

            async def gone() -> bool:
                return not await direct.exists(f"{prefix}:s:leaving")

            await wait_for(gone, 10, "the failed removal to be replayed")
            assert not await direct.sismember(f"{prefix}:sessions", "leaving")
            await wait_for(lambda: _is_available(registry), 10, "the registry to be available")
            assert await manager.count() == 0
    finally:
        await direct.aclose()


class Receiver:
    """A session whose frames are recorded; ``stuck`` ones block in send until released."""

    def __init__(self, manager: SessionManager, session_id: str, *, stuck: bool) -> None:
        self.frames: list[str] = []
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        if not stuck:
            self.release.set()

        async def send(message: Any) -> None:
            await self.release.wait()
            self.frames.append(message["text"])
            self.arrived.set()

        self.session = open_session(session_id, send, {})


async def test_one_stuck_client_does_not_hold_the_workers_other_cross_worker_messages(
    redis_server: RedisServer,
) -> None:
    """slow_consumer='wait': a client that reads nothing fills its backlog; messages published
    to its worker for another session still arrive at once, and the stuck one gets its own in
    order once it reads again."""
    prefix = f"faults-{secrets.token_hex(4)}"
    sender = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=0.5),
        drain_on_signal=False,
    )
    worker = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=0.5),
        slow_consumer="wait",
        max_backlog=2,
        send_timeout=5.0,
        drain_on_signal=False,
    )
    async with sender, worker:
        stuck = Receiver(worker, "stuck", stuck=True)
        healthy = Receiver(worker, "healthy", stuck=False)
        await worker.registry.add(stuck.session)
        await worker.registry.add(healthy.session)
        for n in range(5):  # 1 in the server's send, 2 in the backlog, 2 beyond it
            assert (await sender.send("stuck", f"m{n}")).value == "queued"
        started = monotonic()
        await sender.send("healthy", "hello")
        async with asyncio.timeout(2.0):  # send_timeout is 5 s: not waited for
            await healthy.arrived.wait()
        print(f"healthy message arrived after {monotonic() - started:.3f}s")
        stuck.release.set()

        async def all_arrived() -> bool:
            return len(stuck.frames) >= 5

        await wait_for(all_arrived, 5, "the stuck client's messages")
        assert stuck.frames == [f"m{n}" for n in range(5)]
        assert stuck.session.state is SessionState.OPEN


async def test_closing_ends_a_heartbeat_whose_cancellation_was_swallowed(
    redis_server: RedisServer,
) -> None:
    """redis-py sometimes turns the cancellation of a call into an ordinary return (seen with
    8.1: shutdown then waited for the heartbeat for ever). Closing must end it anyway."""
    registry = RedisRegistry(
        redis_server.url, prefix=f"faults-{secrets.token_hex(4)}", heartbeat=0.1
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    started = asyncio.Event()
    swallowed: list[bool] = []

    async def tick_that_swallows() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a Redis call that never answers
        except asyncio.CancelledError:
            swallowed.append(True)  # ... and whose cancellation is lost, as redis-py did

    async with asyncio.timeout(15):
        await manager.__aenter__()
        registry._tick = tick_that_swallows  # type: ignore[method-assign]
        await started.wait()
        await manager.__aexit__(None, None, None)
    assert swallowed == [True]
