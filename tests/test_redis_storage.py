"""What the Redis registry writes: group membership atomic with the session's existence (with a
TTL as a safety net), and only an allow-list of handshake details, never secrets."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect

from wsession import SessionManager
from wsession.backends.redis import RedisRegistry

from .redis_support import RedisServer
from .support import announce_and_read, mount, run_server, wait_unregistered
from .test_redis_healing import live_session

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(30)]


def manager_on(url: str, prefix: str, **options: Any) -> SessionManager:
    return SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=0.5, **options),
        drain_on_signal=False,
    )


async def test_a_remote_join_racing_the_removal_leaves_no_member_behind(
    redis_server: RedisServer,
) -> None:
    """B joins A's session to a group; A removes the session right after B's first Redis reply
    (between a check and a write, if the join has one). members() must not list an id get()
    does not know, and nothing of the session may stay in Redis."""
    prefix = f"storage-{secrets.token_hex(4)}"
    a, b = manager_on(redis_server.url, prefix), manager_on(redis_server.url, prefix)
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with a, b:
            session = live_session(a, "racer")
            await a.registry.add(session)
            client = b.registry.redis  # type: ignore[attr-defined]
            original = client.execute_command
            fired = False

            async def remove_after_first_reply(*args: Any, **kwargs: Any) -> Any:
                nonlocal fired
                reply = await original(*args, **kwargs)
                if not fired:
                    fired = True
                    await a.registry.remove(session)
                return reply

            client.execute_command = remove_after_first_reply
            try:
                await b.join("racer", "room")
            finally:
                client.execute_command = original
            assert fired
            assert await b.get("racer") is None
            assert await b.members("room") == []
            assert not await direct.exists(f"{prefix}:sg:racer")
            assert not await direct.sismember(f"{prefix}:g:room", "racer")
    finally:
        await direct.aclose()


async def test_group_and_user_sets_expire_as_a_safety_net(redis_server: RedisServer) -> None:
    prefix = f"storage-{secrets.token_hex(4)}"
    a, b = (
        manager_on(redis_server.url, prefix, index_ttl=600),
        manager_on(redis_server.url, prefix, index_ttl=600),
    )
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with a, b:
            session = live_session(a, "member")
            session.user_key = "ada"
            await a.registry.add(session)
            assert await b.join("member", "remote-room")  # written by another worker
            assert await a.join("member", "local-room")  # written by the owner
            for key in ("g:remote-room", "g:local-room", "u:ada"):
                ttl = await direct.ttl(f"{prefix}:{key}")
                assert 0 < ttl <= 600, (key, ttl)
            # A ghost entry (however it came there) is never listed, and is dropped.
            await direct.sadd(f"{prefix}:g:remote-room", "ghost")
            assert await b.members("remote-room") == ["member"]
            assert not await direct.sismember(f"{prefix}:g:remote-room", "ghost")
    finally:
        await direct.aclose()


SECRET = "s3cret"


async def test_only_allow_listed_headers_reach_redis(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A query-string token, an API-key header and a token carried as a subprotocol never reach
    Redis; allow-listed headers do, within the byte cap (what does not fit is left out, logged
    once); remote snapshots show only what was stored."""
    prefix = f"storage-{secrets.token_hex(4)}"
    manager = manager_on(redis_server.url, prefix, max_stored_header_bytes=1024)
    other = manager_on(redis_server.url, prefix)
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    caplog.set_level(logging.WARNING, logger="wsession")
    try:
        async with manager, other, run_server(mount(announce_and_read, manager)) as server:
            ids = []
            for _ in range(2):
                ws = await connect(
                    f"{server.ws}/ws?token={SECRET}-query",
                    additional_headers={
                        "X-Api-Key": f"{SECRET}-header",
                        "Accept-Language": "x" * 2000,  # allow-listed, but over the cap
                    },
                    subprotocols=[f"{SECRET}-protocol"],  # type: ignore[list-item]
                    user_agent_header="probe/1.0",
                )
                ids.append(await ws.recv())
                await ws.close()
            await wait_unregistered(manager, 0)
            # Reconnect one to look at it while it is live.
            ws = await connect(
                f"{server.ws}/ws?token={SECRET}-query",
                additional_headers={"X-Api-Key": f"{SECRET}-header"},
                user_agent_header="probe/1.0",
            )
            live_id = str(await ws.recv())
            dump = []
            for key in await direct.keys(f"{prefix}:*"):
                kind = await direct.type(key)
                if kind == "hash":
                    dump.append(json.dumps(await direct.hgetall(key)))
                elif kind == "set":
                    dump.append(json.dumps(sorted(await direct.smembers(key))))
                elif kind == "string":
                    dump.append(str(await direct.get(key)))
            assert dump and not [d for d in dump if SECRET in d]
            stored = await direct.hgetall(f"{prefix}:s:{live_id}")
            assert sum(len(k) + len(v) for k, v in json.loads(stored["headers"])) <= 1024
            snapshot = await other.get(live_id)
            assert snapshot is not None and snapshot.node != other.registry.node_id  # type: ignore[attr-defined]
            assert snapshot.headers.get("user-agent") == "probe/1.0"
            assert snapshot.headers.get("x-api-key") is None
            assert len(snapshot.query_params) == 0
            assert snapshot.requested_subprotocols == ()
            await ws.close()
        truncations = [r for r in caplog.records if "max_stored_header_bytes" in r.getMessage()]
        assert len(truncations) == 1  # logged once per worker, not per connection
    finally:
        await direct.aclose()
