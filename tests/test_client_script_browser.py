"""The JavaScript client in a real headless Chromium, against a stub of the resumption contract.

The page (served by ``tests/apps/resume_stub.py``) loads ``/wsession-client.js`` from
``client_script_route()`` and records every client event in ``window.log``. The browser talks
to the stub through a :class:`DropProxy`, so a test can drop the TCP connection without a close
frame; the test drives the stub over HTTP, straight to its port.

Needs a system Chromium (see tests/test_browser.py); without one these tests skip, unless
``WSESSION_REQUIRE_BROWSER=1`` turns the skip into a failure.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.apps.resume_stub import DropProxy, create_app
from tests.browser_support import CHROMIUM_ARGS, ThreadedServer, find_chromium

pytestmark = [pytest.mark.browser, pytest.mark.timeout(20)]

WAIT_MS = 5000  # any single wait in the page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = find_chromium()
    if chromium is None:
        message = "no system Chromium found (install chromium-headless-shell, or WSESSION_CHROMIUM)"
        if os.environ.get("WSESSION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WSESSION_REQUIRE_BROWSER=1 but {message}", pytrace=False)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Stub:
    """The stub server, the proxy in front of it, and the HTTP controls."""

    def __init__(self, server: ThreadedServer, proxy: DropProxy) -> None:
        self.server, self.proxy = server, proxy
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def post(self, what: str, **params: Any) -> Any:
        response = self.http.post(f"/ctl/{what}", params=params)
        response.raise_for_status()
        return response.json()

    def send(self, n: int) -> int:
        """Send ``n`` numbered messages to the latest session; return its last seq."""
        seq: int = self.post("send", n=n)["seq"]
        return seq

    def wait_connects(self, n: int) -> list[dict[str, str]]:
        """The query of every handshake, once there were at least ``n``."""
        response = self.http.get("/ctl/wait", params={"n": n})
        assert response.status_code == 200, f"fewer than {n} handshakes: {response.json()}"
        connects: list[dict[str, str]] = response.json()["connects"]
        return connects

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/ctl/state").json()
        return data


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = ThreadedServer(create_app)
    server.start()
    proxy = DropProxy(server.port)
    running = Stub(server, proxy)
    try:
        yield running
    finally:
        running.http.close()
        proxy.close()
        server.stop(keep_port=False)


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught errors of the page; a test that expects some takes them out."""
    return []


@pytest.fixture
def page(browser: Browser, stub: Stub, page_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context()
    errors = page_errors
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{stub.proxy.url}/")
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], "the page raised uncaught errors"


# -- page helpers ------------------------------------------------------------------------------


def start(
    page: Page, options: dict[str, Any] | None = None, *, jitter: float | None = None
) -> None:
    """Create the client for ``/ws?name=Ann`` (relative to the page, so through the proxy)."""
    opts = {"backoffBase": 50, "backoffCap": 200, **(options or {})}
    page.evaluate("([o, r]) => start('/ws?name=Ann', o, r)", [opts, jitter])


def events(page: Page, name: str | None = None) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = page.evaluate("window.log")
    return [entry for entry in log if name is None or entry["event"] == name]


def details(page: Page, name: str) -> list[Any]:
    return [entry["detail"] for entry in events(page, name)]


def wait_events(page: Page, name: str, count: int) -> list[Any]:
    """The details of ``name`` events once there are ``count`` of them."""
    page.wait_for_function(
        "([n, c]) => window.log.filter((e) => e.event === n).length >= c", arg=[name, count]
    )
    return details(page, name)


def seqs(page: Page) -> list[int]:
    return [message["seq"] for message in details(page, "message")]


def wait_seq(page: Page, seq: int) -> None:
    page.wait_for_function("(s) => window.client.lastSeq >= s", arg=seq)


def client_value(page: Page, expression: str) -> Any:
    return page.evaluate(f"window.client.{expression}")


# -- tests -------------------------------------------------------------------------------------


