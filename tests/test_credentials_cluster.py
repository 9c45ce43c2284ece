"""Credentials on long-lived connections across a cluster: example workers (separate uvicorn
processes) on a private Redis. Revocation reaches every worker within a second and runs each
session's hooks once; expiry and refresh work the same on a Redis worker."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from wsession import EndReason

from .redis_support import RedisServer
from .support import next_of, read_until_closed, run_server, wait_unregistered
from .test_credentials import refresh_app, refreshing_manager
from .test_redis_cluster import Worker, cluster

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(90)]


async def stats_of(client: httpx.AsyncClient, worker: Worker) -> dict[str, Any]:
    response = await client.get(f"{worker.http}/api/stats")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def wait_stats(
    client: httpx.AsyncClient, worker: Worker, done: Any, timeout: float = 5.0
) -> dict[str, Any]:
    """Poll another process's counters (HTTP is the only way to see them) until ``done``."""
    async with asyncio.timeout(timeout):
        while not done(stats := await stats_of(client, worker)):  # noqa: ASYNC110 (see above)
            await asyncio.sleep(0.05)
    return stats


def server_closed(n: int) -> Any:
    """Counters showing ``n`` endings (the example has no disconnect hook since presence leaves
    in the teardown)."""

    def check(stats: dict[str, Any]) -> bool:
        return bool(stats["ended"] >= n)

    return check


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


async def test_revoke_across_two_workers_closes_every_tab_within_a_second(
    own_redis_server: RedisServer,
) -> None:
    async with cluster(own_redis_server, 2, WSESSION_REVOCATION_TTL="30") as ((a, b), client):
        bob, _ = await a.join("bob")
        carol, _ = await b.join("carol")
        alice_a, alice_a_id = await a.join("alice")
        alice_b, alice_b_id = await b.join("alice")
        for ws in (bob, carol):  # told of both tabs (after their welcome: in the diffs)
            seen: set[str] = set()
            while not seen >= {alice_a_id, alice_b_id}:
                diff = await next_of(ws, "presence_diff")
                seen.update(i for person in diff["joins"] for i in person["ids"])

        started = time.monotonic()
        answer = await client.post(f"{b.http}/api/revoke/alice")
        assert answer.status_code == 200 and answer.json() == {"closed": 2}
        closes = await asyncio.gather(
            read_until_closed(alice_a, timeout=1), read_until_closed(alice_b, timeout=1)
        )
        took = time.monotonic() - started
        print(f"both tabs closed {took:.3f}s after POST /api/revoke")
        assert took < 1.0
        assert [(c.code, c.reason) for c in closes] == [(4403, "revoked")] * 2

        # Each tab ended exactly once, on its own worker.
        for worker in (a, b):
            stats = await wait_stats(client, worker, server_closed(1))
            assert stats["ended"] == 1 and stats["ended_by"] == {"server closed": 1}
            assert stats["hook_seconds"]["disconnect"]["count"] == 0  # none registered
        # Bystanders on both workers heard each tab leave, and are still connected.
        for ws in (bob, carol):
            offline: set[str] = set()
            while len(offline) < 2:
                message = await next_of(ws, "presence_diff")
                offline.update(i for person in message["leaves"] for i in person["ids"])
            assert offline == {alice_a_id, alice_b_id}
            await ws.send(json.dumps({"type": "echo", "text": "still here"}))
            assert (await next_of(ws, "echo"))["text"] == "still here"

        # The denylist is shared: worker A refuses alice although B revoked her.
        for worker in (a, b):
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{worker.port}/ws?name=alice")
            assert refused.value.response.status_code == 403
        stats_b = await stats_of(client, b)
        assert stats_b["revocations"] == {"user": 1} and stats_b["revoked"] == 2
        assert (await stats_of(client, a))["refused_by"] == {"revoked": 1}
        await bob.close()
        await carol.close()


async def test_expiry_and_refresh_on_redis_workers(own_redis_server: RedisServer) -> None:
    ttl, grace, refreshes = 0.6, 0.2, 8
    env = {"WSESSION_SESSION_TTL": str(ttl), "WSESSION_EXPIRY_GRACE": str(grace)}
    async with cluster(own_redis_server, 2, **env) as ((a, b), client):
        keeper = await connect(f"ws://127.0.0.1:{a.port}/ws?name=keeper")
        keeper_at = parse((await next_of(keeper, "welcome"))["expires_at"])
        lapser = await connect(f"ws://127.0.0.1:{b.port}/ws?name=lapser")
        lapser_at = parse((await next_of(lapser, "welcome"))["expires_at"])

        async def keep_refreshing() -> datetime:
            nonlocal keeper_at
            for _ in range(refreshes):
                # The client's own schedule: refresh when 40 % of the TTL is left.
                wait = (keeper_at - datetime.now(UTC)).total_seconds() - 0.4 * ttl
                await asyncio.sleep(max(0.0, wait))
                await keeper.send(json.dumps({"type": "refresh"}))
                moved = parse((await next_of(keeper, "refreshed"))["expires_at"])
                assert moved > keeper_at
                keeper_at = moved
            return keeper_at

        async def lapse() -> tuple[Any, datetime]:
            close = await read_until_closed(lapser, timeout=5)
            return close, datetime.now(UTC)

        (lapse_close, lapsed_at), last = await asyncio.gather(lapse(), keep_refreshing())
        assert (lapse_close.code, lapse_close.reason) == (4401, "expired")
        late = (lapsed_at - (lapser_at + timedelta(seconds=grace))).total_seconds()
        assert -0.05 <= late <= 1.0, late
        keep_close = await read_until_closed(keeper, timeout=5)
        kept_until = datetime.now(UTC)
        assert (keep_close.code, keep_close.reason) == (4401, "expired")
        assert -0.05 <= (kept_until - (last + timedelta(seconds=grace))).total_seconds() <= 1.0
        assert kept_until - lapsed_at > timedelta(seconds=3 * ttl)  # outlived the other

        for worker, refreshed in ((a, refreshes), (b, 0)):
            stats = await wait_stats(client, worker, server_closed(1))
            assert stats["ended_by"] == {"server closed": 1}
            assert stats["hook_seconds"]["disconnect"]["count"] == 0  # none registered
            assert stats["expired"] == 1
            assert stats["refreshes"] == ({"ok": refreshed} if refreshed else {})


async def test_a_failing_refresh_on_a_redis_registry_closes_once(
    redis_server: RedisServer,
) -> None:
    from wsession.backends.redis import RedisRegistry

    registry = RedisRegistry(redis_server.url, prefix=f"cred-{secrets.token_hex(4)}")
    manager, recorder = refreshing_manager(registry=registry)
    async with manager, run_server(refresh_app(manager)) as server:
        ws: ClientConnection = await connect(f"{server.ws}/ws")
        session_id = str(await ws.recv())
        await ws.send("refuse")
        close = await read_until_closed(ws, timeout=5)
        await recorder.wait_ended(1)
        assert (close.code, close.reason) == (4401, "token revoked")
        await wait_unregistered(manager)  # removal (from Redis too) follows the hooks
        assert await manager.count() == 0
    assert recorder.ended == [(session_id, EndReason.SERVER_CLOSED, 4401, "token revoked")]
    assert manager.stats.refreshes == {"failed": 1}
