"""In-process tests (TestClient): pass-through, identity, scope key, ContextVar, FastAPI."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from wsession import (
    SCOPE_KEY,
    Session,
    SessionManager,
    SessionNotAvailable,
    WSessionMiddleware,
    connection_id,
    current_session,
    get_current_session,
    get_session,
)
from wsession._types import Message, Receive, Scope, Send
from wsession.testing import SessionClient, connect


def wrap(endpoint: Any, manager: SessionManager | None = None, **kw: Any) -> Starlette:
    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint), Route("/http", lambda r: PlainTextResponse("ok"))],
        middleware=[Middleware(WSessionMiddleware, manager=manager or SessionManager(**kw))],
    )


def test_http_and_lifespan_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        assert SCOPE_KEY not in scope
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with TestClient(WSessionMiddleware(app)) as client:
        assert client.get("/").status_code == 204
    assert seen == ["lifespan", "http"]


def test_messages_pass_unchanged() -> None:
    """Subprotocol, accept headers, text, bytes (empty ones too), close code and reason."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept(subprotocol="chat.v2", headers=[(b"x-extra", b"1")])
        await ws.send_text(await ws.receive_text())
        await ws.send_bytes(await ws.receive_bytes())
        await ws.send_text("")
        await ws.send_bytes(b"")
        await ws.close(4321, "done here")

    client = TestClient(wrap(endpoint))
    with client.websocket_connect("/ws", subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.accepted_subprotocol == "chat.v2"
        assert ws.extra_headers is not None and (b"x-extra", b"1") in ws.extra_headers
        ws.send_text("héllo")
        assert ws.receive_text() == "héllo"
        ws.send_bytes(b"\x00\xff")
        assert ws.receive_bytes() == b"\x00\xff"
        assert ws.receive() == {"type": "websocket.send", "text": ""}
        assert ws.receive() == {"type": "websocket.send", "bytes": b""}
        closing = ws.receive()
        assert closing == {"type": "websocket.close", "code": 4321, "reason": "done here"}


def test_app_denial_response_passes_through() -> None:
    """An app's own denial response (the websocket.http.response extension) is untouched."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert "websocket.http.response" in scope["extensions"]
        await receive()
        await send({"type": "websocket.http.response.start", "status": 418, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"\xfftea", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"pot"})

    from starlette.testclient import WebSocketDenialResponse

    client = TestClient(WSessionMiddleware(app))  # no lifespan: the app only speaks WebSocket
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("/ws").__enter__()
    assert denied.value.status_code == 418
    assert denied.value.content == b"\xfftea" + b"pot"


@pytest.mark.anyio
async def test_return_value_and_scope_copy() -> None:
    """The app's return value comes back; the server's scope is not mutated."""
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "websocket.connect"}]

    async def app(scope: Scope, receive: Receive, send: Send) -> Any:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        return "sentinel"

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    result: Any = await WSessionMiddleware(app)(scope, receive, send)  # type: ignore[func-returns-value]
    assert result == "sentinel"
    assert SCOPE_KEY not in scope
    assert sent == [{"type": "websocket.accept"}]


def test_ids_are_unique_random_and_not_from_the_client() -> None:
    ids: list[str] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        session = get_session(ws)
        assert ws.scope[SCOPE_KEY] is session
        assert connection_id(ws) == session.id
        assert current_session.get() is session
        assert get_current_session() is session
        await ws.send_text(session.id)
        await ws.close()

    with TestClient(wrap(endpoint)) as client:
        for _ in range(200):
            headers = {"sec-websocket-key": "AAAAAAAAAAAAAAAAAAAAAA==", "x-connection-id": "mine"}
            with client.websocket_connect("/ws?id=mine", headers=headers) as ws:
                ids.append(ws.receive_text())
    assert len(set(ids)) == 200
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", sid), sid
        assert "mine" not in sid


def test_custom_id_factory_is_used() -> None:
    counter = iter(range(1000))

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        await ws.close()

    manager = SessionManager(id_factory=lambda: f"custom-{next(counter)}")
    with TestClient(wrap(endpoint, manager)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "custom-0"


def test_session_describes_the_handshake() -> None:
    states: list[str] = []

    async def endpoint(ws: WebSocket) -> None:
        states.append(get_session(ws).state.value)
        await ws.accept(subprotocol="b")
        states.append(get_session(ws).state.value)
        await ws.close()

    with (
        TestClient(wrap(endpoint)) as client,
        connect(
            client, "/ws?tag=a&tag=b", subprotocols=["a", "b"], headers={"X-Token": "t1"}
        ) as conn,
    ):
        conn.receive_close()
    # The server-side session stays readable after it ended.
    session = conn.session
    assert states == ["connecting", "open"]
    assert session.path == "/ws"
    assert session.subprotocol == "b" == conn.accepted_subprotocol
    assert session.requested_subprotocols == ("a", "b")
    assert session.headers.get("x-token") == "t1"
    assert session.query_params.getlist("tag") == ["a", "b"]
    assert session.client is not None
    assert session.connected_at.tzinfo is not None


def test_headers_and_query_are_read_only() -> None:
    async def endpoint(ws: WebSocket) -> None:
        session = get_session(ws)
        with pytest.raises(TypeError):
            session.headers["x"] = "y"  # type: ignore[index]
        with pytest.raises(TypeError):
            session.query_params["x"] = "y"  # type: ignore[index]
        await ws.accept()
        await ws.close()

    with TestClient(wrap(endpoint)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive()["type"] == "websocket.close"


def test_helpers_fail_clearly_without_the_middleware() -> None:
    async def endpoint(ws: WebSocket) -> None:
        with pytest.raises(SessionNotAvailable):
            get_session(ws)
        with pytest.raises(SessionNotAvailable):
            get_current_session()
        await ws.accept()
        await ws.close()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive()["type"] == "websocket.close"


def test_fastapi_dependency_and_add_middleware() -> None:
    app = FastAPI()
    manager = SessionManager()
    app.add_middleware(WSessionMiddleware, manager=manager)

    @app.websocket("/ws")
    async def endpoint(ws: WebSocket, session: Session = Depends(get_session)) -> None:
        await ws.accept()
        await ws.send_json({"id": session.id, "live": await manager.count()})
        await ws.close()

    with SessionClient(app) as client, client.connect("/ws") as conn:
        body = conn.receive_json()
        assert client.manager is manager  # found behind add_middleware
    assert body == {"id": conn.session.id, "live": 1}
    assert len(body["id"]) >= 22
    assert manager.stats.accepted == 1 and manager.stats.ended == 1


def test_per_route_mounting() -> None:
    """Mounted on one route only: that route gets sessions, others do not."""
    manager = SessionManager()

    async def managed(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        await ws.close()

    async def plain(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(str(SCOPE_KEY in ws.scope))
        await ws.close()

    app = Starlette(
        routes=[
            WebSocketRoute(
                "/managed", managed, middleware=[Middleware(WSessionMiddleware, manager=manager)]
            ),
            WebSocketRoute("/plain", plain),
        ]
    )
    with SessionClient(app) as client:
        assert client.manager is manager  # found in the route's own middleware
        with client.connect("/managed") as conn:
            assert conn.receive_text() == conn.session.id
        with client.websocket_connect("/plain") as ws:
            assert ws.receive_text() == "False"
    assert manager.stats.accepted == 1
