"""A stalled event loop is load, not a Redis outage (issue 17).

A worker's event loop can stall for longer than ``command_timeout``: a full garbage collection
of a heap holding 100k connections, a CPU-bound handler, a CPU shared with other processes.
If Redis answered a call meanwhile, its reply waits in the socket; when the loop runs again it
finds the reply and the expired deadline in the same turn. The call must get its reply: with
``asyncio.timeout`` the deadline's callback ran first, the call failed as if Redis had not
answered, and the registry declared an outage (locally only, unnumbered sends, a resync).

The stall is deterministic: the reply is written into a socket pair before the loop is blocked
(``time.sleep`` is the stall itself, a busy loop, not synchronisation), so it is in the socket
when the loop runs again. Every Redis call of the registry is bounded by :class:`Deadline`
(``CallGate.slot`` and the heartbeat's own path); the last test pins that on a real Redis.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from wsession import SessionManager
from wsession.backends._redis_link import CallGate, Deadline
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisServer
from .test_redis_healing import live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

DEADLINE = 0.1
STALL = 3 * DEADLINE  # the loop is blocked well past the deadline


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[asyncio.StreamReader, socket.socket]]:
    """A stream the call reads from, and the peer's end (a plain socket) that answers."""
    ours, peer = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        yield reader, peer
    finally:
        writer.close()
        peer.close()


async def stalled_call(bound: Callable[[], AbstractAsyncContextManager[Any]]) -> bytes:
    """A call waits for a reply under ``bound()``; the reply arrives, then the loop stalls past
    the deadline before it can read it. Returns what the call read (or raises its error)."""
    async with socket_pair() as (reader, peer):
        waiting = asyncio.Event()

        async def call() -> bytes:
            async with bound():
                waiting.set()
                return await reader.readexactly(5)

        task = asyncio.create_task(call())
        await waiting.wait()  # the call now waits for its reply
        peer.sendall(b"+OK\r\n")  # the reply is in the socket, in time
        time.sleep(STALL)  # noqa: ASYNC251 - the loop stalls on purpose (a long GC, say)
        return await task


async def test_asyncio_timeout_throws_away_a_reply_that_came_during_a_stall() -> None:
    """The defect, shown on asyncio itself: why the registry needs :class:`Deadline`."""
    with pytest.raises(TimeoutError):
        await stalled_call(lambda: asyncio.timeout(DEADLINE))


async def test_a_deadline_reads_a_reply_that_came_during_a_stall() -> None:
    assert await stalled_call(lambda: Deadline(DEADLINE)) == b"+OK\r\n"


async def test_a_gate_slot_reads_a_reply_that_came_during_a_stall() -> None:
    gate = CallGate(2)
    assert await stalled_call(lambda: gate.slot(DEADLINE)) == b"+OK\r\n"
    assert gate.waiting == 0 and not gate.held()


async def test_a_deadline_still_ends_a_call_that_gets_no_reply() -> None:
    async with socket_pair() as (reader, _peer):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with Deadline(DEADLINE):
                await reader.readexactly(5)
        took = time.monotonic() - started
    assert DEADLINE <= took < DEADLINE + 1.0


async def test_a_deadline_leaves_other_errors_and_results_alone() -> None:
    async with Deadline(DEADLINE):
        pass
    with pytest.raises(KeyError):
        async with Deadline(DEADLINE):
            raise KeyError("x")
    # Leaving early cancels its timer: nothing fires into the task afterwards.
    await asyncio.sleep(2 * DEADLINE)


@pytest.mark.redis
async def test_the_registry_bounds_its_calls_and_heartbeat_with_deadlines(
    own_redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bound the registry puts on a Redis call is a :class:`Deadline`: counted on a real
    Redis through registering a session, a cluster query and the heartbeat's renewals."""
    made: list[float] = []
    real_init = Deadline.__init__

    def counting_init(self: Deadline, seconds: float) -> None:
        made.append(seconds)
        real_init(self, seconds)

    monkeypatch.setattr(Deadline, "__init__", counting_init)
    registry = RedisRegistry(
        own_redis_server.url,
        prefix=f"lag-{secrets.token_hex(4)}",
        heartbeat=0.05,
        command_timeout=0.7,
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    async with manager:
        await registry.add(live_session(manager, "s-1"))
        assert await manager.count() == 1
        before = len(made)

        async def renewed() -> bool:
            return len(made) > before

        await wait_for(renewed, 5, "a heartbeat under a Deadline")
        assert registry.state is LinkState.AVAILABLE
    assert made and set(made) == {0.7}