def test_a_dropped_connection_resumes_with_every_missed_message_once(
    page: Page, stub: Stub
) -> None:
    start(page)
    [welcome] = wait_events(page, "welcome", 1)
    assert welcome["resumed"] is False and welcome["name"] == "Ann"
    first_token = welcome["resume"]
    assert stub.send(3) == 3
    wait_seq(page, 3)

    # Drop TCP (no close frame) and send while the client is away: the reconnect is held at
    # the stub until those three are buffered, so they can only arrive by replay.
    stub.post("set", hold=1)
    assert stub.proxy.cut() >= 1
    [reconnecting] = wait_events(page, "reconnecting", 1)
    assert reconnecting["code"] == 1006 and reconnecting["attempt"] == 1
    assert 0 <= reconnecting["delay"] < 50
    assert stub.send(3) == 6
    connects = stub.wait_connects(2)
    assert connects[0] == {"name": "Ann"}
    assert connects[1] == {"name": "Ann", "resume": first_token, "last": "3"}
    stub.post("set", release=1)

    [recovered] = wait_events(page, "recovered", 1)
    assert recovered["id"] == welcome["id"]
    assert recovered["last"] == 3 and recovered["replayed"] == 3
    assert seqs(page) == [1, 2, 3, 4, 5, 6]
    # recovered comes after the replayed messages it counts, and after the new welcome
    order = [entry["event"] for entry in events(page)]
    assert order[-5:] == ["welcome", "message", "message", "message", "recovered"]
    assert details(page, "not_recovered") == []

    # A message the client already has, sent again, is dropped; the next one arrives once.
    stub.post("resend", seq=5)
    stub.send(1)
    wait_seq(page, 7)
    assert seqs(page) == [1, 2, 3, 4, 5, 6, 7]
    assert client_value(page, "duplicates") == 1

    # send() goes out as JSON; the echo is numbered like any server message.
    assert page.evaluate("window.client.send({type: 'echo', text: 'hi'})") is True
    wait_seq(page, 8)
    assert details(page, "message")[-1] == {"type": "echo", "text": "hi", "seq": 8}
    assert stub.state()["received"] == [{"type": "echo", "text": "hi"}]


def test_the_rotated_token_is_used_on_the_next_reconnect(page: Page, stub: Stub) -> None:
    start(page)
    wait_events(page, "welcome", 1)
    stub.send(2)
    wait_seq(page, 2)
    stub.post("close", code=1012, reason="restart")
    reconnecting = wait_events(page, "reconnecting", 1)
    assert reconnecting[0]["code"] == 1012 and reconnecting[0]["reason"] == "restart"
    welcomes = wait_events(page, "welcome", 2)
    wait_events(page, "recovered", 1)
    assert welcomes[1]["resumed"] is True and welcomes[1]["id"] == welcomes[0]["id"]
    assert welcomes[1]["resume"] != welcomes[0]["resume"]

    stub.send(1)
    wait_seq(page, 3)
    stub.post("close", code=1001)
    welcomes = wait_events(page, "welcome", 3)
    connects = stub.wait_connects(3)
    assert connects[1]["resume"] == welcomes[0]["resume"] and connects[1]["last"] == "2"
    assert connects[2]["resume"] == welcomes[1]["resume"] and connects[2]["last"] == "3"
    recovered = wait_events(page, "recovered", 2)
    assert [r["replayed"] for r in recovered] == [0, 0]
    assert welcomes[2]["id"] == welcomes[0]["id"]
    assert seqs(page) == [1, 2, 3]


def test_backoff_grows_exponentially_up_to_the_cap(page: Page, stub: Stub) -> None:
    # jitter 0.5: each delay is half its ceiling min(cap, base * 2^(attempt-1)).
    start(page, {"backoffBase": 100, "backoffCap": 300}, jitter=0.5)
    wait_events(page, "welcome", 1)
    stub.post("set", refuse=3)  # three handshakes refused (the browser sees 1006)
    stub.post("close", code=1012)
    wait_events(page, "recovered", 1)
    attempts = details(page, "reconnecting")
    assert [(a["attempt"], a["delay"]) for a in attempts] == [
        (1, 50),
        (2, 100),
        (3, 150),
        (4, 150),
    ]
    assert [a["code"] for a in attempts] == [1012, 1006, 1006, 1006]
    assert len(stub.wait_connects(5)) == 5
    # ...and it really waits: each handshake comes at least its delay after the one before
    # (a lower bound only, so a loaded machine cannot fail it; 20 ms for measuring apart).
    times = stub.state()["connect_times"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[1:])]
    assert all(
        gap >= delay / 1000 - 0.02 for gap, delay in zip(gaps, [100, 150, 150], strict=True)
    ), gaps
    # The count restarts after a welcome: the next drop starts again from the first delay.
    assert client_value(page, "attempt") == 0
    stub.post("close", code=1012)
    wait_events(page, "recovered", 2)
    assert details(page, "reconnecting")[-1]["delay"] == 50


def test_it_gives_up_after_max_attempts(page: Page, stub: Stub) -> None:
    start(page, {"maxAttempts": 2})
    wait_events(page, "welcome", 1)
    stub.post("set", refuse=10)
    stub.proxy.cut()
    [closed] = wait_events(page, "close", 1)
    assert closed["gaveUp"] is True and closed["code"] == 1006
    assert [a["attempt"] for a in details(page, "reconnecting")] == [1, 2]
    assert client_value(page, "state") == "closed"
    assert len(stub.wait_connects(3)) == 3


