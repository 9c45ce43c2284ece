"""Resumption with RedisRegistry (issue 14): what holds today, on two workers in one process.

Redis numbers and records every message for a resumable session; a detached session waits in
Redis, and its client resumes it on any worker with everything it missed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from wsession import EndReason, SendResult, SessionManager

from .redis_support import RedisClusterServer, RedisServer
from .support import HookRecorder, Server, mount, reset_connection, run_server
from .test_resume import app_endpoint

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


def worker(
    url: str, prefix: str, window: float, **settings: Any
) -> tuple[SessionManager, HookRecorder]:
    from wsession.backends.redis import RedisRegistry

    manager = SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=0.5),
        resume_window=window,
        **settings,
        resume_seq_field="seq",
        resume_secret="s" * 32,  # shared by the workers, as a deployment would configure it
    )
    recorder = HookRecorder()
    recorder.install(manager)
    return manager, recorder


@asynccontextmanager
async def serving(*managers: SessionManager) -> AsyncIterator[list[Server]]:
    """Enter each worker's manager and serve it (``app_endpoint``) with uvicorn."""
    async with AsyncExitStack() as stack:
        for manager in managers:
            await stack.enter_async_context(manager)
        yield [
            await stack.enter_async_context(run_server(mount(app_endpoint, m))) for m in managers
        ]


async def hello(base: str, query: str = "") -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{base}/ws{query}", open_timeout=10)
    async with asyncio.timeout(10):
        welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws, welcome


async def detached(manager: SessionManager, session_id: str) -> None:
    async with asyncio.timeout(10):
        while session_id not in manager.detached:  # noqa: ASYNC110 - bounded; no event here
            await asyncio.sleep(0.01)


