import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from wsession import EndReason, Refuse, Session, SessionManager, WSessionMiddleware, get_session
from wsession.testing import HookRecorder, ManualClock, SessionClient

# -- the app (normally in its own module) --
sessions = SessionManager(idle_timeout=300)
online: set[str] = set()


@sessions.on_connect
def authenticate(session: Session) -> None:
    if session.query_params.get("token") != "letmein":
        raise Refuse(403)
    session.user_key = "user-42"
    online.add(session.id)


@sessions.on_disconnect
def cleanup(session: Session) -> None:
    online.discard(session.id)


async def chat(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_json({"id": get_session(ws).id})
    async for text in ws.iter_text():
        await ws.send_text(text.upper())


app = Starlette(
    routes=[WebSocketRoute("/ws", chat)],
    middleware=[Middleware(WSessionMiddleware, manager=sessions)],
)


# -- the tests --
@pytest.fixture
def wsession_app() -> Starlette:  # or `wsession_app = "myapp:app"` in the pytest config
    return app


def test_first(wsession_client: SessionClient) -> None:
    with wsession_client.connect("/ws?token=letmein") as conn:
        assert conn.receive_json() == {"id": conn.session.id}


def test_cleanup_runs_when_the_client_drops(
    wsession_client: SessionClient, wsession_recorder: HookRecorder
) -> None:
    with wsession_client.connect("/ws?token=letmein") as conn:
        assert conn.session.user_key == "user-42" and conn.session.id in online
        conn.drop()  # no close frame: the server reports 1005
    assert conn.session.id not in online
    wsession_recorder.assert_ended_once(conn.session.id, EndReason.CONNECTION_LOST)
    wsession_recorder.assert_hooks(conn.session.id, ["authenticate", "cleanup"])


def test_idle_sessions_are_closed_after_five_minutes(
    wsession_client: SessionClient, wsession_clock: ManualClock
) -> None:
    with wsession_client.connect("/ws?token=letmein") as conn:
        conn.receive_json()
        wsession_clock.advance(299)
        conn.send_text("hi")  # activity restarts the countdown
        assert conn.receive_text() == "HI"
        wsession_clock.advance(300)
        assert conn.receive_close() == (4408, "idle timeout")
    assert conn.session.end_reason is EndReason.SERVER_CLOSED


def test_a_bad_token_is_refused(wsession_client: SessionClient) -> None:
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as denied, wsession_client.connect("/ws"):
        pass
    assert denied.value.status_code == 403