def test_a_lost_session_is_reported_and_numbering_starts_again(page: Page, stub: Stub) -> None:
    start(page)
    [first] = wait_events(page, "welcome", 1)
    stub.send(2)
    wait_seq(page, 2)
    stub.post("set", hold=1)
    stub.proxy.cut()
    stub.send(10)  # more than the stub's buffer (5) holds: no partial replay, a new session
    stub.wait_connects(2)
    stub.post("set", release=1)

    [lost] = wait_events(page, "not_recovered", 1)
    welcomes = details(page, "welcome")
    assert welcomes[1]["resumed"] is False and welcomes[1]["id"] != first["id"]
    assert lost["id"] == welcomes[1]["id"] and lost["previousId"] == first["id"]
    assert lost["last"] == 2
    # not_recovered comes first, so the app has cleared its state when the welcome arrives
    assert [e["event"] for e in events(page)][-2:] == ["not_recovered", "welcome"]
    assert client_value(page, "lastSeq") == 0 and client_value(page, "sessionId") == lost["id"]

    # The new session's seq 1 and 2 are not mistaken for duplicates of the old session's.
    stub.send(2)
    wait_seq(page, 2)
    assert seqs(page) == [1, 2, 1, 2]
    assert details(page, "recovered") == []
    # ...and the next reconnect presents the new session's token.
    stub.post("close", code=1012)
    wait_events(page, "recovered", 1)
    third = stub.wait_connects(3)[2]
    assert third["resume"] == welcomes[1]["resume"] and third["last"] == "2"


def test_without_a_replay_count_recovered_fires_on_the_welcome(page: Page, stub: Stub) -> None:
    stub.post("set", announce_replay=0)
    start(page)
    wait_events(page, "welcome", 1)
    stub.send(1)
    wait_seq(page, 1)
    stub.post("set", hold=1)
    stub.proxy.cut()
    stub.send(2)
    stub.wait_connects(2)
    stub.post("set", release=1)
    [recovered] = wait_events(page, "recovered", 1)
    assert recovered["replayed"] is None and recovered["last"] == 1
    wait_seq(page, 3)
    assert seqs(page) == [1, 2, 3]


@pytest.mark.parametrize("code", [4403, 1008, 4401, 1000])
def test_a_do_not_come_back_close_ends_the_client(page: Page, stub: Stub, code: int) -> None:
    start(page)
    wait_events(page, "welcome", 1)
    stub.post("close", code=code, reason="go away")
    [closed] = wait_events(page, "close", 1)
    # The client decides in the socket's close handler: a final close means no timer is left.
    assert closed == {"code": code, "reason": "go away", "wasClean": True, "gaveUp": False}
    assert details(page, "reconnecting") == []
    assert client_value(page, "state") == "closed"
    assert len(stub.state()["connects"]) == 1


def test_reconnect_codes_are_configurable(page: Page, stub: Stub) -> None:
    start(page, {"reconnectOn": [4000]})
    wait_events(page, "welcome", 1)
    stub.post("close", code=4000)
    wait_events(page, "recovered", 1)
    stub.post("close", code=1012)  # not in the list any more
    [closed] = wait_events(page, "close", 1)
    assert closed["code"] == 1012
    assert len(details(page, "reconnecting")) == 1


def test_close_by_the_app_does_not_reconnect(page: Page, stub: Stub) -> None:
    start(page)
    wait_events(page, "welcome", 1)
    page.evaluate("window.client.close(1000, 'bye')")
    [closed] = wait_events(page, "close", 1)
    assert closed["code"] == 1000 and closed["gaveUp"] is False
    assert details(page, "reconnecting") == []
    assert page.evaluate("window.client.send({type: 'echo'})") is False


def test_close_while_waiting_to_reconnect_cancels_the_retry(page: Page, stub: Stub) -> None:
    start(page, {"backoffBase": 60_000, "backoffCap": 60_000}, jitter=0.5)
    wait_events(page, "welcome", 1)
    stub.proxy.cut()
    [waiting] = wait_events(page, "reconnecting", 1)
    assert waiting["delay"] == 30_000
    page.evaluate("window.client.close()")
    [closed] = wait_events(page, "close", 1)
    assert closed["gaveUp"] is False
    assert client_value(page, "state") == "closed"


def test_connect_while_waiting_reconnects_at_once(page: Page, stub: Stub) -> None:
    page.clock.install()  # fake timers, so the test can run past the 30 s retry
    start(page, {"backoffBase": 60_000, "backoffCap": 60_000}, jitter=0.5)
    [welcome] = wait_events(page, "welcome", 1)
    stub.proxy.cut()
    wait_events(page, "reconnecting", 1)
    page.evaluate("window.client.connect()")
    [recovered] = wait_events(page, "recovered", 1)
    assert recovered["id"] == welcome["id"]
    # The pending retry was cancelled: past its time the client has not opened another
    # socket (a retry would have set the state to "connecting" in the timer itself).
    page.clock.run_for(31_000)
    assert client_value(page, "state") == "open"
    assert len(stub.state()["connects"]) == 2


