"""Tests of wsession.testing: connections that know their session, the ways a client leaves,
the manual clock, the hook recorder (and, in tests/test_testing_plugin.py, the pytest plugin)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    EndReason,
    Refuse,
    Session,
    SessionManager,
    WSessionError,
    WSessionMiddleware,
    get_session,
)
from wsession.testing import (
    MARKER_HEADER,
    AsyncSessionClient,
    ClientDisconnected,
    HandshakeDenied,
    HookRecorder,
    ManualClock,
    SessionClient,
    connect,
    find_manager,
)


def make_app(manager: SessionManager) -> Starlette:
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"id": get_session(ws).id})
        async for text in ws.iter_text():
            await ws.send_text(text)

    return Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


# -- connect: both sides of a connection ------------------------------------------------------


def test_connect_gives_the_server_side_session() -> None:
    manager = SessionManager()
    with TestClient(make_app(manager)) as client, connect(client, "/ws?x=1") as conn:
        first = conn.receive_json()
        assert conn.session.id == first["id"]
        assert conn.session.query_params["x"] == "1"
        assert manager.local[conn.session.id] is conn.session
        conn.send_text("hello")
        assert conn.receive_text() == "hello"
    # Leaving the block closes like a client (1000) and waits for the session's end.
    assert conn.session.end_reason is EndReason.CLIENT_CLOSED
    assert conn.session.close_code == 1000
    assert manager.local == {}
    assert manager.connect_hooks == ()  # the helper's capture hook is gone


def test_the_session_is_found_even_when_the_app_ends_at_once() -> None:
    manager = SessionManager()

    async def quick(ws: WebSocket) -> None:
        await ws.accept()
        await ws.close(4001, "done")

    app = Starlette(
        routes=[WebSocketRoute("/ws", quick)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    for _ in range(20):  # the app may finish before the client reads the accept
        with TestClient(app) as client, connect(client, "/ws") as conn:
            assert conn.receive_close() == (4001, "done")
        assert conn.session.end_reason is EndReason.APP_CLOSED


def test_concurrent_connections_each_get_their_own_session() -> None:
    manager = SessionManager()
    with (
        TestClient(make_app(manager)) as client,
        connect(client, "/ws") as a,
        connect(client, "/ws") as b,
    ):
        assert a.session is not b.session
        assert a.receive_json()["id"] == a.session.id
        assert b.receive_json()["id"] == b.session.id


def test_the_app_sees_the_marker_header_only() -> None:
    manager = SessionManager()
    with (
        TestClient(make_app(manager)) as client,
        connect(client, "/ws", headers={"x-user": "ada"}) as conn,
    ):
        assert conn.session.headers["x-user"] == "ada"
        assert MARKER_HEADER in conn.session.headers


def test_a_refused_handshake_raises_like_testclient() -> None:
    manager = SessionManager()

    @manager.on_connect
    def deny(session: Session) -> None:
        raise Refuse(403, reason="no")

    with TestClient(make_app(manager)) as client:
        with pytest.raises(WebSocketDenialResponse) as denied, connect(client, "/ws"):
            pass
        assert denied.value.status_code == 403
    assert manager.connect_hooks == (deny,)


def test_refused_with_a_close_code_has_no_session() -> None:
    manager = SessionManager(on_connect=[lambda s: (_ for _ in ()).throw(Refuse(code=4403))])
    with TestClient(make_app(manager)) as client, connect(client, "/ws") as conn:
        assert conn.receive_close() == (4403, "")
        with pytest.raises(WSessionError, match="refused"):
            _ = conn.session


# -- the ways a client leaves -------------------------------------------------------------


@pytest.mark.parametrize(
    ("leave", "reason", "code"),
    [
        (lambda c: c.close(4000, "bye"), EndReason.CLIENT_CLOSED, 4000),
        (lambda c: c.drop(), EndReason.CONNECTION_LOST, 1005),
        (lambda c: c.server_shutdown(), EndReason.SERVER_SHUTDOWN, 1012),
    ],
    ids=["close", "drop", "server_shutdown"],
)
def test_each_ending_reaches_the_hooks_with_its_reason(leave: Any, reason: Any, code: int) -> None:
    manager = SessionManager()
    recorder = HookRecorder(manager)
    with TestClient(make_app(manager)) as client, connect(client, "/ws") as conn:
        conn.receive_json()
        leave(conn)
        # Endings return once the session ended: the hooks already ran.
        ending = recorder.assert_ended_once(conn.session.id, reason, code=code)
    assert ending.close_code == code
    recorder.assert_ended_once(conn.session.id, reason)  # leaving the block ends nothing more


def test_leaving_twice_is_an_error() -> None:
    manager = SessionManager()
    with TestClient(make_app(manager)) as client, connect(client, "/ws") as conn:
        conn.drop()
        with pytest.raises(WSessionError, match="already left"):
            conn.close()


def test_an_app_that_never_reads_does_not_end_and_the_helper_says_so() -> None:
    manager = SessionManager()

    async def deaf(ws: WebSocket) -> None:
        await ws.accept()
        await anyio.sleep_forever()  # never reads: the disconnect is never seen

    app = Starlette(
        routes=[WebSocketRoute("/ws", deaf)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    with TestClient(app) as client:
        conn = connect(client, "/ws", end_timeout=0.2)
        with pytest.raises(TimeoutError, match="detect_disconnect"), conn:
            conn.drop()
            # (the TimeoutError leaves the block; TestClient then cancels the app)
    assert conn.session.end_reason is EndReason.CANCELLED


def test_a_server_close_is_answered_like_a_client_does() -> None:
    manager = SessionManager()
    seen: list[Any] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        try:
            await ws.receive_text()
        except WebSocketDisconnect as exc:
            seen.append(exc.code)

    app = Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    with TestClient(app) as client, connect(client, "/ws") as conn:
        client.portal.call(manager.close, conn.session.id, 4000, "kicked")  # type: ignore[union-attr]
        assert conn.receive_close() == (4000, "kicked")
    assert seen == [4000]
    assert conn.session.end_reason is EndReason.SERVER_CLOSED


# -- finding the manager --------------------------------------------------------------------


def test_the_manager_is_found_in_app_route_and_mount_middleware() -> None:
    app_level = SessionManager()
    assert find_manager(make_app(app_level)) is app_level

    per_route = SessionManager()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()

    routed = Starlette(
        routes=[
            Mount(
                "/v1",
                routes=[
                    WebSocketRoute(
                        "/ws",
                        endpoint,
                        middleware=[Middleware(WSessionMiddleware, manager=per_route)],
                    )
                ],
            )
        ]
    )
    assert find_manager(routed) is per_route

    both = make_app(SessionManager())
    both.router.routes.extend(routed.routes)
    with pytest.raises(WSessionError, match="2 SessionManagers"):
        find_manager(both)
    with pytest.raises(WSessionError, match="no WSessionMiddleware"):
        find_manager(Starlette())


def test_session_client_connects_without_naming_the_manager() -> None:
    manager = SessionManager()
    with SessionClient(make_app(manager)) as client, client.connect("/ws") as conn:
        assert client.manager is manager
        assert conn.receive_json()["id"] == conn.session.id
        assert client.get("/nothing").status_code == 404  # still an HTTP test client


# -- the manual clock ---------------------------------------------------------------------


def test_advancing_the_clock_closes_an_idle_session() -> None:
    manager = SessionManager(idle_timeout=300)
    recorder = HookRecorder(manager)
    with (
        ManualClock() as clock,
        TestClient(make_app(manager)) as client,
        connect(client, "/ws") as conn,
    ):
        conn.receive_json()
        clock.advance(299)
        conn.send_text("still here")  # activity at t=299 moves the deadline to t=599
        assert conn.receive_text() == "still here"
        clock.advance(299)
        recorder.assert_not_ended(conn.session.id)
        clock.advance(1)
        assert conn.receive_close() == (4408, "idle timeout")
    recorder.assert_ended_once(conn.session.id, EndReason.SERVER_CLOSED, code=4408)


def test_without_advancing_nothing_times_out() -> None:
    manager = SessionManager(idle_timeout=0.01)
    with (
        ManualClock() as clock,
        TestClient(make_app(manager)) as client,
        connect(client, "/ws") as conn,
    ):
        conn.receive_json()
        assert clock.pending == 1 and clock.next_deadline() == pytest.approx(0.01)
        # Real time passing does not move the manual clock: the session is still open.
        conn.send_text("a")
        assert conn.receive_text() == "a"
        assert conn.session.end_reason is None


def test_the_clock_is_uninstalled_on_exit() -> None:
    from wsession import _timers

    before = _timers.clock
    with ManualClock() as clock:
        assert _timers.clock is clock
        with pytest.raises(ValueError, match="go back"):
            clock.advance(-1)
    assert _timers.clock is before
    with pytest.raises(RuntimeError, match="not installed"):
        clock.uninstall()


@pytest.mark.anyio
async def test_timers_fire_in_deadline_order_on_the_callers_loop() -> None:
    fired: list[tuple[str, float]] = []
    with ManualClock(start=100.0) as clock:
        from wsession import _timers

        _timers.call_later(5, lambda: fired.append(("b", clock.now())))
        _timers.call_later(1, lambda: fired.append(("a", clock.now())))
        cancelled = _timers.call_later(2, lambda: fired.append(("x", clock.now())))
        cancelled.cancel()

        def rearm() -> None:
            fired.append(("c", clock.now()))
            _timers.call_later(1, lambda: fired.append(("d", clock.now())))

        _timers.call_later(6, rearm)
        clock.advance(7)  # called on the loop's own thread: callbacks run inline
        assert fired == [("a", 101.0), ("b", 105.0), ("c", 106.0), ("d", 107.0)]
        assert clock.now() == 107.0 and clock.pending == 0


# -- the hook recorder --------------------------------------------------------------------


def test_the_recorder_sees_hooks_in_order_with_outcomes_and_detaches() -> None:
    def authenticate(session: Session) -> None:
        session.user_key = "u1"

    async def load(session: Session) -> None:
        pass

    def log_end(session: Session) -> None:
        pass

    async def cleanup(session: Session) -> None:
        raise RuntimeError("cleanup broke")

    manager = SessionManager(on_connect=[authenticate, load], on_disconnect=[log_end, cleanup])
    originals = (manager.connect_hooks, manager.disconnect_hooks)
    with HookRecorder(manager) as recorder:
        with TestClient(make_app(manager)) as client, connect(client, "/ws") as conn:
            conn.receive_json()
            recorder.assert_not_ended(conn.session.id)
            conn.drop()
        sid = conn.session.id
        recorder.assert_hooks(sid, ["authenticate", "load", "cleanup", "log_end"])
        assert recorder.hooks(sid, "connect") == ["authenticate", "load"]
        outcomes = {c.hook: c.outcome for c in recorder.calls}
        assert outcomes == {
            "authenticate": "ok",
            "load": "ok",
            "cleanup": "raised",
            "log_end": "ok",
        }
        assert all(c.end_reason is EndReason.CONNECTION_LOST for c in recorder.calls[2:])
        assert recorder.connected == [sid]
        recorder.assert_ended_once(sid, EndReason.CONNECTION_LOST)
        with pytest.raises(AssertionError, match="ran"):
            recorder.assert_hooks(sid, ["authenticate"])
        with pytest.raises(AssertionError, match="expected"):
            recorder.assert_ended_once(sid, EndReason.CLIENT_CLOSED)
        with pytest.raises(AssertionError, match="0 times"):
            recorder.assert_ended_once("no-such-id")
        with pytest.raises(AssertionError, match="ended"):
            recorder.assert_not_ended(sid)
    assert (manager.connect_hooks, manager.disconnect_hooks) == originals


def test_the_recorder_marks_a_refusal_and_records_no_ending() -> None:
    def deny(session: Session) -> None:
        raise Refuse(403)

    manager = SessionManager(on_connect=[deny])
    recorder = HookRecorder(manager)
    with TestClient(make_app(manager)) as client, pytest.raises(WebSocketDenialResponse):
        client.websocket_connect("/ws").__enter__()
    [call] = recorder.calls
    assert (call.hook, call.outcome) == ("deny", "refused")
    assert recorder.connected == [] and recorder.endings == []


def test_the_recorder_catches_a_second_ending() -> None:
    manager = SessionManager()
    recorder = HookRecorder(manager)
    # Feed the recorder's own disconnect hook twice, as a broken server would.
    session = Session("s1", {"type": "websocket", "headers": []}, None, {})
    session._end(EndReason.CLIENT_CLOSED, 1000, None)
    for hook in manager.disconnect_hooks:
        hook(session)
        hook(session)
    with pytest.raises(AssertionError, match="2 times"):
        recorder.assert_ended_once("s1")


# -- the async variant --------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_connect_drop_and_a_send_after_the_drop() -> None:
    manager = SessionManager()
    recorder = HookRecorder(manager)
    after_drop: list[BaseException] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"id": get_session(ws).id})
        try:
            await ws.receive_text()
        except WebSocketDisconnect:
            try:
                await get_session(ws).send_text("too late")
            except OSError as exc:  # SessionClosed: the client is gone
                after_drop.append(exc)

    app = Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    async with AsyncSessionClient(app) as client, client.connect("/ws?q=1") as conn:
        assert await conn.receive_json() == {"id": conn.session.id}
        assert conn.session.query_params["q"] == "1"
        await conn.drop()
        recorder.assert_ended_once(conn.session.id, EndReason.CONNECTION_LOST, code=1005)
    assert len(after_drop) == 1
    assert manager.local == {} and manager.connect_hooks == recorder.manager.connect_hooks


@pytest.mark.anyio
async def test_async_send_after_the_client_left_raises_like_uvicorn() -> None:
    errors: list[BaseException] = []

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # the drop
        try:
            await send({"type": "websocket.send", "text": "x"})
        except OSError as exc:
            errors.append(exc)

    manager = SessionManager()
    app = WSessionMiddleware(raw, manager)
    async with AsyncSessionClient(app, lifespan=False) as client, client.connect("/") as conn:
        await conn.drop()
    assert [type(e) for e in errors] == [ClientDisconnected]  # the server's error, passed on
    assert conn.session.end_reason is EndReason.CONNECTION_LOST


@pytest.mark.anyio
async def test_async_idle_timeout_with_the_manual_clock() -> None:
    manager = SessionManager(idle_timeout=300)
    with ManualClock() as clock:
        async with AsyncSessionClient(make_app(manager)) as client, client.connect("/ws") as conn:
            await conn.receive_json()
            clock.advance(299)
            assert conn.session.end_reason is None
            clock.advance(1)  # on the loop's own thread: the idle check runs inline
            assert await conn.receive_close() == (4408, "idle timeout")
    assert conn.session.end_reason is EndReason.SERVER_CLOSED


@pytest.mark.anyio
async def test_async_refusals_and_app_errors_surface() -> None:
    manager = SessionManager()

    @manager.on_connect
    def deny(session: Session) -> None:
        if session.query_params.get("deny"):
            raise Refuse(429, reason="later", headers={"Retry-After": "3"})

    boom = ValueError("app failure")

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        if ws.query_params.get("boom"):
            raise boom
        await ws.close(4001)

    app = Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    async with AsyncSessionClient(app) as client:
        with pytest.raises(HandshakeDenied) as denied:
            async with client.connect("/ws?deny=1"):
                pass
        assert denied.value.status_code == 429
        assert denied.value.headers["retry-after"] == "3"
        assert denied.value.body == b"later"

        with pytest.raises(ValueError, match="app failure") as raised:
            async with client.connect("/ws?boom=1") as conn:
                assert await conn.receive_close() == (1011, "")
        assert raised.value is boom
        assert conn.session.end_reason is EndReason.APP_RAISED

        async with client.connect("/ws") as conn:
            assert await conn.receive_close() == (4001, "")
        assert conn.session.end_reason is EndReason.APP_CLOSED


@pytest.mark.anyio
async def test_async_client_runs_the_lifespan() -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    manager = SessionManager(drain_on_signal=False)
    phases: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager:
            phases.append("up")
            yield
        phases.append("down")

    app = make_app(manager)
    app.router.lifespan_context = lifespan
    async with AsyncSessionClient(app) as client:
        assert phases == ["up"]
        # A connection left open is drained by the manager on shutdown (1001).
        conn = client.connect("/ws")
        await conn.__aenter__()
        await conn.receive_json()
    assert phases == ["up", "down"]
    assert conn.session.end_reason is EndReason.SERVER_SHUTDOWN
