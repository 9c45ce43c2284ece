"""The JavaScript client against the real example app (wsession's own resumption), in Chromium.

The example serves the client itself (``/wsession-client.js``); a thin ASGI wrapper only adds
the stub's test page (``/client-test``, which records every client event); everything else
(``/ws``, ``/api``, the script, the lifespan) is the example app's. The browser goes through
a :class:`DropProxy` so the test can drop TCP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from example_app.app import create_app
from tests.apps.resume_stub import TEST_PAGE, DropProxy
from tests.browser_support import ThreadedServer
from tests.test_client_script_browser import (  # the same browser and page helpers
    WAIT_MS,
    browser,
    details,
    wait_events,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(20)]

__all__ = ["browser"]  # a fixture, imported to be shared


def example_with_client() -> ASGIApp:
    """The example app, plus the test page at ``/client-test``."""
    example = create_app(environ={"WSESSION_RESUME_WINDOW": "30"})

    async def page(request: Request) -> Response:
        return HTMLResponse(TEST_PAGE)

    test_page = Route("/client-test", page)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/client-test":
            await test_page.handle(scope, receive, send)
        else:
            await example(scope, receive, send)

    return app


class Example:
    def __init__(self) -> None:
        self.server = ThreadedServer(example_with_client)
        self.server.start()
        self.proxy = DropProxy(self.server.port)
        self.http = httpx.Client(base_url=self.server.url, timeout=10)

    def dm(self, session_id: str, text: str) -> str:
        response = self.http.post(f"/api/send/{session_id}", json={"text": text})
        response.raise_for_status()
        result: str = response.json()["result"]
        return result

    def close(self) -> None:
        self.http.close()
        self.proxy.close()
        self.server.stop(keep_port=False)


@pytest.fixture
def example() -> Iterator[Example]:
    running = Example()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def page(browser: Browser, example: Example) -> Iterator[Page]:
    context = browser.new_context()
    errors: list[str] = []
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{example.proxy.url}/client-test")
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], "the page raised uncaught errors"


def start(page: Page) -> dict[str, Any]:
    page.evaluate("start('/ws?name=Ann', {backoffBase: 50, backoffCap: 200}, null)")
    [welcome] = wait_events(page, "welcome", 1)
    return dict(welcome)


def dms(page: Page) -> list[str]:
    return [m["text"] for m in details(page, "message") if m["type"] == "dm"]


def wait_dms(page: Page, count: int) -> list[str]:
    page.wait_for_function(
        "(c) => window.log.filter((e) => e.event === 'message' && e.detail.type === 'dm')"
        ".length >= c",
        arg=count,
    )
    return dms(page)


def assert_numbered_once(page: Page) -> None:
    """Every message the app got carries the next seq: no gap, no duplicate, in order."""
    seqs = [m["seq"] for m in details(page, "message")]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_a_dropped_connection_gets_its_session_and_missed_messages_back(
    page: Page, example: Example
) -> None:
    welcome = start(page)
    assert welcome["resumed"] is False and isinstance(welcome["resume"], str)
    for text in ("a", "b", "c"):
        example.dm(welcome["id"], text)
    assert wait_dms(page, 3) == ["a", "b", "c"]

    # Drop TCP and hold the reconnect at the proxy while three more are sent: they can only
    # arrive by replay (whether or not the server has noticed the drop yet).
    example.proxy.hold()
    example.proxy.cut()
    wait_events(page, "reconnecting", 1)
    for text in ("d", "e", "f"):
        example.dm(welcome["id"], text)
    example.proxy.release()

    [recovered] = wait_events(page, "recovered", 1)
    welcomes = details(page, "welcome")
    assert welcomes[1]["resumed"] is True and welcomes[1]["id"] == welcome["id"]
    assert welcomes[1]["resume"] != welcome["resume"]
    assert recovered["id"] == welcome["id"]
    assert recovered["replayed"] == welcomes[1]["replay"] >= 3
    assert dms(page) == ["a", "b", "c", "d", "e", "f"]
    assert_numbered_once(page)
    assert details(page, "not_recovered") == []

    # Live traffic continues in the same numbering.
    example.dm(welcome["id"], "g")
    assert wait_dms(page, 7)[-1] == "g"
    assert_numbered_once(page)


def test_a_restart_of_the_only_worker_is_not_recovered(page: Page, example: Example) -> None:
    """One worker's memory dies with it: the client is told, and numbering starts again."""
    welcome = start(page)
    example.dm(welcome["id"], "before")
    wait_dms(page, 1)
    example.server.stop()  # drain: 1012, and the port refuses until the restart
    first = wait_events(page, "reconnecting", 1)[0]  # then 1006s while the port refuses
    assert first["code"] == 1012
    example.server.start()
    [lost] = wait_events(page, "not_recovered", 1)
    assert lost["previousId"] == welcome["id"] and lost["id"] != welcome["id"]
    new_id = lost["id"]
    example.dm(new_id, "after")
    assert wait_dms(page, 2) == ["before", "after"]
    # The new session numbers from 1 again (its own presence diff may come first).
    [after] = [m for m in details(page, "message") if m.get("text") == "after"]
    assert 1 <= after["seq"] <= 3
    assert page.evaluate("window.client.sessionId") == new_id
