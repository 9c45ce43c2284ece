"""Session resumption (issue 14), driven step by step through the deterministic fake server.

A client whose connection is lost comes back with its resume token and the last sequence number
it processed: it gets the same session and exactly what it missed, or a new session and
``resumed: false`` (never a partial replay). Disconnect hooks run once per session, whatever
happens in between.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    ConfigurationError,
    EndReason,
    Refuse,
    SendResult,
    Session,
    SessionManager,
    SessionState,
    get_session,
)
from wsession.testing import ManualClock

from .fake_server import FakeClient, FakeServer
from .support import HookRecorder, mount

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

WINDOW = 60.0


async def app_endpoint(websocket: WebSocket) -> None:
    """The shape of the example: an unnumbered welcome (raw send) carrying the token, then
    numbered replies through the session."""
    session = get_session(websocket)
    await websocket.accept()
    await websocket.send_json(
        {
            "type": "welcome",
            "id": session.id,
            "resume": session.resume_token,
            "resumed": session.resumed,
            "replay": session.pending_replay,
        }
    )
    try:
        while True:
            text = await websocket.receive_text()
            await session.send_json({"type": "echo", "text": text})
    except WebSocketDisconnect:
        pass


def make(**settings: Any) -> tuple[SessionManager, HookRecorder, FakeServer]:
    settings.setdefault("resume_window", WINDOW)
    settings.setdefault("resume_seq_field", "seq")
    manager = SessionManager(**settings)
    recorder = HookRecorder()
    recorder.install(manager)
    return manager, recorder, FakeServer(mount(app_endpoint, manager))


def received(client: FakeClient) -> list[dict[str, Any]]:
    return [json.loads(text) for text in client.data if isinstance(text, str)]


def welcome(client: FakeClient) -> dict[str, Any]:
    first = received(client)[0]
    assert first["type"] == "welcome"
    return first


def seqs(client: FakeClient) -> list[int]:
    return [m["seq"] for m in received(client) if "seq" in m]


async def connect(
    server: FakeServer, tg: Any, token: str | None = None, last: int | None = None
) -> FakeClient:
    query = b""
    if token is not None:
        query = f"resume={token}&last={last if last is not None else 0}".encode()
    client = await server.connect(tg, query_string=query)
    await client.wait_for(lambda: client.done.is_set() or len(client.data) >= 1)
    return client


async def settle() -> None:
    await wait_all_tasks_blocked()


async def lost(manager: SessionManager, server: FakeServer, tg: Any) -> dict[str, Any]:
    """Connect, drop the connection without a close frame, wait until the session detached;
    the welcome the client got."""
    client = await connect(server, tg)
    hello = welcome(client)
    client.drop()
    await detached(manager, hello["id"])
    return hello


async def detached(manager: SessionManager, session_id: str) -> Session:
    with anyio.fail_after(5):
        while session_id not in manager.detached:
            await wait_all_tasks_blocked()
    return manager.detached[session_id]


# -- the contract ------------------------------------------------------------------------------


async def test_a_dropped_client_resumes_with_exactly_what_it_missed() -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        first = await connect(server, tg)
        hello = welcome(first)
        sid = hello["id"]
        assert hello["resumed"] is False and hello["resume"]
        for i in range(3):
            assert await manager.send(sid, {"n": i}) is SendResult.DELIVERED
        assert seqs(first) == [1, 2, 3]
        first.drop()  # TCP gone, no close frame (uvicorn: 1005)
        session = await detached(manager, sid)
        assert session.state is SessionState.DETACHED
        # Sent while the client is away: kept, reported as queued, numbered on.
        for i in range(3, 6):
            assert await manager.send(sid, {"n": i}) is SendResult.QUEUED
        assert await manager.count() == 1 and recorder.ended == []

        second = await connect(server, tg, hello["resume"], last=2)
        await second.wait_for(lambda: len(second.data) >= 5)
        again = welcome(second)
        assert again["id"] == sid and again["resumed"] is True
        assert again["resume"] != hello["resume"]  # rotated
        assert again["replay"] == 4 and hello["replay"] == 0  # seq 3..6 follow
        # Welcome first, then every message after 2 once and in order, then live traffic.
        assert seqs(second) == [3, 4, 5, 6]
        assert [m.get("n") for m in received(second)[1:]] == [2, 3, 4, 5]
        assert await manager.send(sid, {"n": 6}) is SendResult.DELIVERED
        second.say("hi")
        await second.wait_for(lambda: len(second.data) >= 7)
        assert seqs(second) == [3, 4, 5, 6, 7, 8]
        assert manager.stats.accepted == 1 and manager.stats.resumed == 1
        assert manager.stats.detached == 1
        second.close(1000)
    assert recorder.connected == [sid]
    assert recorder.ended == [(sid, EndReason.CLIENT_CLOSED, 1000, None)]


async def test_sequence_numbers_never_reset_across_resumes() -> None:
    manager, _, server = make()
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        token, sid, last = welcome(client)["resume"], welcome(client)["id"], 0
        for _ in range(3):
            await manager.send(sid, {"x": 1})
            await client.wait_for(lambda c=client: len(c.data) >= 2)  # type: ignore[misc]
            last = seqs(client)[-1]
            client.drop()
            await detached(manager, sid)
            client = await connect(server, tg, token, last)
            token = welcome(client)["resume"]
            assert welcome(client)["resumed"] is True
        assert last == 3
        await manager.send(sid, {"x": 1})
        await client.wait_for(lambda: len(client.data) >= 2)
        assert seqs(client) == [4]
        client.close()


async def test_the_window_runs_out_and_the_disconnect_hooks_run_once() -> None:
    with ManualClock() as clock:
        manager, recorder, server = make()
        async with anyio.create_task_group() as tg:
            hello = await lost(manager, server, tg)
            clock.advance(WINDOW - 1)
            await settle()
            assert recorder.ended == [] and hello["id"] in manager.detached
            clock.advance(1)
            await recorder.wait_ended(1)
            assert recorder.reasons() == [EndReason.RESUME_EXPIRED]
            await settle()  # unregistered right after the hooks
            assert await manager.count() == 0 and not manager.detached
            # The token is worthless now: a new session, told so.
            late = await connect(server, tg, hello["resume"], 0)
            assert welcome(late)["resumed"] is False and welcome(late)["id"] != hello["id"]
            assert manager.stats.resume_failed["unknown"] == 1
            late.close()
        await recorder.wait_ended(2)
        assert recorder.ended_ids().count(hello["id"]) == 1


async def test_an_overflowing_buffer_ends_the_session_once_and_resumes_fresh() -> None:
    manager, recorder, server = make(resume_buffer=4)
    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        results = [await manager.send(hello["id"], {"n": i}) for i in range(6)]
        assert results[:4] == [SendResult.QUEUED] * 4
        assert results[4] is SendResult.GONE
        await recorder.wait_ended(1)
        assert recorder.reasons() == [EndReason.REPLAY_LOST]
        fresh = await connect(server, tg, hello["resume"], 0)
        assert welcome(fresh)["resumed"] is False
        fresh.close()
    await recorder.wait_ended(2)
    assert recorder.ended_ids().count(hello["id"]) == 1


async def test_a_client_behind_the_buffer_gets_a_fresh_session_never_a_partial_replay() -> None:
    manager, recorder, server = make(resume_buffer=3)
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        for i in range(5):  # while connected the ring keeps only the last 3 (seq 3, 4, 5)
            await manager.send(hello["id"], {"n": i})
        client.drop()
        await detached(manager, hello["id"])
        behind = await connect(server, tg, hello["resume"], last=1)  # needs 2..5: 2 is gone
        assert welcome(behind)["resumed"] is False
        await recorder.wait_ended(1)  # its token was used: the old session ends now
        assert recorder.reasons() == [EndReason.REPLAY_LOST]
        assert manager.stats.resume_failed["replay_lost"] == 1
        behind.close()


@pytest.mark.parametrize("how", ["forged", "reused", "other_id", "garbage", "future_last"])
async def test_bad_tokens_get_a_fresh_session(how: str) -> None:
    manager, _, server = make()
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        token, last = hello["resume"], 0
        client.drop()
        await detached(manager, hello["id"])
        if how == "forged":
            sid, nonce, mac = token.rsplit(".", 2)
            token = f"{sid}.{nonce}.{mac[:-2]}AA"
        elif how == "other_id":
            sid, nonce, mac = token.rsplit(".", 2)
            token = f"{'x' * len(sid)}.{nonce}.{mac}"
        elif how == "garbage":
            token = "not-a-token"
        elif how == "future_last":
            last = 99
        elif how == "reused":
            ok = await connect(server, tg, token, 0)
            assert welcome(ok)["resumed"] is True
            ok.drop()
            await detached(manager, hello["id"])
        attempt = await connect(server, tg, token, last)
        assert welcome(attempt)["resumed"] is False
        assert welcome(attempt)["id"] != hello["id"]
        if how != "future_last":
            # A bad token does not harm the session it names: it still waits.
            assert hello["id"] in manager.detached
        attempt.close()
        tg.cancel_scope.cancel()


async def test_two_concurrent_resumes_exactly_one_wins() -> None:
    manager, recorder, server = make()

    async def slow_auth(session: Session) -> None:
        await (
            anyio.lowlevel.checkpoint()
        )  # both claims are in flight before either finishes its hooks

    manager.on_resume(slow_auth)
    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        query = f"resume={hello['resume']}&last=0".encode()
        a = await server.connect(tg, query_string=query)
        b = await server.connect(tg, query_string=query)
        await a.wait_for(lambda: len(a.data) >= 1)
        await b.wait_for(lambda: len(b.data) >= 1)
        outcomes = sorted([welcome(a)["resumed"], welcome(b)["resumed"]])
        assert outcomes == [False, True]
        ids = {welcome(a)["id"], welcome(b)["id"]}
        assert hello["id"] in ids and len(ids) == 2
        a.close()
        b.close()
    assert recorder.ended_ids().count(hello["id"]) == 1


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        ("client_close", EndReason.CLIENT_CLOSED),
        ("kick", EndReason.SERVER_CLOSED),
    ],
)
async def test_endings_that_are_not_resumable_end_the_session(
    ending: str, reason: EndReason
) -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        if ending == "client_close":
            client.close(1000)
        else:
            assert await manager.close(hello["id"], 4000, "kicked")
        await recorder.wait_ended(1)
        assert recorder.reasons() == [reason] and not manager.detached
        assert manager.stats.detached == 0


async def test_kicking_or_revoking_a_detached_session_ends_it_and_refuses_its_resume() -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        assert await manager.revoke_session(hello["id"]) is True
        await recorder.wait_ended(1)
        assert recorder.ended == [(hello["id"], EndReason.SERVER_CLOSED, 4403, "revoked")]
        again = await connect(server, tg, hello["resume"], 0)
        assert welcome(again)["resumed"] is False
        again.close()


async def test_a_resume_hook_authenticates_and_a_refusal_leaves_the_session_waiting() -> None:
    manager, recorder, server = make()

    @manager.on_resume
    def check(session: Session) -> None:
        if session.headers.get("authorization") != "Bearer ok":
            raise Refuse(403, reason="who are you")

    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        query = f"resume={hello['resume']}&last=0".encode()
        thief = await server.connect(tg, query_string=query)
        await thief.wait_for(lambda: thief.done.is_set())
        assert thief.frames[0]["type"] == "websocket.http.response.start"
        assert thief.frames[0]["status"] == 403
        assert hello["id"] in manager.detached  # still waiting for its real client
        assert manager.stats.resume_failed["refused"] == 1
        await manager.send(hello["id"], {"while": "refused"})
        owner = await server.connect(
            tg,
            query_string=query,
            headers=[(b"host", b"testserver"), (b"authorization", b"Bearer ok")],
        )
        await owner.wait_for(lambda: len(owner.data) >= 2)
        assert welcome(owner)["resumed"] is True
        assert received(owner)[1] == {"seq": 1, "while": "refused"}
        owner.close()
    assert recorder.ended_ids() == [hello["id"]]


async def test_messages_sent_while_the_resume_is_in_progress_follow_the_replay() -> None:
    manager, _, server = make()
    gate = anyio.Event()

    @manager.on_resume
    async def wait_for_gate(session: Session) -> None:
        await gate.wait()

    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        await manager.send(hello["id"], {"n": "before"})
        resuming = await server.connect(
            tg, query_string=f"resume={hello['resume']}&last=0".encode()
        )
        await settle()  # the resume hook is waiting: the session is claimed, not open
        assert await manager.send(hello["id"], {"n": "during"}) is SendResult.QUEUED
        gate.set()
        await resuming.wait_for(lambda: len(resuming.data) >= 3)
        assert [(m.get("seq"), m.get("n")) for m in received(resuming)[1:]] == [
            (1, "before"),
            (2, "during"),
        ]
        resuming.close()


async def test_detach_and_resume_hooks_run_in_order_and_disconnect_once() -> None:
    manager, recorder, server = make()
    events: list[str] = []
    manager.on_detach(lambda s: events.append(f"detach:{s.end_reason}"))
    manager.on_resume(lambda s: events.append("resume"))
    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        again = await connect(server, tg, hello["resume"], 0)
        assert welcome(again)["resumed"] is True
        again.close()
    assert events == ["detach:connection lost", "resume"]
    assert recorder.ended_ids() == [hello["id"]]


async def test_shutdown_ends_detached_sessions_with_their_hooks() -> None:
    manager, recorder, server = make()
    async with manager, anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
    assert recorder.ended == [(hello["id"], EndReason.SERVER_SHUTDOWN, 1005, None)]
    assert not manager.detached


async def test_groups_and_data_survive_a_resume() -> None:
    manager, _, server = make()
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        assert await manager.join(hello["id"], "room")
        session = manager.local[hello["id"]]
        session.data["k"] = "v"
        client.drop()
        await detached(manager, hello["id"])
        assert await manager.send_group("room", {"g": 1}) == 1
        assert await manager.broadcast({"b": 1}) == 1
        again = await connect(server, tg, hello["resume"], 0)
        await again.wait_for(lambda: len(again.data) >= 3)
        assert [m.get("g") or m.get("b") for m in received(again)[1:]] == [1, 1]
        assert manager.local[hello["id"]] is session and session.data == {"k": "v"}
        assert session.groups == {"room"}
        again.close()


async def test_resumption_is_off_by_default_and_costs_nothing() -> None:
    manager, recorder, server = make(resume_window=0, resume_seq_field=None)
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        assert hello["resume"] is None
        session = manager.local[hello["id"]]
        assert session._resume is None and session.seq == 0
        client.drop()
        await recorder.wait_ended(1)
        assert recorder.reasons() == [EndReason.CONNECTION_LOST]


def test_bad_resumption_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="wait"):
        SessionManager(resume_window=10, slow_consumer="wait")
    with pytest.raises(ConfigurationError, match="32 characters"):
        SessionManager(resume_window=10, resume_secret="short")
    with pytest.raises(ConfigurationError, match="resume_window"):
        SessionManager(resume_window=-1)
    with pytest.raises(ConfigurationError, match="resume_seq_field"):
        SessionManager(resume_window=10, resume_seq_field='a"b')


async def test_a_resume_takes_over_a_connection_that_has_not_noticed_its_client_left() -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        zombie = await connect(server, tg)
        hello = welcome(zombie)
        await manager.send(hello["id"], {"n": 1})
        # The client is gone but the server has not seen it yet: the session is still open.
        assert manager.local[hello["id"]].state is SessionState.OPEN
        back = await connect(server, tg, hello["resume"], last=0)
        await back.wait_for(lambda: len(back.data) >= 2)
        assert welcome(back)["resumed"] is True and welcome(back)["id"] == hello["id"]
        assert received(back)[1] == {"seq": 1, "n": 1}
        assert zombie.close_frame is not None and zombie.close_frame["code"] == 4409
        assert recorder.ended == []
        back.close()
    assert recorder.ended_ids() == [hello["id"]]


async def test_a_resumed_session_causes_no_presence_leave_or_join() -> None:
    with ManualClock() as clock:
        manager, _, server = make(presence_interval=0.5)
        async with anyio.create_task_group() as tg:
            watcher = await connect(server, tg)
            flapper = await connect(server, tg)
            watcher_session = manager.local[welcome(watcher)["id"]]
            flapper_session = manager.local[welcome(flapper)["id"]]
            presence = manager.presence
            await presence.track(flapper_session, "lobby")
            await presence.subscribe(watcher_session, "lobby")
            clock.advance(0.5)
            await presence.wait_idle()
            await watcher.wait_for(lambda: len(watcher.data) >= 2)  # the join of the flapper
            base = len(watcher.data)
            flapper.drop()
            await detached(manager, flapper_session.id)
            again = await connect(server, tg, welcome(flapper)["resume"], 0)
            assert welcome(again)["resumed"] is True
            clock.advance(0.5)
            await presence.wait_idle()
            await settle()
            assert len(watcher.data) == base  # no leave, no join
            assert set(await presence.people("lobby")) == {flapper_session.id}
            # A client that does not come back leaves once its window ran out.
            again.drop()
            await detached(manager, flapper_session.id)
            clock.advance(WINDOW)
            await settle()
            clock.advance(0.5)
            await presence.wait_idle()
            await watcher.wait_for(lambda: len(watcher.data) == base + 1)
            assert received(watcher)[-1].get("leaves")
            watcher.close()


async def test_an_idle_timeout_detaches_and_the_client_resumes() -> None:
    with ManualClock() as clock:
        manager, recorder, server = make(idle_timeout=30)
        async with anyio.create_task_group() as tg:
            client = await connect(server, tg)
            hello = welcome(client)
            clock.advance(30)
            await client.wait_for(lambda: client.close_frame is not None)
            assert client.close_frame is not None and client.close_frame["code"] == 4408
            await detached(manager, hello["id"])
            await manager.send(hello["id"], {"n": 1})
            again = await connect(server, tg, hello["resume"], 0)
            await again.wait_for(lambda: len(again.data) >= 2)
            assert welcome(again)["resumed"] is True
            assert received(again)[1] == {"seq": 1, "n": 1}
            again.close()
        assert recorder.ended_ids() == [hello["id"]]


async def test_a_resume_cancelled_in_its_hooks_leaves_the_session_waiting() -> None:
    manager, recorder, server = make()
    entered = anyio.Event()

    @manager.on_resume
    async def hang(session: Session) -> None:
        entered.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        attempt = await server.connect(tg, query_string=f"resume={hello['resume']}&last=0".encode())
        await entered.wait()
        assert hello["id"] not in manager.detached  # claimed while the hook runs
        attempt.cancel()  # the server gives up on that handshake
        await attempt.done.wait()
        assert manager.detached[hello["id"]].state is SessionState.DETACHED
        assert recorder.ended == []
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_a_lost_connection_ends_the_session_as_without_resumption() -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        assert hello["resume"]  # tokens and numbering work; detaching needs asyncio
        client.drop()
        await recorder.wait_ended(1)
    assert recorder.reasons() == [EndReason.CONNECTION_LOST] and not manager.detached


@pytest.mark.parametrize("last", ["", "x", "1.5"])
async def test_a_resume_without_a_usable_last_number_is_invalid_and_harms_nothing(
    last: str,
) -> None:
    manager, recorder, server = make()
    async with anyio.create_task_group() as tg:
        hello = await lost(manager, server, tg)
        query = f"resume={hello['resume']}&last={last}".encode()
        attempt = await server.connect(tg, query_string=query)
        await attempt.wait_for(lambda: len(attempt.data) >= 1)
        assert welcome(attempt)["resumed"] is False
        assert manager.stats.resume_failed["invalid"] == 1
        assert hello["id"] in manager.detached and recorder.ended == []
        tg.cancel_scope.cancel()


async def test_every_detach_hook_runs_even_if_the_connection_is_cancelled_during_one() -> None:
    manager, recorder, server = make()
    gate, entered = anyio.Event(), anyio.Event()
    ran: list[str] = []

    @manager.on_detach
    async def slow(session: Session) -> None:
        entered.set()
        await gate.wait()
        ran.append("slow")

    @manager.on_detach
    async def second(session: Session) -> None:
        ran.append("second")

    tasks: list[Any] = []
    manager.on_connect(lambda s: tasks.append(asyncio.current_task()))
    async with anyio.create_task_group() as tg:
        client = await connect(server, tg)
        hello = welcome(client)
        client.drop()
        await entered.wait()
        tasks[0].cancel()  # a server's shutdown timeout cancels the connection's task natively
        gate.set()
        await detached(manager, hello["id"])
        assert ran == ["slow", "second"]
        assert recorder.ended == []
        tg.cancel_scope.cancel()
