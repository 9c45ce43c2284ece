"""Reaching connections on a real server: send by id, groups, user keys, broadcast, kick,
ordering under concurrency, and the slow-consumer bound."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect

from example_app import create_app
from example_app.app import Member
from wsession import (
    EndReason,
    SendResult,
    Session,
    SessionManager,
    SlowConsumerPolicy,
    get_session,
)

from .support import (
    HookRecorder,
    Server,
    mount,
    next_of,
    read_until_closed,
    recorded,
    reset_connection,
    run_server,
)

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def example() -> AsyncIterator[tuple[Server, SessionManager, HookRecorder]]:
    manager, recorder = recorded(data_model=Member)
    async with run_server(create_app(manager)) as server:
        yield server, manager, recorder


async def join_as(server: Server, name: str) -> tuple[ClientConnection, str]:
    ws = await connect(f"{server.ws}/ws?name={name}")
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws, welcome["id"]


async def test_direct_message_between_two_clients() -> None:
    async with example() as (server, _, _):
        alice, alice_id = await join_as(server, "alice")
        bob, bob_id = await join_as(server, "bob")
        await alice.send(json.dumps({"type": "dm", "to": bob_id, "text": "hi bob"}))
        dm = await next_of(bob, "dm")
        assert dm == {"type": "dm", "from": alice_id, "name": "alice", "text": "hi bob"}
        await alice.close()
        await bob.close()


async def test_http_to_websocket_send_and_gone_ids() -> None:
    async with example() as (server, manager, recorder), httpx.AsyncClient() as http:
        ws, sid = await join_as(server, "carol")
        response = await http.post(f"{server.http}/api/send/{sid}", json={"text": "from http"})
        assert response.status_code == 200
        assert await next_of(ws, "dm") == {"type": "dm", "from": "server", "text": "from http"}
        assert (
            await http.post(f"{server.http}/api/send/nope", json={"text": "x"})
        ).status_code == 404
        assert (await http.post(f"{server.http}/api/send/{sid}", json={"t": 1})).status_code == 400
        await ws.close()
        await recorder.wait_ended(1)
        # A closed id: "gone", no exception, 404 over HTTP.
        assert await manager.send(sid, "late") is SendResult.GONE
        assert (
            await http.post(f"{server.http}/api/send/{sid}", json={"text": "x"})
        ).status_code == 404


async def test_broadcast_and_groups_over_the_example_contract() -> None:
    async with example() as (server, manager, _):
        a, a_id = await join_as(server, "a")
        b, b_id = await join_as(server, "b")
        c, _ = await join_as(server, "c")
        for ws in (a, b):
            await ws.send(json.dumps({"type": "join", "group": "room1"}))
            assert await next_of(ws, "joined") == {"type": "joined", "group": "room1"}
        assert sorted(await manager.members("room1")) == sorted([a_id, b_id])
        await a.send(json.dumps({"type": "group", "group": "room1", "text": "to room"}))
        for ws in (a, b):
            message = await next_of(ws, "group")
            assert message == {
                "type": "group",
                "group": "room1",
                "from": a_id,
                "name": "a",
                "text": "to room",
            }
        await b.send(json.dumps({"type": "broadcast", "text": "all"}))
        for ws in (a, b, c):
            assert (await next_of(ws, "broadcast"))["from"] == b_id
        await b.send(json.dumps({"type": "leave", "group": "room1"}))
        assert await next_of(b, "left") == {"type": "left", "group": "room1"}
        assert await manager.members("room1") == [a_id]
        for ws in (a, b, c):
            await ws.close()


async def test_group_membership_is_cleaned_after_every_kind_of_ending() -> None:
    async with example() as (server, manager, recorder), httpx.AsyncClient() as http:
        clients = [await join_as(server, f"u{i}") for i in range(4)]
        for ws, _ in clients:
            await ws.send(json.dumps({"type": "join", "group": "g"}))
            await next_of(ws, "joined")
        assert len(await manager.members("g")) == 4
        (closer, _), (resetter, _), (kicked, kicked_id), (last, _) = clients
        await closer.close()
        reset_connection(resetter)
        assert (await http.post(f"{server.http}/api/kick/{kicked_id}")).status_code == 200
        closed = await read_until_closed(kicked)
        assert closed is not None and closed.code == 4000
        await recorder.wait_ended(3)
        assert len(await manager.members("g")) == 1
        await last.close()
        await recorder.wait_ended(4)
        assert await manager.members("g") == []
        assert manager.registry._groups == {}  # type: ignore[attr-defined]


async def test_user_key_reaches_every_tab_and_close_user() -> None:
    async with example() as (server, manager, recorder):
        tab1, id1 = await join_as(server, "dora")
        tab2, id2 = await join_as(server, "dora")
        other, _ = await join_as(server, "eve")
        assert sorted(await manager.user_sessions("dora")) == sorted([id1, id2])
        assert await manager.send_user("dora", {"type": "note", "text": "both tabs"}) == 2
        for ws in (tab1, tab2):
            assert (await next_of(ws, "note"))["text"] == "both tabs"
        assert await manager.close_user("dora", 4000, "bye dora") == 2
        for ws in (tab1, tab2):
            assert (await read_until_closed(ws)).code == 4000
        await recorder.wait_ended(2)
        assert await manager.user_sessions("dora") == []
        assert {r for _, r, _, _ in recorder.ended} == {EndReason.SERVER_CLOSED}
        await other.close()


async def test_kick_runs_disconnect_hooks_once() -> None:
    async with example() as (server, manager, recorder), httpx.AsyncClient() as http:
        ws, sid = await join_as(server, "frank")
        assert (await http.post(f"{server.http}/api/kick/{sid}")).status_code == 200
        assert (await read_until_closed(ws)).reason == "kicked"
        await recorder.wait_ended(1)
        assert recorder.ended == [(sid, EndReason.SERVER_CLOSED, 4000, "kicked")]
        assert (await http.post(f"{server.http}/api/kick/{sid}")).status_code == 404
        assert manager.stats.ended == 1


def kickable_app(manager: SessionManager) -> Starlette:
    """An app that never reads: only a forced end can finish a kicked session."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        await asyncio.Event().wait()

    return mount(endpoint, manager)


