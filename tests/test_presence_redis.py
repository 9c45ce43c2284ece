"""Presence across workers with RedisRegistry (issue 15): every worker sees the same presence,
diffs reach subscribers on every worker, a worker starting later loads what is there, and a
kill -9'd worker's presences leave as one diff within two heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette

from example_app import create_app
from example_app.procs import free_port, start_worker, stop, wait_for_port

from .redis_support import RedisServer
from .support import Server, run_server
from .test_presence_uvicorn import View, follow, open_tab

pytestmark = pytest.mark.anyio

HEARTBEAT = 0.5
INTERVAL = 0.1


def env_for(redis: RedisServer, prefix: str) -> dict[str, str]:
    return {
        "WSESSION_REDIS_URL": redis.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": str(HEARTBEAT),
        "WSESSION_PRESENCE_INTERVAL": str(INTERVAL),
    }


@asynccontextmanager
async def worker(env: dict[str, str]) -> AsyncIterator[tuple[Server, Starlette]]:
    app = create_app(environ=env)
    async with run_server(app) as server:
        yield server, app


async def test_diffs_reach_subscribers_on_every_worker(redis_server: RedisServer) -> None:
    env = env_for(redis_server, f"presence-{secrets.token_hex(4)}")
    async with worker(env) as (one, app_one):
        alice, welcome_a = await open_tab(one.ws, "alice")
        view_a = View(welcome_a)
        await follow(alice, view_a, lambda v: welcome_a["id"] in v.ids)
        async with worker(env) as (two, app_two):
            # A worker started later loads the presence already there.
            bob, welcome_b = await open_tab(two.ws, "bob")
            view_b = View(welcome_b)
            assert view_b.people() == {"alice": {welcome_a["id"]}}
            await follow(alice, view_a, lambda v: welcome_b["id"] in v.ids)  # across workers
            await follow(bob, view_b, lambda v: welcome_b["id"] in v.ids)
            # A second tab of alice on worker two: grouped with her first, on both workers.
            tab2, welcome_a2 = await open_tab(two.ws, "alice")
            both = {welcome_a["id"], welcome_a2["id"]}
            for ws, view in ((alice, view_a), (bob, view_b)):
                await follow(ws, view, lambda v: v.people().get("alice") == both)
            for manager in (app_one.state.sessions, app_two.state.sessions):
                people = await manager.presence.people("lobby")
                assert {p: set(s) for p, s in people.items()} == {
                    "alice": both,
                    "bob": {welcome_b["id"]},
                }
            await tab2.close()
            await bob.close()
            await follow(alice, view_a, lambda v: set(v.ids) == {welcome_a["id"]})
        # Worker two shut down cleanly: nothing of it is left anywhere.
        assert await app_one.state.sessions.presence.count("lobby", sessions=True) == 1
        await alice.close()


async def test_a_killed_worker_leaves_as_one_diff_within_two_heartbeats(
    redis_server: RedisServer,
) -> None:
    env = env_for(redis_server, f"presence-{secrets.token_hex(4)}")
    port = free_port()
    proc = start_worker(port, {**os.environ, **env})
    doomed: list[Any] = []
    try:
        wait_for_port(port, proc, "example worker", timeout=20)
        async with worker(env) as (survivor, _):
            watcher, welcome = await open_tab(survivor.ws, "watcher")
            view = View(welcome)
            for i in range(20):  # ten people with two tabs each on the doomed worker
                doomed.append((await open_tab(f"ws://127.0.0.1:{port}", f"p{i % 10}"))[0])
            await follow(watcher, view, lambda v: len(v.ids) == 21)
            assert len(view.people()) == 11
            diffs_before = view.diffs
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            await follow(watcher, view, lambda v: len(v.ids) == 1, timeout=10)
            took = time.monotonic() - killed_at
            print(f"kill -9: presences gone from the survivor's subscriber after {took:.2f}s")
            assert view.diffs == diffs_before + 1  # one diff, all 20 leaves
            assert took < 2 * HEARTBEAT + INTERVAL + 0.3  # scheduling slack on a shared host
            assert view.people() == {"watcher": {welcome["id"]}}
            await watcher.close()
    finally:
        for ws in doomed:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        stop(proc)


async def test_the_stored_presence_follows_the_sessions(redis_server: RedisServer) -> None:
    """What a later worker loads (the worker's presence hash) gains and loses entries with the
    sessions: no ghost left in Redis."""
    prefix = f"presence-{secrets.token_hex(4)}"
    env = env_for(redis_server, prefix)
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with worker(env) as (one, app_one):
            alice, welcome = await open_tab(one.ws, "alice")
            view = View(welcome)
            await follow(alice, view, lambda v: welcome["id"] in v.ids)
            node = app_one.state.sessions.registry.node_id
            assert await client.hlen(f"{prefix}:p:{node}") == 1
            await alice.close()
            await _until_empty(client, f"{prefix}:p:{node}")
    finally:
        await client.aclose()


async def _until_empty(client: Any, key: str) -> None:
    for _ in range(500):  # polling Redis (no event to wait on), bounded
        if not await client.hlen(key):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} still holds entries")
