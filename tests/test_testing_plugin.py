"""The pytest plugin (wsession_pytest): a user's first test in three lines, fixtures that fail
with a clear message, and nothing imported for test runs that do not use them."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

APP = """
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from wsession import SessionManager, WSessionMiddleware, get_session

sessions = SessionManager(idle_timeout=60)


async def hello(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_json({"id": get_session(ws).id})
    async for _ in ws.iter_text():
        pass


app = Starlette(
    routes=[WebSocketRoute("/ws", hello)],
    middleware=[Middleware(WSessionMiddleware, manager=sessions)],
)
"""

INI = """
[pytest]
wsession_app = myapp:app
filterwarnings = error
addopts = --strict-markers
"""


def test_a_first_test_is_three_lines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.makeini(INI)
    pytester.syspathinsert()
    pytester.makepyfile(
        test_first="""
        def test_connect(wsession_client):
            with wsession_client.connect("/ws") as conn:
                assert conn.receive_json() == {"id": conn.session.id}
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_every_fixture_together(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.makeini(INI)
    pytester.syspathinsert()
    pytester.makepyfile(
        test_all="""
        import myapp
        from wsession import EndReason

        def test_idle(wsession_client, wsession_clock, wsession_recorder, wsession_manager):
            assert wsession_manager is myapp.sessions
            with wsession_client.connect("/ws") as conn:
                conn.receive_json()
                wsession_clock.advance(60)
                assert conn.receive_close() == (4408, "idle timeout")
            wsession_recorder.assert_ended_once(conn.session.id, EndReason.SERVER_CLOSED)

        def test_recorder_detached_after_the_test():
            assert myapp.sessions.connect_hooks == ()
            assert myapp.sessions.disconnect_hooks == ()
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_an_overridden_app_fixture_needs_no_configuration(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        test_override="""
        import pytest
        import myapp

        @pytest.fixture
        def wsession_app():
            return myapp.app

        def test_connect(wsession_client):
            with wsession_client.connect("/ws") as conn:
                conn.drop()
            assert conn.session.end_reason == "connection lost"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_without_an_app_the_fixture_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_missing="""
        def test_connect(wsession_client):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a `wsession_app` fixture*"])


def test_loading_the_plugin_imports_nothing_else() -> None:
    code = (
        "import sys, wsession_pytest;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('wsession', 'wsession_pytest', 'starlette', 'pydantic', 'httpx', 'anyio')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert out.strip() == "['wsession_pytest']"
