"""Several uvicorn processes of the example app on one private Redis: cross-worker delivery,
one cluster-wide view, healing after kill -9, and surviving a Redis restart. The first two run
on a single Redis and on a 3-master Redis Cluster (the app is given one node's URL and finds
out by itself)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from example_app.procs import start_worker, stop

from .redis_support import RedisClusterServer, RedisServer, free_port
from .support import next_of, read_until_closed

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(90)]
HEARTBEAT = 0.4


class Worker:
    """One uvicorn process of the example app."""

    def __init__(self, redis_url: str, prefix: str, **extra_env: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "WSESSION_REDIS_URL": redis_url,
            "WSESSION_REDIS_PREFIX": prefix,
            "WSESSION_HEARTBEAT": str(HEARTBEAT),
            "WSESSION_DRAIN_TIMEOUT": "2",
            **extra_env,
        }
        self.proc = start_worker(self.port, env)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, client: httpx.AsyncClient) -> None:
        async with asyncio.timeout(20):
            while True:  # bounded by the timeout: poll until the app answers
                assert self.proc.poll() is None, "worker exited during start-up"
                try:
                    if (await client.get(f"{self.http}/api/stats")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

    async def join(self, name: str) -> tuple[ClientConnection, str]:
        ws = await connect(f"ws://127.0.0.1:{self.port}/ws?name={name}")
        # Not simply the first message: another worker's presence broadcast may arrive while
        # the app prepares the welcome (it awaits a cluster query first).
        welcome = await next_of(ws, "welcome")
        return ws, str(welcome["id"])

    def stop(self) -> None:
        stop(self.proc)


@asynccontextmanager
async def cluster(
    redis: RedisServer | RedisClusterServer, size: int, **extra_env: str
) -> AsyncIterator[tuple[list[Worker], httpx.AsyncClient]]:
    """``size`` example workers on ``redis`` (``extra_env``: more WSESSION_* settings)."""
    prefix = f"cluster-{os.getpid()}-{time.monotonic_ns()}"
    workers = [Worker(redis.url, prefix, **extra_env) for _ in range(size)]
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for worker in workers:
                await worker.ready(client)
            yield workers, client
    finally:
        for worker in workers:
            worker.stop()


async def session_ids(client: httpx.AsyncClient, worker: Worker) -> set[str] | None:
    """The ids a worker lists, or None while its registry is unavailable (503)."""
    response = await client.get(f"{worker.http}/api/sessions")
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return {s["id"] for s in response.json()["sessions"]}


async def test_cross_worker_delivery_and_one_view(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    async with cluster(any_redis, 2) as ((a, b), client):
        alice, alice_id = await a.join("alice")
        bob, bob_id = await b.join("bob")
        assert await session_ids(client, a) == await session_ids(client, b) == {alice_id, bob_id}

        await alice.send(json.dumps({"type": "dm", "to": bob_id, "text": "by id"}))
        assert (await next_of(bob, "dm"))["text"] == "by id"
        await alice.send(json.dumps({"type": "dm_user", "user": "bob", "text": "by user"}))
        assert (await next_of(bob, "dm"))["text"] == "by user"

        for ws in (alice, bob):
            await ws.send(json.dumps({"type": "join", "group": "room"}))
            await next_of(ws, "joined")
        await alice.send(json.dumps({"type": "group", "group": "room", "text": "to room"}))
        for ws in (alice, bob):
            assert (await next_of(ws, "group"))["text"] == "to room"

        await bob.send(json.dumps({"type": "broadcast", "text": "to all"}))
        for ws in (alice, bob):
            assert (await next_of(ws, "broadcast"))["from"] == bob_id

        sent = await client.post(f"{a.http}/api/send/{bob_id}", json={"text": "via A"})
        assert sent.status_code == 200
        assert (await next_of(bob, "dm"))["text"] == "via A"
        assert (await client.post(f"{a.http}/api/kick/{bob_id}")).status_code == 200
        assert (await read_until_closed(bob)).code == 4000
        await alice.close()


async def test_kill_9_heals_within_two_heartbeats(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    # Resumption off: with it, a dead worker's sessions wait for their clients (detached)
    # instead of ending as node lost (see test_resume_cluster.py).
    async with cluster(any_redis, 3, WSESSION_RESUME_WINDOW="0") as ((a, b, c), client):
        lost = [await a.join(f"a{i}") for i in range(3)]
        kept = [await b.join("b0"), await c.join("c0")]
        lost_ids = {sid for _, sid in lost}
        assert lost_ids <= (await session_ids(client, b) or set())

        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        killed = time.monotonic()
        async with asyncio.timeout(10):
            # Another process's state: polling over HTTP is the only way to observe it.
            while lost_ids & (await session_ids(client, b) or lost_ids):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        healed_after = time.monotonic() - killed
        print(f"healed {healed_after:.3f}s after kill -9 (heartbeat {HEARTBEAT}s)")

        async def node_lost_endings() -> int:
            stats = [(await client.get(f"{w.http}/api/stats")).json() for w in (b, c)]
            return sum(s["ended_by"].get("node lost", 0) for s in stats)

        # Claimed sessions vanish from the listing at once; their hooks (and the counting of
        # each ending) follow one by one on the healer.
        async with asyncio.timeout(10):
            while await node_lost_endings() < 3:  # noqa: ASYNC110 (another process's state)
                await asyncio.sleep(0.05)
        assert await node_lost_endings() == 3  # exactly once across the two survivors
        assert await session_ids(client, c) == {sid for _, sid in kept}
        # Lease 1.5 heartbeats, checked every half heartbeat: within two heartbeats of the last
        # renewal (plus scheduling slack on a loaded 2-core machine).
        assert healed_after < 2 * HEARTBEAT + 0.5, healed_after
        for ws, _ in lost + kept:
            await ws.close()


async def test_redis_restart_drops_no_connection(own_redis_server: RedisServer) -> None:
    async with cluster(own_redis_server, 2) as ((a, b), client):
        alice, alice_id = await a.join("alice")
        bob, bob_id = await b.join("bob")
        own_redis_server.restart()  # empty again: no persistence
        await alice.send(json.dumps({"type": "echo", "text": "still here"}))
        assert (await next_of(alice, "echo"))["text"] == "still here"
        async with asyncio.timeout(15):
            # Another process's state: polling over HTTP is the only way to observe it.
            while await session_ids(client, a) != {alice_id, bob_id}:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await session_ids(client, b) == {alice_id, bob_id}
        await alice.send(json.dumps({"type": "dm", "to": bob_id, "text": "after restart"}))
        assert (await next_of(bob, "dm"))["text"] == "after restart"
        stats = (await client.get(f"{a.http}/api/stats")).json()
        assert stats["ended"] == 0  # no connection was dropped
        await alice.close()
        await bob.close()
