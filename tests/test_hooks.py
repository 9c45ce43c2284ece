"""In-process tests of connect/disconnect hooks, refusal, data typing and configuration."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    ConfigurationError,
    EndReason,
    Refuse,
    Session,
    SessionClosed,
    SessionManager,
    SessionState,
    WSessionMiddleware,
    get_session,
)
from wsession.testing import HookRecorder, connect


def wrap(endpoint: Any, manager: SessionManager) -> Starlette:
    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


async def echo_once(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text(get_session(ws).id)
    try:
        await ws.receive_text()
    except WebSocketDisconnect:
        return
    await ws.close()


def test_hooks_run_in_order_and_reverse_order() -> None:
    calls: list[str] = []

    async def c1(s: Session) -> None:
        calls.append("c1")

    def c2(s: Session) -> None:
        calls.append("c2")

    manager = SessionManager(on_connect=[c1], on_disconnect=[lambda s: calls.append("d1")])
    manager.on_connect(c2)

    @manager.on_disconnect
    async def d2(s: Session) -> None:
        calls.append("d2")

    with TestClient(wrap(echo_once, manager)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_text()
        ws.send_text("x")
    assert calls == ["c1", "c2", "d2", "d1"]


def test_connect_hooks_run_before_the_app_and_initialise_data() -> None:
    order: list[str] = []

    class Data(BaseModel):
        model_config = ConfigDict(validate_assignment=True)
        name: str = ""
        score: int = 0

    manager = SessionManager(data_model=Data)

    @manager.on_connect
    def init(session: Session) -> None:
        order.append("hook")
        session.data.name = session.query_params["name"]
        session.data.score = 3

    async def endpoint(ws: WebSocket) -> None:
        order.append("app")
        data = get_session(ws).data
        assert isinstance(data, Data)
        await ws.accept()
        await ws.send_json(data.model_dump())
        await ws.close()

    with (
        TestClient(wrap(endpoint, manager)) as client,
        client.websocket_connect("/ws?name=ada") as ws,
    ):
        assert ws.receive_json() == {"name": "ada", "score": 3}
    assert order == ["hook", "app"]


def test_plain_dict_data_without_a_model() -> None:
    manager = SessionManager()

    @manager.on_connect
    def init(session: Session) -> None:
        assert session.data == {}
        session.data["k"] = "v"

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json(get_session(ws).data)
        await ws.close()

    with TestClient(wrap(endpoint, manager)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json() == {"k": "v"}


def test_refuse_with_http_status_never_reaches_the_app() -> None:
    reached: list[str] = []
    ended: list[str] = []

    def deny(session: Session) -> None:
        raise Refuse(429, reason="slow down", headers={"Retry-After": "7"}, label="limit")

    async def endpoint(ws: WebSocket) -> None:
        reached.append("app")

    manager = SessionManager(on_connect=[deny], on_disconnect=[lambda s: ended.append(s.id)])
    with TestClient(wrap(endpoint, manager)) as client:
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/ws").__enter__()
        assert denied.value.status_code == 429
        assert denied.value.headers["retry-after"] == "7"
        assert denied.value.text == "slow down"
    assert reached == [] and ended == []
    assert manager.stats.refused == 1 and manager.stats.refused_by == {"limit": 1}
    assert manager.stats.accepted == 0


def test_refuse_with_close_code_is_visible_to_the_client() -> None:
    reached: list[str] = []

    def deny(session: Session) -> None:
        raise Refuse(code=4403, reason="not you")

    async def endpoint(ws: WebSocket) -> None:
        reached.append("app")

    manager = SessionManager(on_connect=[deny])
    with TestClient(wrap(endpoint, manager)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive() == {"type": "websocket.close", "code": 4403, "reason": "not you"}
    assert reached == []
    assert manager.stats.refused == 1


def test_refuse_by_status_without_denial_extension_closes_before_accept() -> None:
    sent: list[dict[str, Any]] = []

    def deny(session: Session) -> None:
        raise Refuse(403)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    import anyio

    mw = WSessionMiddleware(app, SessionManager(on_connect=[deny]))
    scope = {"type": "websocket", "path": "/", "headers": [], "query_string": b""}
    anyio.run(mw, scope, receive, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]


def test_connect_hook_error_refuses_with_server_error_and_logs_the_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended: list[str] = []
    seen: list[str] = []

    def first(session: Session) -> None:
        seen.append(session.id)

    def broken(session: Session) -> None:
        raise KeyError("boom")

    async def endpoint(ws: WebSocket) -> None:
        raise AssertionError("the app must not run")

    manager = SessionManager(
        on_connect=[first, broken], on_disconnect=[lambda s: ended.append(s.id)]
    )
    with (
        caplog.at_level(logging.ERROR, logger="wsession"),
        TestClient(wrap(endpoint, manager)) as client,
    ):
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/ws").__enter__()
        assert denied.value.status_code == 500
    assert ended == []
    assert manager.stats.hook_errors == 1 and manager.stats.refused_by == {"hook_error": 1}
    records = [r for r in caplog.records if r.name == "wsession"]
    assert records and getattr(records[0], "connection_id", None) == seen[0]
    assert manager.stats.accepted == 0


def test_disconnect_hooks_all_run_even_when_one_raises(caplog: pytest.LogCaptureFixture) -> None:
    def d1(s: Session) -> None:
        pass

    async def d2(s: Session) -> None:
        raise RuntimeError("hook broke")

    def d3(s: Session) -> None:
        pass

    manager = SessionManager(on_disconnect=[d1, d2, d3])
    recorder = HookRecorder(manager)
    with (
        caplog.at_level(logging.ERROR, logger="wsession"),
        TestClient(wrap(echo_once, manager)) as client,
        connect(client, "/ws") as conn,
    ):
        conn.receive_text()
    recorder.assert_hooks(conn.session.id, ["d3", "d2", "d1"])
    assert [c.outcome for c in recorder.calls] == ["ok", "raised", "ok"]
    recorder.assert_ended_once(conn.session.id, EndReason.CLIENT_CLOSED)
    assert manager.stats.hook_errors == 1
    assert any("hook broke" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_app_exception_is_reraised_unchanged_and_hooks_run_once() -> None:
    boom = ValueError("app failure")
    ends: list[tuple[EndReason | None, int | None]] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        raise boom

    manager = SessionManager(on_disconnect=[lambda s: ends.append((s.end_reason, s.close_code))])
    client = TestClient(wrap(endpoint, manager))
    with (
        pytest.raises(ValueError, match="app failure") as raised,
        client.websocket_connect("/ws") as ws,
    ):
        ws.receive()
    assert raised.value is boom
    assert ends == [(EndReason.APP_RAISED, 1011)]


def test_app_exception_before_accept() -> None:
    boom = LookupError("before accept")
    ends: list[EndReason | None] = []

    async def endpoint(ws: WebSocket) -> None:
        raise boom

    manager = SessionManager(on_disconnect=[lambda s: ends.append(s.end_reason)])
    client = TestClient(wrap(endpoint, manager))
    with pytest.raises(LookupError) as raised:
        client.websocket_connect("/ws").__enter__()
    assert raised.value is boom
    assert ends == [EndReason.APP_RAISED]
    assert manager.stats.ended == 1


def test_endings_recorded_for_app_close_and_return_and_client_close() -> None:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        mode = ws.query_params["mode"]
        if mode == "close":
            await ws.close(4001, "app says bye")
        elif mode == "return":
            return
        else:
            with pytest.raises(WebSocketDisconnect):
                await ws.receive_text()

    manager = SessionManager()
    recorder = HookRecorder(manager)
    with TestClient(wrap(endpoint, manager)) as client:
        with connect(client, "/ws?mode=close") as by_app:
            assert by_app.receive_close() == (4001, "app says bye")
        with connect(client, "/ws?mode=return") as returned:
            pass
        with connect(client, "/ws?mode=read") as by_client:
            by_client.close(4002, "client says bye")
    ending = recorder.assert_ended_once(by_app.session.id, EndReason.APP_CLOSED, code=4001)
    assert ending.close_reason == "app says bye"
    recorder.assert_ended_once(returned.session.id, EndReason.APP_RETURNED, code=None)
    ending = recorder.assert_ended_once(by_client.session.id, EndReason.CLIENT_CLOSED, code=4002)
    assert ending.close_reason == "client says bye"
    assert len(recorder.endings) == 3


@pytest.mark.anyio
async def test_registry_visibility_follows_the_lifecycle() -> None:
    manager = SessionManager()
    seen: dict[str, Any] = {}

    @manager.on_connect
    async def during_connect(session: Session) -> None:
        seen["in_registry_during_connect"] = await manager.get(session.id)

    @manager.on_disconnect
    async def during_disconnect(session: Session) -> None:
        seen["in_registry_during_disconnect"] = await manager.get(session.id)
        seen["state"] = session.state

    async def endpoint(ws: WebSocket) -> None:
        session = get_session(ws)
        seen["in_registry_in_app"] = await manager.get(session.id)
        seen["filtered"] = await manager.sessions(lambda s: s.path == "/ws")
        await ws.accept()
        await ws.close()

    with TestClient(wrap(endpoint, manager)) as client, client.websocket_connect("/ws") as ws:
        ws.receive()
    assert seen["in_registry_during_connect"] is None
    assert seen["in_registry_in_app"] is not None
    assert seen["filtered"] == [seen["in_registry_in_app"]]
    assert seen["in_registry_during_disconnect"] is seen["in_registry_in_app"]
    assert seen["state"] is SessionState.CLOSED
    assert await manager.count() == 0


def test_closed_session_refuses_to_send_with_a_clear_error() -> None:
    kept: list[Session] = []
    errors: list[BaseException] = []

    async def endpoint(ws: WebSocket) -> None:
        session = get_session(ws)
        with pytest.raises(SessionClosed):
            await session.send_text("before accept")
        await ws.accept()
        await session.send_text("via session")
        kept.append(session)
        await ws.close()
        try:
            await session.send_text("after close")
        except SessionClosed as exc:
            errors.append(exc)

    manager = SessionManager()
    with TestClient(wrap(endpoint, manager)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "via session"
        assert ws.receive()["type"] == "websocket.close"
    assert len(errors) == 1 and kept[0].id in str(errors[0])
    assert kept[0].is_closed


def test_data_model_must_stay_its_type() -> None:
    class Data(BaseModel):
        n: int = 0

    manager = SessionManager(data_model=Data)

    @manager.on_connect
    def wrong(session: Session) -> None:
        session.data = {"n": 1}

    async def endpoint(ws: WebSocket) -> None:
        raise AssertionError("not reached")

    with TestClient(wrap(endpoint, manager)) as client:
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/ws").__enter__()
        assert denied.value.status_code == 500
    assert manager.stats.refused_by == {"hook_error": 1}


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"disconnect_timeout": "soon"}, "disconnect_timeout"),
        ({"error_status": 404}, "error_status"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"on_connect": [42]}, "on_connect[0]"),
        ({"on_disconnect": ["x"]}, "on_disconnect[0]"),
        ({"data_model": dict}, "data_model"),
        ({"registry": object()}, "registry"),
        ({"id_factory": 3}, "id_factory"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigurationError, match=names.replace("[", r"\[")):
        SessionManager(**kwargs)


def test_data_model_needs_defaults() -> None:
    class Strict(BaseModel):
        user: str

    with pytest.raises(ConfigurationError, match="user"):
        SessionManager(data_model=Strict)


def test_middleware_rejects_a_bad_manager() -> None:
    with pytest.raises(ConfigurationError, match="manager"):
        WSessionMiddleware(echo_once, manager="nope")  # type: ignore[arg-type]


def test_refuse_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="status"):
        Refuse(99)
    with pytest.raises(ValueError, match="code"):
        Refuse(code=1005)