def test_a_throwing_handler_does_not_stop_the_others(
    page: Page, stub: Stub, page_errors: list[str]
) -> None:
    page.evaluate(
        "window.client_errors = 0; window.addEventListener('error', () => window.client_errors++)"
    )
    start(page)
    # (void: Playwright would call the unsubscribe function that on() returns)
    page.evaluate("void window.client.on('message', () => { throw new Error('app bug'); })")
    wait_events(page, "welcome", 1)
    stub.send(2)
    wait_seq(page, 2)
    # The page's own handler (added first) saw both; the error still reached the page.
    assert seqs(page) == [1, 2]
    page.wait_for_function("window.client_errors >= 2")
    assert client_value(page, "state") == "open"
    assert len(page_errors) == 2 and all("app bug" in error for error in page_errors)
    page_errors.clear()


FAKE_SOCKET = """
class FakeSocket {
  constructor(url) { this.url = url; this.readyState = 0; FakeSocket.made.push(this); }
  open() { this.readyState = 1; this.onopen({}); }
  push(message) { this.onmessage({ data: JSON.stringify(message) }); }
  drop() { this.readyState = 3; this.onclose({ code: 1006, reason: "", wasClean: false }); }
  send() {}
  close() {}
}
FakeSocket.made = [];
window.FakeSocket = FakeSocket;
null;  // a string evaluating to a function would be called by Playwright
"""


def test_the_server_side_names_are_configurable(page: Page) -> None:
    """seqField / resumeParam / lastParam follow the server's resume_* settings."""
    page.evaluate(FAKE_SOCKET)
    page.evaluate(
        """() => {
        const client = new WSessionClient('ws://127.0.0.1:9/ws?name=Ann', {
          seqField: 'n', resumeParam: 'r', lastParam: 'l', WebSocket: FakeSocket,
          backoffBase: 1, backoffCap: 1,
        });
        for (const name of WSessionClient.events) {
          client.on(name, (detail) => window.log.push({ event: name, detail }));
        }
        window.client = client;
        const first = FakeSocket.made[0];
        first.open();
        first.push({ type: 'welcome', id: 'A', resume: 'T1', resumed: false });
        first.push({ type: 'msg', n: 1 });
        first.push({ type: 'msg', n: 2 });
        first.push({ type: 'msg', n: 2, seq: 99 });
        first.drop();
      }"""
    )
    page.wait_for_function("FakeSocket.made.length === 2")
    assert page.evaluate("FakeSocket.made[0].url") == "ws://127.0.0.1:9/ws?name=Ann"
    assert page.evaluate("FakeSocket.made[1].url") == "ws://127.0.0.1:9/ws?name=Ann&r=T1&l=2"
    assert [m["n"] for m in details(page, "message")] == [1, 2]
    assert client_value(page, "duplicates") == 1
    page.evaluate("window.client.close()")


def test_without_resumption_on_the_server_it_reconnects_as_new(page: Page) -> None:
    """A welcome with ``"resume": null``: no resume parameters, and not_recovered."""
    page.evaluate(FAKE_SOCKET)
    page.evaluate(
        """() => {
        const client = new WSessionClient('ws://127.0.0.1:9/ws?name=Ann', {
          WebSocket: FakeSocket, backoffBase: 1, backoffCap: 1,
        });
        for (const name of WSessionClient.events) {
          client.on(name, (detail) => window.log.push({ event: name, detail }));
        }
        window.client = client;
        FakeSocket.made[0].open();
        FakeSocket.made[0].push({ type: 'welcome', id: 'A', resume: null, resumed: false });
        FakeSocket.made[0].push({ type: 'msg' });
        FakeSocket.made[0].drop();
      }"""
    )
    page.wait_for_function("FakeSocket.made.length === 2")
    assert page.evaluate("FakeSocket.made[1].url") == "ws://127.0.0.1:9/ws?name=Ann"
    page.evaluate(
        """() => {
        FakeSocket.made[1].open();
        FakeSocket.made[1].push({ type: 'welcome', id: 'B', resume: null, resumed: false });
      }"""
    )
    [lost] = details(page, "not_recovered")
    assert (lost["id"], lost["previousId"], lost["last"]) == ("B", "A", 0)
    assert len(details(page, "message")) == 1  # unnumbered messages are delivered as they are
    page.evaluate("window.client.close()")


def test_the_script_also_loads_as_a_module(browser: Browser, stub: Stub) -> None:
    context = browser.new_context()
    try:
        blank = context.new_page()
        blank.set_default_timeout(WAIT_MS)
        blank.goto(f"{stub.proxy.url}/blank")
        kind = blank.evaluate(
            "import('/wsession-client.js').then(() => typeof globalThis.WSessionClient)"
        )
        assert kind == "function"
    finally:
        context.close()