async def test_a_message_from_another_worker_reaches_a_detached_session_on_resume(
    redis_server: RedisServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(redis_server.url, prefix, 30)
    b, _ = worker(redis_server.url, prefix, 30)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(a)
        await stack.enter_async_context(b)
        server_a = await stack.enter_async_context(run_server(mount(app_endpoint, a)))
        ws, welcome = await hello(server_a.ws)
        sid = welcome["id"]
        assert await b.send(sid, {"n": 0}) in (SendResult.QUEUED, SendResult.DELIVERED)
        async with asyncio.timeout(10):
            first = json.loads(await ws.recv())
        assert first == {"seq": 1, "n": 0}
        reset_connection(ws)
        await detached(a, sid)
        for i in range(1, 4):  # through Redis to worker A, which keeps them for the replay
            assert await b.send(sid, {"n": i}) is SendResult.QUEUED
        back, again = await hello(server_a.ws, f"?resume={welcome['resume']}&last=1")
        assert again["resumed"] is True and again["id"] == sid
        async with asyncio.timeout(10):
            replay = [json.loads(await back.recv()) for _ in range(3)]
        assert replay == [{"seq": s, "n": s - 1} for s in (2, 3, 4)]
        await back.close()


async def test_a_resume_on_the_other_worker_gets_the_session_and_every_missed_message(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    """Cross-worker resumption: the session moves to worker B with its id, data and groups;
    messages sent while it was detached (from both workers) are replayed once, in order, then
    live traffic follows; its disconnect hooks run once, on B, when it ends there."""
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(any_redis.url, prefix, 30)
    b, recorder_b = worker(any_redis.url, prefix, 30)
    async with serving(a, b) as (server_a, server_b):
        ws, welcome = await hello(server_a.ws)
        sid = welcome["id"]
        assert await a.join(sid, "room")
        assert await a.send_group("room", {"n": 0}) == 1
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv()) == {"seq": 1, "n": 0}
        reset_connection(ws)
        await detached(a, sid)
        assert await a.send(sid, {"n": 1}) is SendResult.QUEUED
        assert await b.send(sid, {"n": 2}) is SendResult.QUEUED
        assert await b.send_group("room", {"n": 3}) == 1
        assert await a.broadcast({"n": 4}) == 1
        back, again = await hello(server_b.ws, f"?resume={welcome['resume']}&last=1")
        assert again["resumed"] is True and again["id"] == sid and again["replay"] == 4
        assert again["resume"] != welcome["resume"]
        async with asyncio.timeout(10):
            replay = [json.loads(await back.recv()) for _ in range(4)]
        assert replay == [{"seq": s, "n": s - 1} for s in (2, 3, 4, 5)]
        assert sid in b.local
        async with asyncio.timeout(10):  # A is told over pub/sub, on its own listener's time
            while sid in a.detached:  # noqa: ASYNC110 - bounded; no event for a dropped copy
                await asyncio.sleep(0.01)
        assert await b.members("room") == [sid]
        assert await a.send(sid, {"n": 5}) is SendResult.QUEUED  # A reaches it on B now
        await back.send("hello")
        async with asyncio.timeout(10):
            live = [json.loads(await back.recv()) for _ in range(2)]
        assert sorted(m["seq"] for m in live) == [6, 7]
        assert {"seq": 6, "n": 5} in live or {"seq": 7, "n": 5} in live
        await back.close()
        await recorder_b.wait_ended(1)
        assert recorder_b.ended_ids() == [sid]
        assert b.stats.resumed == 1
    assert recorder_a.ended_ids() == []
    assert recorder_a.connected == [sid] and recorder_b.connected == []


async def test_a_token_resumes_once_across_workers_and_the_window_ends_the_session_once(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(any_redis.url, prefix, 1.0)
    b, recorder_b = worker(any_redis.url, prefix, 1.0)
    async with serving(a, b) as (server_a, server_b):
        ws, welcome = await hello(server_a.ws)
        reset_connection(ws)
        await detached(a, welcome["id"])
        query = f"?resume={welcome['resume']}&last=0"
        # Two resumes with one token at once, one per worker: exactly one gets the session.
        (one, first), (two, second) = await asyncio.gather(
            hello(server_a.ws, query), hello(server_b.ws, query)
        )
        assert sorted([first["resumed"], second["resumed"]]) == [False, True]
        winner, loser = (one, two) if first["resumed"] else (two, one)
        won = first if first["resumed"] else second
        assert won["id"] == welcome["id"]
        await loser.close()
        # The winner drops too and never comes back: one ending, when its window runs out.
        reset_connection(winner)

        def ended() -> list[Any]:
            return [e for e in recorder_a.ended + recorder_b.ended if e[0] == welcome["id"]]

        async with asyncio.timeout(10):
            while not ended():  # noqa: ASYNC110 - bounded; the hooks run on either worker
                await asyncio.sleep(0.02)
        assert [e[1] for e in ended()] == [EndReason.RESUME_EXPIRED]
        # A used token gets a fresh session.
        again, fresh = await hello(server_b.ws, query)
        assert fresh["resumed"] is False and fresh["id"] != welcome["id"]
        await again.close()


async def presence_endpoint(websocket: Any) -> None:
    """Track every connection in ``lobby`` and subscribe it; the welcome carries the token."""
    from starlette.websockets import WebSocketDisconnect

    from wsession import get_session

    session = get_session(websocket)
    manager = websocket.scope["app"].state.manager
    await websocket.accept()
    if not session.resumed:
        await manager.presence.track(session, "lobby")
        await manager.presence.subscribe(session, "lobby")
    await websocket.send_json(
        {
            "type": "welcome",
            "id": session.id,
            "resume": session.resume_token,
            "resumed": session.resumed,
        }
    )
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass


async def next_diff(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == "presence_diff":
                return message  # type: ignore[no-any-return]


def ids_of(people: dict[str, dict[str, Any]]) -> set[str]:
    """Session ids in a default-rendered diff's ``joins``/``leaves`` (person -> {id: meta})."""
    return {i for sessions in people.values() for i in sessions}


@pytest.mark.parametrize("resume_on", ["same worker", "other worker"])
async def test_a_resumed_session_causes_no_presence_change_on_another_worker(
    redis_server: RedisServer, resume_on: str
) -> None:
    """Issue 15 with Redis: a drop on worker A and a resume (on A, or on B where the
    subscriber is) shows the subscriber on worker B no leave and no join; a client that does
    not come back leaves once its window ran out."""
    prefix = f"resume-{secrets.token_hex(4)}"
    managers = []
    for _ in range(2):
        manager, _ = worker(redis_server.url, prefix, 2.0)
        managers.append(manager)
    a, b = managers
    async with AsyncExitStack() as stack:
        servers = []
        for manager in (a, b):
            await stack.enter_async_context(manager)
            app = mount(presence_endpoint, manager)
            app.state.manager = manager
            servers.append(await stack.enter_async_context(run_server(app)))
        server_a, server_b = servers
        watcher, _ = await hello(server_b.ws)
        flapper, welcome = await hello(server_a.ws)
        joined = await next_diff(watcher)
        while welcome["id"] not in ids_of(joined["joins"]):  # the watcher's own join first
            joined = await next_diff(watcher)
        reset_connection(flapper)
        await detached(a, welcome["id"])
        target = server_a if resume_on == "same worker" else server_b
        back, again = await hello(target.ws, f"?resume={welcome['resume']}&last=0")
        assert again["id"] == welcome["id"] and again["resumed"] is True
        # A marker joins after the resume: diffs are ordered, so a leave or join of the
        # flapper would arrive before (or with) the marker's join.
        marker, marked = await hello(server_b.ws)
        diff = await next_diff(watcher)
        while marked["id"] not in ids_of(diff["joins"]):
            assert welcome["id"] not in ids_of(diff["joins"]) | ids_of(diff["leaves"])
            diff = await next_diff(watcher)
        assert welcome["id"] not in ids_of(diff["joins"]) | ids_of(diff["leaves"])
        # Gone for good: one leave, once the window (2 s) ran out.
        reset_connection(back)
        diff = await next_diff(watcher)
        while welcome["id"] not in ids_of(diff["leaves"]):
            diff = await next_diff(watcher)
        await marker.close()
        await watcher.close()


async def test_a_message_sent_while_another_worker_resumes_the_session_is_not_lost(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    """Between the claim in Redis (which moves the session to worker B) and the end of B's
    resume hooks, a message sent from worker A is recorded for B: B writes it after the
    replay, once."""
    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(any_redis.url, prefix, 30)
    b, _ = worker(any_redis.url, prefix, 30)
    sent: list[SendResult] = []

    @b.on_resume
    async def send_from_both(session: Any) -> None:
        sent.append(await a.send(session.id, {"n": "during"}))
        sent.append(await b.send(session.id, {"n": "during too"}))

    async with serving(a, b) as (server_a, server_b):
        ws, welcome = await hello(server_a.ws)
        reset_connection(ws)
        await detached(a, welcome["id"])
        assert await a.send(welcome["id"], {"n": "before"}) is SendResult.QUEUED
        back, again = await hello(server_b.ws, f"?resume={welcome['resume']}&last=0")
        assert again["resumed"] is True and sent == [SendResult.QUEUED] * 2
        async with asyncio.timeout(10):
            got = [json.loads(await back.recv()) for _ in range(3)]
        assert got == [
            {"seq": 1, "n": "before"},
            {"seq": 2, "n": "during"},
            {"seq": 3, "n": "during too"},
        ]
        await back.close()


async def test_forged_reused_expired_and_borrowed_tokens_get_a_fresh_session(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(any_redis.url, prefix, 1.0)
    b, recorder_b = worker(any_redis.url, prefix, 1.0)
    async with serving(a, b) as (server_a, server_b):
        x, x_welcome = await hello(server_a.ws)
        y, y_welcome = await hello(server_a.ws)
        reset_connection(x)
        await detached(a, x_welcome["id"])
        token = x_welcome["resume"]
        sid, nonce, mac = token.rsplit(".", 2)
        tries = {
            "forged": f"{sid}.{nonce}.{'A' * len(mac)}",
            "borrowed": f"{y_welcome['id']}.{nonce}.{mac}",  # X's token naming session Y
            "garbage": "not-a-token",
        }
        for what, bad in tries.items():
            other, fresh = await hello(server_b.ws, f"?resume={bad}&last=0")
            assert fresh["resumed"] is False, what
            assert fresh["id"] not in (x_welcome["id"], y_welcome["id"]), what
            await other.close()
        # The real token works once (on B); used again, on either worker, it gets nothing.
        back, again = await hello(server_b.ws, f"?resume={token}&last=0")
        assert again["resumed"] is True and again["id"] == x_welcome["id"]
        for server in (server_a, server_b):
            other, fresh = await hello(server.ws, f"?resume={token}&last=0")
            assert fresh["resumed"] is False and fresh["id"] != x_welcome["id"]
            await other.close()
        # Expired: X drops again and its window (1 s) runs out; then its new token is worthless.
        reset_connection(back)
        async with asyncio.timeout(10):
            while x_welcome["id"] not in recorder_a.ended_ids() + recorder_b.ended_ids():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        late, fresh = await hello(server_a.ws, f"?resume={again['resume']}&last=0")
        assert fresh["resumed"] is False and fresh["id"] != x_welcome["id"]
        await late.close()
        await y.close()
    ended = [e for e in recorder_a.ended + recorder_b.ended if e[0] == x_welcome["id"]]
    assert [e[1] for e in ended] == [EndReason.RESUME_EXPIRED]
    assert a.stats.resume_failed["unknown"] + b.stats.resume_failed["unknown"] >= 3
    assert b.stats.resume_failed["invalid"] == 3


async def test_a_client_behind_the_redis_journal_gets_a_fresh_session_and_the_old_ends_once(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    """The journal keeps ``resume_buffer`` messages: a client that missed more is never given
    a partial replay; the session it came back for ends once (``replay lost``)."""
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(any_redis.url, prefix, 30, resume_buffer=5)
    b, recorder_b = worker(any_redis.url, prefix, 30, resume_buffer=5)
    async with serving(a, b) as (server_a, server_b):
        ws, welcome = await hello(server_a.ws)
        reset_connection(ws)
        await detached(a, welcome["id"])
        for n in range(8):
            assert await b.send(welcome["id"], {"n": n}) is SendResult.QUEUED
        other, fresh = await hello(server_b.ws, f"?resume={welcome['resume']}&last=0")
        assert fresh["resumed"] is False and fresh["id"] != welcome["id"]
        assert b.stats.resume_failed["replay_lost"] == 1
        async with asyncio.timeout(10):
            while welcome["id"] not in recorder_a.ended_ids() + recorder_b.ended_ids():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert await b.send(welcome["id"], {"n": 9}) is SendResult.GONE
        await other.close()
    ended = [e for e in recorder_a.ended + recorder_b.ended if e[0] == welcome["id"]]
    assert [e[1] for e in ended] == [EndReason.REPLAY_LOST]


@asynccontextmanager
async def unsubscribed(
    url: str,
) -> AsyncIterator[tuple[SessionManager, SessionManager, ClientConnection, dict[str, Any]]]:
    """Workers A and B, a client on B, and B's pub/sub subscription down (as while it
    reconnects: Redis drops what is published meanwhile); B subscribes again at the end."""
    from redis.asyncio import Redis

    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(url, prefix, 30)
    b, _ = worker(url, prefix, 30)
    direct = Redis.from_url(url, decode_responses=True)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(direct.aclose)
        await stack.enter_async_context(a)
        await stack.enter_async_context(b)
        server_b = await stack.enter_async_context(run_server(mount(app_endpoint, b)))
        ws, welcome = await hello(server_b.ws)
        registry_b: Any = b.registry
        channel = f"{prefix}:ch:{registry_b.node_id}"
        registry_b._listener.cancel()
        async with asyncio.timeout(10):
            while (await direct.pubsub_numsub(channel))[0][1]:  # noqa: ASYNC110 - bounded
                await asyncio.sleep(0.02)
        try:
            yield a, b, ws, welcome
        finally:
            if registry_b._listener.done():
                registry_b._listener = asyncio.get_running_loop().create_task(registry_b._listen())
            await ws.close()


async def test_messages_published_while_a_worker_was_not_subscribed_reach_it_afterwards(
    redis_server: RedisServer,
) -> None:
    """Redis pub/sub keeps nothing: a message for worker B's session published while B's
    subscription was down is read from the session's journal once B subscribes again."""
    async with unsubscribed(redis_server.url) as (a, b, ws, welcome):
        assert await a.send(welcome["id"], {"n": "missed"}) is SendResult.QUEUED
        registry_b: Any = b.registry
        registry_b._listener = asyncio.get_running_loop().create_task(registry_b._listen())
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv()) == {"seq": 1, "n": "missed"}
        assert await a.send(welcome["id"], {"n": "live"}) is SendResult.QUEUED
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv()) == {"seq": 2, "n": "live"}


async def test_a_number_that_never_arrives_is_read_from_the_journal(
    redis_server: RedisServer,
) -> None:
    """Message 1 for B's session is lost in pub/sub; message 2 (from B itself) is not written
    before it: B reads 1 from the journal (after a short wait), then writes 1 and 2."""
    async with unsubscribed(redis_server.url) as (a, b, ws, welcome):
        assert await a.send(welcome["id"], {"n": 1}) is SendResult.QUEUED  # lost in pub/sub
        assert await b.send(welcome["id"], {"n": 2}) is SendResult.QUEUED  # waits for 1
        async with asyncio.timeout(10):
            got = [json.loads(await ws.recv()) for _ in range(2)]
        assert got == [{"seq": 1, "n": 1}, {"seq": 2, "n": 2}]


async def test_a_detached_session_is_kicked_or_revoked_from_any_worker_once(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(any_redis.url, prefix, 30)
    b, recorder_b = worker(any_redis.url, prefix, 30)
    for manager in (a, b):

        @manager.on_connect
        def user_from_query(session: Any) -> None:
            session.user_key = session.query_params.get("user")

    async with serving(a, b) as (server_a, server_b):
        kicked, k_welcome = await hello(server_a.ws, "?user=kim")
        revoked, r_welcome = await hello(server_b.ws, "?user=rey")
        reset_connection(kicked)
        reset_connection(revoked)
        await detached(a, k_welcome["id"])
        await detached(b, r_welcome["id"])
        assert await b.close(k_welcome["id"], 4000, "kicked") is True  # parked on A
        # Answered: B ends it, and what Redis kept for B in case of a lost answer is gone at
        # once (a worker healing B would end it a second time).
        from wsession.backends.redis import RedisRegistry

        registry_b = b.registry
        assert isinstance(registry_b, RedisRegistry)
        assert await registry_b.redis.exists(registry_b._keys.taken(registry_b.node_id)) == 0
        assert await b.revoke_user("rey") == 1  # parked on B itself
        async with asyncio.timeout(10):
            while len(recorder_a.ended + recorder_b.ended) < 2:  # noqa: ASYNC110 - bounded
                await asyncio.sleep(0.02)
        ended = {e[0]: e[1:] for e in recorder_a.ended + recorder_b.ended}
        assert ended == {
            k_welcome["id"]: (EndReason.SERVER_CLOSED, 4000, "kicked"),
            r_welcome["id"]: (EndReason.SERVER_CLOSED, 4403, "revoked"),
        }
        # Their tokens are worthless now, and A's copy of the kicked one ends quietly.
        for token in (k_welcome["resume"], r_welcome["resume"]):
            other, fresh = await hello(server_a.ws, f"?resume={token}&last=0")
            assert fresh["resumed"] is False
            await other.close()
        assert await a.count_detached() == 0
        assert await b.close(k_welcome["id"]) is False
    assert len(recorder_a.ended + recorder_b.ended) == 4  # the two above, and the two fresh


async def test_numbers_go_on_after_redis_lost_its_data(own_redis_server: RedisServer) -> None:
    """A Redis restart without persistence loses the journals and their counters: the worker
    writes its sessions again with the last number it gave, so numbering goes on from there
    (a restart at 1 would look like duplicates to a client and be dropped)."""
    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(own_redis_server.url, prefix, 30)
    async with serving(a) as (server_a,):
        ws, welcome = await hello(server_a.ws)
        for n in range(3):
            assert await a.send(welcome["id"], {"n": n}) in (
                SendResult.QUEUED,
                SendResult.DELIVERED,
            )
        async with asyncio.timeout(10):
            assert [json.loads(await ws.recv())["seq"] for _ in range(3)] == [1, 2, 3]
        own_redis_server.restart()  # empty again
        from redis.asyncio import Redis

        direct = Redis.from_url(own_redis_server.url, decode_responses=True)
        registry: Any = a.registry
        try:
            async with asyncio.timeout(15):
                # The heartbeat notices (its lease is gone) and writes the session again.
                while not (  # noqa: ASYNC110 - another client's state
                    registry.available and await direct.exists(f"{prefix}:s:{welcome['id']}")
                ):
                    await asyncio.sleep(0.05)
        finally:
            await direct.aclose()
        assert await a.send(welcome["id"], {"n": 3}) in (SendResult.QUEUED, SendResult.DELIVERED)
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv()) == {"seq": 4, "n": 3}
        await ws.close()


async def test_a_refused_resume_on_another_worker_leaves_the_session_waiting_in_redis(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    """A resume hook on worker B refuses: the claim is undone (the session waits in Redis
    again, same token, its messages kept); the next resume, on A, gets it with everything."""
    from wsession import Refuse

    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(any_redis.url, prefix, 30)
    b, recorder_b = worker(any_redis.url, prefix, 30)

    @b.on_resume
    def refuse(session: Any) -> None:
        raise Refuse(403, reason="not now")

    async with serving(a, b) as (server_a, server_b):
        ws, welcome = await hello(server_a.ws)
        reset_connection(ws)
        await detached(a, welcome["id"])
        assert await b.send(welcome["id"], {"n": 1}) is SendResult.QUEUED
        query = f"?resume={welcome['resume']}&last=0"
        with pytest.raises(Exception, match="403"):
            await connect(f"{server_b.ws}/ws{query}", open_timeout=10)
        async with asyncio.timeout(10):
            while await a.count_detached() != 1:  # noqa: ASYNC110 - parked again in Redis
                await asyncio.sleep(0.02)
        assert await b.send(welcome["id"], {"n": 2}) is SendResult.QUEUED
        back, again = await hello(server_a.ws, query)
        assert again["resumed"] is True and again["id"] == welcome["id"]
        async with asyncio.timeout(10):
            got = [json.loads(await back.recv()) for _ in range(2)]
        assert got == [{"seq": 1, "n": 1}, {"seq": 2, "n": 2}]
        await back.close()
    assert recorder_b.ended == []


@asynccontextmanager
async def behind_a_holding_proxy(
    redis_server: RedisServer, prefix: str, window: float
) -> AsyncIterator[tuple[SessionManager, HookRecorder, Any]]:
    """A resumable worker whose Redis traffic passes a ``HoldingProxy`` (command_timeout 0.5 s),
    its hooks recorded; yields it, its recorder and the proxy."""
    from wsession.backends.redis import RedisRegistry

    from .test_redis_sweep import HoldingProxy

    proxy = HoldingProxy(redis_server.port)
    await proxy.start()
    registry = RedisRegistry(proxy.url, prefix=prefix, heartbeat=0.5, command_timeout=0.5)
    manager = SessionManager(
        registry=registry,
        resume_window=window,
        resume_seq_field="seq",
        resume_secret="s" * 32,
        drain_on_signal=False,
    )
    recorder = HookRecorder()
    recorder.install(manager)
    try:
        yield manager, recorder, proxy
    finally:
        proxy.flowing.set()
        await proxy.close()


async def hold_end_detached_replies(
    redis_server: RedisServer, manager: SessionManager, proxy: Any
) -> Callable[[], None]:
    """From now on the replies to ``manager``'s END_DETACHED wait in ``proxy`` (Redis runs it:
    the script is loaded, and connections are open, else the held reply would be NOSCRIPT or
    a new connection's handshake). Returns what stops it (the proxy still holds)."""
    from redis.asyncio import Redis

    from wsession.backends.redis import RedisRegistry

    registry = manager.registry
    assert isinstance(registry, RedisRegistry)
    end_detached = registry._scripts["END_DETACHED"]
    direct = Redis.from_url(redis_server.url)
    try:
        await direct.script_load(end_detached.script)
    finally:
        await direct.aclose()

    async def end_and_hold_the_reply(**kwargs: Any) -> Any:
        proxy.flowing.clear()
        return await end_detached(**kwargs)

    registry._scripts["END_DETACHED"] = end_and_hold_the_reply
    await asyncio.gather(*(registry.redis.ping() for _ in range(4)))

    def stop() -> None:
        registry._scripts["END_DETACHED"] = end_detached

    return stop


async def test_a_window_whose_end_in_redis_answers_too_late_still_ends_the_session(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A's detached session's window runs out; A ends it in Redis (END_DETACHED), but the reply
    comes after command_timeout (a Redis that stalled after running it). Its disconnect hooks
    must still run, once."""
    prefix = f"resume-late-end-{secrets.token_hex(4)}"
    async with behind_a_holding_proxy(redis_server, prefix, 1.0) as (a, recorder, proxy):
        async with serving(a) as (server,):
            ws, welcome = await hello(server.ws)
            stop_holding = await hold_end_detached_replies(redis_server, a, proxy)
            reset_connection(ws)
            await detached(a, welcome["id"])
            async with asyncio.timeout(10):  # the window ends; the end in Redis times out
                while not any(  # noqa: ASYNC110 - bounded; a log record, no event
                    "could not end detached" in r.getMessage() for r in caplog.records
                ):
                    await asyncio.sleep(0.02)
            stop_holding()
            proxy.flowing.set()
            async with asyncio.timeout(5):
                while not recorder.ended:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.02)
            assert [e[:2] for e in recorder.ended] == [(welcome["id"], EndReason.RESUME_EXPIRED)]
        assert len(recorder.ended) == 1


async def test_a_kick_of_a_detached_session_whose_answer_is_lost_still_ends_it_once(
    redis_server: RedisServer,
) -> None:
    """B closes a session parked on A (a kick); Redis ends it, but B's reply comes after
    command_timeout, so the kick fails there. The session's hooks still run, once, with the
    kick's code and reason, and A's copy ends quietly."""
    from wsession import RegistryUnavailable

    prefix = f"resume-late-kick-{secrets.token_hex(4)}"
    a, recorder_a = worker(redis_server.url, prefix, 30)
    async with behind_a_holding_proxy(redis_server, prefix, 30) as (b, recorder_b, proxy):
        async with serving(a, b) as (server_a, _):
            ws, welcome = await hello(server_a.ws)
            reset_connection(ws)
            await detached(a, welcome["id"])
            stop_holding = await hold_end_detached_replies(redis_server, b, proxy)
            with pytest.raises(RegistryUnavailable):
                await b.close(welcome["id"], 4000, "kicked")
            stop_holding()
            proxy.flowing.set()
            async with asyncio.timeout(5):
                while not recorder_a.ended + recorder_b.ended:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.02)
            assert recorder_b.ended == [(welcome["id"], EndReason.SERVER_CLOSED, 4000, "kicked")]
            async with asyncio.timeout(5):
                while welcome["id"] in a.detached:  # noqa: ASYNC110 - bounded; A is told
                    await asyncio.sleep(0.02)
        assert recorder_a.ended == []
        assert len(recorder_b.ended) == 1


async def test_a_kick_that_never_reached_redis_leaves_the_session_resumable_with_its_copy(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A kicks a session it parked, but the END_DETACHED request never reaches Redis (its
    connection failed first), so the session still waits there, within its window. Its client
    resumes it on A and gets A's own copy back (live data), as any same-worker resume does;
    its hooks run once, when it ends for good."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from wsession.backends.redis import LinkState, RedisRegistry

    prefix = f"resume-unsent-kick-{secrets.token_hex(4)}"
    async with behind_a_holding_proxy(redis_server, prefix, 30) as (a, recorder, _):
        originals: list[Any] = []
        a.on_connect(originals.append)
        registry = a.registry
        assert isinstance(registry, RedisRegistry)
        async with serving(a) as (server,):
            ws, welcome = await hello(server.ws)
            reset_connection(ws)
            await detached(a, welcome["id"])
            end_detached = registry._scripts["END_DETACHED"]

            async def never_sent(**kwargs: Any) -> Any:
                raise RedisConnectionError("the request never left (a test)")

            registry._scripts["END_DETACHED"] = never_sent
            assert await a.close(welcome["id"], 4000, "kicked") is True
            async with asyncio.timeout(10):
                while not any(  # noqa: ASYNC110 - bounded; a log record, no event
                    "could not end detached" in r.getMessage() for r in caplog.records
                ):
                    await asyncio.sleep(0.02)
            registry._scripts["END_DETACHED"] = end_detached
            async with asyncio.timeout(10):
                while registry.state is not LinkState.AVAILABLE:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.02)
            again, resumed = await hello(server.ws, f"?resume={welcome['resume']}&last=0")
            assert resumed["resumed"] is True and resumed["id"] == welcome["id"]
            assert await a.get(welcome["id"]) is originals[0]
            assert recorder.ended == []
            await again.close()
            async with asyncio.timeout(5):
                while not recorder.ended:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.02)
        assert [e[0] for e in recorder.ended] == [welcome["id"]]
