"""What the per-connection path promises, pinned before it is made cheaper (issue 17).

The middleware may be restructured for speed (fewer coroutines, lazy handshake views, cheaper
ids); these tests hold what apps and servers rely on: the handshake as the session shows it,
hooks called once each with the session, awaitables returned by sync hooks awaited, ids, the
idle timeout, resumption, and exceptions and return values passed through unchanged.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import uvicorn
from anyio import wait_all_tasks_blocked
from starlette.datastructures import Headers, QueryParams
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    SCOPE_KEY,
    EndReason,
    Session,
    SessionManager,
    WSessionMiddleware,
    get_session,
    new_connection_id,
)
from wsession._types import Message, Receive, Scope, Send
from wsession.testing import ManualClock

from .fake_server import FakeServer
from .support import mount

pytestmark = [pytest.mark.timeout(20)]

_ID = re.compile(r"^[A-Za-z0-9_-]+$")
HEADERS = [
    (b"host", b"example.test"),
    (b"x-token", b"abc"),
    (b"x-multi", b"1"),
    (b"x-multi", b"2"),
]


def _scope(**extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "scheme": "ws",
        "http_version": "1.1",
        "path": "/room/7",
        "raw_path": b"/room/7",
        "root_path": "",
        "query_string": b"a=1&b=x%20y&a=2",
        "headers": list(HEADERS),
        "client": ["10.0.0.5", 4242],  # a list, as some servers give it
        "server": ("127.0.0.1", 8000),
        "subprotocols": ["chat.v1", "chat.v2"],
        "state": {},
        "extensions": {},
    }
    scope.update(extra)
    return scope


class _Peer:
    """An in-memory server side for one connection: connect, then whatever the test says."""

    def __init__(self, then: list[Message] | None = None) -> None:
        self.inbox: list[Message] = [{"type": "websocket.connect"}, *(then or [])]
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.inbox:
            return self.inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def test_uvicorn_detects_the_middleware_as_asgi3() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    config = uvicorn.Config(WSessionMiddleware(app, manager=SessionManager()))
    config.load()
    assert config.interface == "asgi3"


@pytest.mark.anyio
async def test_handshake_views_equal_the_scope_in_hooks_and_app() -> None:
    seen: list[tuple[str, Any]] = []

    def view(session: Session) -> tuple[Any, ...]:
        return (
            session.path,
            session.client,
            session.headers,
            session.query_params,
            session.requested_subprotocols,
        )

    manager = SessionManager()

    @manager.on_connect
    def on_connect(session: Session) -> None:
        seen.append(("connect", view(session)))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        session = scope[SCOPE_KEY]
        seen.append(("app", view(session)))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "subprotocol": "chat.v2"})
        assert session.subprotocol == "chat.v2"
        assert (await receive())["type"] == "websocket.disconnect"

    scope = _scope()
    peer = _Peer([{"type": "websocket.disconnect", "code": 1000}])
    await WSessionMiddleware(app, manager=manager)(scope, peer.receive, peer.send)
    expected = (
        "/room/7",
        ("10.0.0.5", 4242),
        Headers(raw=HEADERS),
        QueryParams(b"a=1&b=x%20y&a=2"),
        ("chat.v1", "chat.v2"),
    )
    assert [what for what, _ in seen] == ["connect", "app"]
    for _, got in seen:
        assert got == expected
        assert isinstance(got[1], tuple)
        assert got[3].getlist("a") == ["1", "2"] and got[3]["b"] == "x y"
        assert got[2].getlist("x-multi") == ["1", "2"]
    assert scope == _scope()  # the server's scope is never mutated


@pytest.mark.anyio
async def test_views_without_optional_scope_keys() -> None:
    sessions: list[Session] = []
    manager = SessionManager(on_connect=[sessions.append])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    scope = _scope()
    for key in ("client", "query_string", "headers", "subprotocols"):
        del scope[key]
    await WSessionMiddleware(app, manager=manager)(scope, _Peer().receive, _Peer().send)
    (session,) = sessions
    assert session.client is None
    assert session.query_params == QueryParams("")
    assert list(session.headers.raw) == []
    assert session.requested_subprotocols == ()


@pytest.mark.anyio
async def test_connected_at_is_utc_and_when_the_handshake_arrived() -> None:
    sessions: list[Session] = []
    manager = SessionManager(on_connect=[sessions.append])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    before = datetime.now(UTC)
    await WSessionMiddleware(app, manager=manager)(_scope(), _Peer().receive, _Peer().send)
    after = datetime.now(UTC)
    (session,) = sessions
    at = session.connected_at
    assert isinstance(at, datetime) and at.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=5) <= at <= after + timedelta(milliseconds=5)
    assert session.connected_at == at  # stable across reads


@pytest.mark.anyio
async def test_hooks_run_once_each_with_the_session_the_app_sees() -> None:
    calls: list[tuple[str, Session]] = []
    manager = SessionManager()

    @manager.on_connect
    def first(session: Session) -> None:
        calls.append(("connect-sync", session))

    @manager.on_connect
    async def second(session: Session) -> None:
        calls.append(("connect-async", session))

    @manager.on_disconnect
    async def gone_async(session: Session) -> None:
        calls.append(("disconnect-async", session))

    @manager.on_disconnect
    def gone_sync(session: Session) -> None:
        assert session.end_reason is EndReason.CLIENT_CLOSED
        calls.append(("disconnect-sync", session))

    app_sessions: list[Session] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        app_sessions.append(scope[SCOPE_KEY])
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()

    peer = _Peer([{"type": "websocket.disconnect", "code": 1000}])
    await WSessionMiddleware(app, manager=manager)(_scope(), peer.receive, peer.send)
    (session,) = app_sessions
    assert calls == [
        ("connect-sync", session),
        ("connect-async", session),
        ("disconnect-sync", session),  # reverse order of registration
        ("disconnect-async", session),
    ]
    assert await manager.count() == 0 and session.is_closed


@pytest.mark.anyio
async def test_sync_hooks_returning_awaitables_are_awaited() -> None:
    done: list[str] = []

    async def work(what: str, session: Session) -> None:
        await anyio.lowlevel.checkpoint()
        done.append(what)

    manager = SessionManager(
        on_connect=[functools.partial(work, "connect"), lambda s: work("lambda", s)],
        on_disconnect=[functools.partial(work, "disconnect")],
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert done == ["connect", "lambda"]
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()

    peer = _Peer([{"type": "websocket.disconnect", "code": 1000}])
    await WSessionMiddleware(app, manager=manager)(_scope(), peer.receive, peer.send)
    assert done == ["connect", "lambda", "disconnect"]


@pytest.mark.anyio
async def test_mixed_connect_hooks_run_in_order_each_timed_once() -> None:
    order: list[str] = []

    async def later(name: str, session: Session) -> None:
        await anyio.lowlevel.checkpoint()
        order.append(name)

    def now(name: str) -> Any:
        return lambda session: order.append(name)

    manager = SessionManager(
        on_connect=[
            now("sync-1"),
            functools.partial(later, "async-2"),
            now("sync-3"),
            lambda s: later("awaitable-4", s),
            now("sync-5"),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        order.append("app")

    await WSessionMiddleware(app, manager=manager)(_scope(), _Peer().receive, _Peer().send)
    assert order == ["sync-1", "async-2", "sync-3", "awaitable-4", "sync-5", "app"]
    assert manager.stats.hook_seconds["connect"].count == 5


@pytest.mark.anyio
@pytest.mark.parametrize("failing", ["sync", "async"])
async def test_a_failing_hook_after_an_async_one_refuses_and_stops_the_rest(failing: str) -> None:
    ran: list[str] = []

    async def first(session: Session) -> None:
        await anyio.lowlevel.checkpoint()
        ran.append("first")

    def boom(session: Session) -> Any:
        ran.append("boom")
        if failing == "sync":
            raise RuntimeError("hook failed")

        async def fail() -> None:
            raise RuntimeError("hook failed")

        return fail()

    manager = SessionManager(on_connect=[first, boom, lambda s: ran.append("never")])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a refused connection never reaches the app")

    peer = _Peer()
    await WSessionMiddleware(app, manager=manager)(_scope(), peer.receive, peer.send)
    assert ran == ["first", "boom"]
    assert manager.stats.refused_by == {"hook_error": 1} and manager.stats.hook_errors == 1
    assert peer.sent[0]["type"] == "websocket.close"  # no denial extension in this scope


@pytest.mark.anyio
async def test_connect_timeout_bounds_all_the_hooks_together() -> None:
    async def slow(session: Session) -> None:
        await anyio.sleep(0.15)

    manager = SessionManager(on_connect=[slow, slow], connect_timeout=0.2)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a refused connection never reaches the app")

    with anyio.fail_after(5):
        await WSessionMiddleware(app, manager=manager)(_scope(), _Peer().receive, _Peer().send)
    assert manager.stats.refused_by == {"hook_timeout": 1}


def test_default_ids_are_unique_urlsafe_and_at_least_128_bits() -> None:
    ids = [new_connection_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for one in ids[::997]:
        assert _ID.match(one)
        assert len(one) * 6 >= 128  # base64 characters carry 6 bits each
    assert len({len(one) for one in ids}) == 1


def test_ids_from_many_threads_are_unique() -> None:
    ids: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        for _ in range(5_000):
            into.append(new_connection_id())

    threads = [threading.Thread(target=make, args=(into,)) for into in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [one for into in ids for one in into]
    assert len(set(every)) == len(every) == 40_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    new_connection_id()  # the parent has ids made ahead now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then leave at once
        try:
            os.write(write, " ".join(new_connection_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_connection_id() for _ in range(400)}  # more than one block's worth
    assert len(child) == 5 and not child & parent


@pytest.mark.anyio
async def test_sessions_get_default_ids() -> None:
    sessions: list[Session] = []
    manager = SessionManager(on_connect=[sessions.append])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    middleware = WSessionMiddleware(app, manager=manager)
    for _ in range(50):
        await middleware(_scope(), _Peer().receive, _Peer().send)
    ids = [s.id for s in sessions]
    assert len(set(ids)) == 50 and all(_ID.match(i) for i in ids)
    assert {len(i) for i in ids} == {len(new_connection_id())}


@pytest.mark.anyio
async def test_app_return_value_and_exceptions_pass_through_unchanged() -> None:
    manager = SessionManager()
    marker = object()
    boom = ValueError("boom")

    async def returns(scope: Scope, receive: Receive, send: Send) -> Any:
        return marker

    async def raises(scope: Scope, receive: Receive, send: Send) -> None:
        raise boom

    # Typed Any: ASGI says None, but what the app returns is handed back all the same.
    returning: Any = WSessionMiddleware(returns, manager=manager)
    assert await returning(_scope(), _Peer().receive, _Peer().send) is marker
    with pytest.raises(ValueError, match="boom") as caught:
        await WSessionMiddleware(raises, manager=manager)(_scope(), _Peer().receive, _Peer().send)
    assert caught.value is boom
    assert manager.stats.ended_by == {"app returned": 1, "app raised": 1}

    async def http(scope: Scope, receive: Receive, send: Send) -> Any:
        return marker

    passing: Any = WSessionMiddleware(http, manager=manager)
    assert await passing({"type": "http"}, None, None) is marker


@pytest.mark.anyio
async def test_the_app_reads_every_message_in_order_and_the_close_is_recorded() -> None:
    manager = SessionManager()
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            got.append(message)
            if message["type"] == "websocket.disconnect":
                return

    then: list[Message] = [
        {"type": "websocket.receive", "text": "a"},
        {"type": "websocket.receive", "bytes": b"b"},
        {"type": "websocket.disconnect", "code": 4001, "reason": "bye"},
    ]
    peer = _Peer(list(then))
    sessions: list[Session] = []
    manager.on_connect(sessions.append)
    await WSessionMiddleware(app, manager=manager)(_scope(), peer.receive, peer.send)
    assert got == then
    (session,) = sessions
    assert session.end_reason is EndReason.CLIENT_CLOSED
    assert (session.close_code, session.close_reason) == (4001, "bye")


@pytest.mark.anyio
async def test_the_app_gets_the_servers_own_message_objects() -> None:
    # The connect message the middleware read first, and every later one, are handed on as
    # the very objects the server returned (not copies, not a stand-in connect message).
    manager = SessionManager()
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())
        await send({"type": "websocket.accept"})
        got.append(await receive())
        got.append(await receive())

    peer = _Peer([{"type": "websocket.receive", "text": "a"}, {"type": "websocket.disconnect"}])
    sent = list(peer.inbox)
    await WSessionMiddleware(app, manager=manager)(_scope(), peer.receive, peer.send)
    assert [id(m) for m in got] == [id(m) for m in sent]


@pytest.mark.anyio
async def test_the_idle_timeout_still_closes_and_reading_keeps_it_open() -> None:
    manager = SessionManager(idle_timeout=100)
    closed: list[Message] = []
    reading = anyio.Event()
    to_app, inbox = anyio.create_memory_object_stream[Message](10)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            reading.set()
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return

    async def send(message: Message) -> None:
        if message["type"] == "websocket.close":
            closed.append(message)
            to_app.send_nowait({"type": "websocket.disconnect", "code": message["code"]})

    sessions: list[Session] = []
    manager.on_connect(sessions.append)
    to_app.send_nowait({"type": "websocket.connect"})
    with ManualClock() as clock, inbox, to_app:
        async with anyio.create_task_group() as tg:
            tg.start_soon(WSessionMiddleware(app, manager=manager), _scope(), inbox.receive, send)
            await reading.wait()
            clock.advance(60)
            to_app.send_nowait({"type": "websocket.receive", "text": "still here"})
            await wait_all_tasks_blocked()
            clock.advance(60)  # 120 s since connect, 60 s since the client spoke
            await wait_all_tasks_blocked()
            assert closed == []
            clock.advance(41)
            await wait_all_tasks_blocked()
    assert [m["code"] for m in closed] == [manager.settings.idle_close_code]
    assert sessions[0].end_reason is EndReason.SERVER_CLOSED


async def _resume_endpoint(websocket: WebSocket) -> None:
    session = get_session(websocket)
    await websocket.accept()
    await websocket.send_json(
        {
            "id": session.id,
            "resume": session.resume_token,
            "resumed": session.resumed,
            "path": session.path,
            "token": session.headers.get("x-token"),
            "q": session.query_params.get("q"),
            "client": list(session.client or ()),
        }
    )
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@pytest.mark.anyio
async def test_a_resumed_session_shows_the_new_handshake_and_echoes() -> None:
    import json

    manager = SessionManager(resume_window=60)
    resumed_views: list[tuple[Any, ...]] = []

    @manager.on_resume
    def on_resume(session: Session) -> None:
        resumed_views.append((session.headers.get("x-token"), session.client))

    server = FakeServer(mount(_resume_endpoint, manager))
    async with anyio.create_task_group() as tg:
        first = await server.connect(
            tg, headers=[(b"x-token", b"one")], client=("10.0.0.1", 1), query_string=b"q=1"
        )
        await first.wait_for(lambda: len(first.data) >= 1)
        hello = json.loads(first.data[0])
        first.drop()
        with anyio.fail_after(5):
            while hello["id"] not in manager.detached:
                await wait_all_tasks_blocked()
        query = f"resume={hello['resume']}&last=0&q=2".encode()
        second = await server.connect(
            tg, headers=[(b"x-token", b"two")], client=("10.0.0.2", 2), query_string=query
        )
        await second.wait_for(lambda: len(second.data) >= 1)
        again = json.loads(second.data[0])
        assert again["id"] == hello["id"] and again["resumed"] is True
        assert (again["token"], again["q"], again["client"]) == ("two", "2", ["10.0.0.2", 2])
        assert resumed_views == [("two", ("10.0.0.2", 2))]
        second.say("echo me")
        await second.wait_for(lambda: len(second.data) >= 2)
        assert second.data[1] == "echo me"
        second.close(1000)
    assert manager.stats.resumed == 1