async def test_kick_ends_an_app_that_never_reads() -> None:
    manager, recorder = recorded(close_timeout=0.2)
    async with run_server(kickable_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws")
        sid = str(await ws.recv())
        assert await manager.close(sid, 4001, "go away")
        await recorder.wait_ended(1)
        assert recorder.ended == [(sid, EndReason.SERVER_CLOSED, 4001, "go away")]
        assert await manager.count() == 0
        await ws.close()


def counting_echo_app(manager: SessionManager) -> Starlette:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(json.dumps({"id": get_session(ws).id}))
        try:
            while True:
                text = await ws.receive_text()
                await ws.send_text(json.dumps({"echo": text}))
        except WebSocketDisconnect:
            pass

    return mount(endpoint, manager)


async def test_concurrent_senders_keep_order_and_never_interleave() -> None:
    """50 tasks x 200 numbered messages to one connection while it also echoes."""
    manager = SessionManager()
    async with run_server(counting_echo_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws", max_queue=None)
        sid = json.loads(await ws.recv())["id"]

        async def sender(n: int) -> None:
            for i in range(200):
                result = await manager.send(sid, {"s": n, "i": i})
                assert result in (SendResult.DELIVERED, SendResult.QUEUED)
                if i % 20 == 0:
                    await asyncio.sleep(0)  # let the others run: real interleaving

        async def echoer() -> None:
            for i in range(100):
                await ws.send(f"e{i}")

        async with asyncio.timeout(60):
            await asyncio.gather(*(sender(n) for n in range(50)), echoer())
            last_seen = [-1] * 50
            echoes: list[str] = []
            while sum(1 for v in last_seen if v == 199) < 50 or len(echoes) < 100:
                message = json.loads(await ws.recv())  # a torn frame would not parse
                if "echo" in message:
                    echoes.append(message["echo"])
                    continue
                assert message["i"] == last_seen[message["s"]] + 1, message
                last_seen[message["s"]] = message["i"]
        assert echoes == [f"e{i}" for i in range(100)]
        await ws.close()


async def test_slow_consumer_is_bounded_and_closed() -> None:
    manager, recorder = recorded(max_backlog=8, slow_consumer=SlowConsumerPolicy.CLOSE)
    biggest_backlog = 0
    async with run_server(kickable_app(manager)) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning
        sock.connect(("127.0.0.1", server.port))
        ws = await connect(f"{server.ws}/ws", sock=sock, max_queue=1, compression=None)
        sid = str(await ws.recv())
        session = await manager.get(sid)
        assert session is not None
        payload = "x" * 65536
        results: list[SendResult] = []
        async with asyncio.timeout(20):
            for _ in range(2000):  # bounded; the policy fires long before
                result = await manager.send(sid, payload)
                results.append(result)
                biggest_backlog = max(biggest_backlog, session.backlog)
                if result is SendResult.GONE:
                    break
                await asyncio.sleep(0)
        assert results[-1] is SendResult.GONE
        assert SendResult.QUEUED in results
        assert biggest_backlog <= 8
        await recorder.wait_ended(1)
        assert recorder.ended[0][1:3] == (EndReason.SERVER_CLOSED, 1013)
        assert manager.stats.slow_consumers == 1
        reset_connection(ws)


async def test_drop_policy_drops_instead_of_growing() -> None:
    manager = SessionManager(
        max_backlog=4, slow_consumer=SlowConsumerPolicy.DROP, close_timeout=0.1
    )
    recorder = HookRecorder()
    recorder.install(manager)
    async with run_server(kickable_app(manager)) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", server.port))
        ws = await connect(f"{server.ws}/ws", sock=sock, max_queue=1, compression=None)
        sid = str(await ws.recv())
        async with asyncio.timeout(20):
            for _ in range(2000):
                if await manager.send(sid, "y" * 65536) is SendResult.DROPPED:
                    break
                await asyncio.sleep(0)
        assert manager.stats.dropped == 1
        session = await manager.get(sid)
        assert session is not None
        assert session.backlog == 4
        assert session.state.value == "open"  # dropping keeps the session
        reset_connection(ws)
        assert await manager.close(sid)  # the app never reads: end it so the server can stop
        await recorder.wait_ended(1)


@pytest.mark.slow
async def test_broadcast_reaches_1000_real_connections() -> None:
    manager = SessionManager(close_timeout=0.5)
    async with run_server(kickable_app(manager), backlog=2048) as server:
        async with asyncio.timeout(90):
            clients = await asyncio.gather(
                *(connect(f"{server.ws}/ws", open_timeout=30) for _ in range(1000))
            )
            for ws in clients:
                await ws.recv()
            assert await manager.broadcast({"type": "all"}) == 1000
            received = await asyncio.gather(*(ws.recv() for ws in clients))
        assert all(json.loads(m) == {"type": "all"} for m in received)
        for session in await manager.sessions():  # the app never reads: end it from here
            await manager.close(session.id)
        await asyncio.gather(*(ws.close() for ws in clients))


async def test_session_object_api_on_a_live_connection() -> None:
    manager = SessionManager(close_timeout=0.1)
    got: list[Session] = []

    @manager.on_connect
    def remember(session: Session) -> None:
        got.append(session)

    async with run_server(kickable_app(manager)) as server, connect(f"{server.ws}/ws") as ws:
        await ws.recv()
        await got[0].send_json({"k": 1})
        assert json.loads(await ws.recv()) == {"k": 1}
        assert await manager.join(got[0].id, "solo")
        assert not await manager.join("unknown", "solo")
        with pytest.raises(ValueError, match="group"):
            await manager.join(got[0].id, "")
        assert await manager.close(got[0].id)
