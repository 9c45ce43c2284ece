from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient

from wsession import EndReason, Session, SessionManager, WSessionMiddleware, get_session
from wsession.testing import HookRecorder, connect

# -- the app (normally in its own module) --
sessions = SessionManager()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with sessions:  # opens the registry; drains on shutdown
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(WSessionMiddleware, manager=sessions)


@app.websocket("/rooms/{room}")
async def room(websocket: WebSocket, room: str, session: Session = Depends(get_session)) -> None:
    await websocket.accept()
    await sessions.join(session.id, room)
    try:
        while True:
            text = await websocket.receive_text()
            await sessions.send_group(room, {"from": session.id, "text": text})
    except WebSocketDisconnect:
        pass


# -- the tests (plain TestClient and connect(), no fixtures) --
def test_a_message_reaches_the_room() -> None:
    with (
        TestClient(app) as client,
        connect(client, "/rooms/blue") as alice,
        connect(client, "/rooms/blue") as bob,
    ):
        alice.send_text("hello")
        expected = {"from": alice.session.id, "text": "hello"}
        assert alice.receive_json() == expected
        assert bob.receive_json() == expected
        assert alice.session.groups == {"blue"}


def test_server_shutdown_ends_the_session_once() -> None:
    with HookRecorder(sessions) as recorder, TestClient(app) as client:
        with connect(client, "/rooms/red") as conn:
            conn.server_shutdown()  # uvicorn tells the app 1012
        recorder.assert_ended_once(conn.session.id, EndReason.SERVER_SHUTDOWN, code=1012)
        assert conn.session.groups == set()  # groups are left automatically
