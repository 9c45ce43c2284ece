"""The demo page keeps its conversation across a restart of its worker (issue 14, in Chromium).

Two example workers (``python -m example_app``, real processes) on a private redis-server, with
resumption on and one resume secret. The page is served by, and connected to, worker A; Bob, a
plain WebSocket client of the test, sits on worker B, which stays up. Bob sends the page direct
messages, broadcasts and room messages before A's restart, while A drains (SIGTERM), while A is
down (the page's session then waits in Redis, detached) and after A is back on the same port.
The page must resume the same session, say so once, and show every message exactly once and in
Bob's order.

Needs the system Chromium and redis-server (both skip locally when missing; CI requires them,
see tests/test_browser.py and tests/redis_support.py).
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, WebSocket, expect
from websockets.sync.client import ClientConnection, connect

from example_app.procs import free_port, start_worker, stop, wait_for_port
from tests.redis_support import RedisServer
from tests.test_browser import browser, join, my_id, person, status

pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.timeout(120)]
__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with tests/test_browser.py

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_MS = 15_000  # any single wait on the page
BACKOFF_CAP_MS = 30_000  # the page's longest wait between two attempts (app.js BACKOFF_MAX_MS)
CLIENT_WAIT_S = 10.0  # any single wait for a frame on a test client's connection
PRESENCE_WAIT_S = 5.0  # presence settles within a few intervals (0.5 s each)
ROOM = "standup"
LOBBY = "lobby"


# -- processes ---------------------------------------------------------------------------------


class Workers:
    """Workers A (the page's; restartable on its port) and B (stays up) of the example app."""

    def __init__(self, redis: RedisServer) -> None:
        self.env = {
            **os.environ,
            "WSESSION_REDIS_URL": redis.url,
            "WSESSION_REDIS_PREFIX": f"rbrowser-{secrets.token_hex(4)}",
            "WSESSION_HEARTBEAT": "0.5",
            "WSESSION_RESUME_WINDOW": "60",
            "WSESSION_RESUME_SECRET": "r" * 32,  # the same on both: either reads a token
            "WSESSION_DRAIN_TIMEOUT": "2",
        }
        self.a, self.b = free_port(), free_port()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, *ports: int) -> None:
        for port in ports:
            self.procs[port] = start_worker(port, self.env)
        for port in ports:
            wait_for_port(port, self.procs[port], f"example worker on {port}", timeout=30)

    def terminate_a(self) -> None:
        """SIGTERM to A: it drains (its sessions detach) and exits."""
        self.procs[self.a].send_signal(signal.SIGTERM)

    def wait_a(self) -> None:
        # uvicorn re-raises the signal it handled once it has shut down.
        assert self.procs[self.a].wait(timeout=30) in (0, -signal.SIGTERM)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"


@pytest.fixture
def workers(own_redis_server: RedisServer) -> Iterator[Workers]:
    running = Workers(own_redis_server)
    try:
        running.start(running.a, running.b)
        yield running
    finally:
        running.stop_all()


# -- a test's own WebSocket clients ------------------------------------------------------------


class Client:
    """A WebSocket client of the example that waits for each of its sends to be handled, and
    keeps its view of the lobby from its welcome and the diffs after it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.marks = 0
        self.lobby: dict[str, str] = {}  # id -> name
        self.left: list[str] = []  # ids that left the lobby, in order
        welcome = self._next()
        assert welcome["type"] == "welcome"
        self.id: str = welcome["id"]
        for entry in welcome["presence"]:
            self.lobby.update(dict.fromkeys(entry["ids"], entry["name"]))

    def _next(self, timeout: float = CLIENT_WAIT_S) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.ws.recv(timeout=timeout))
        if message.get("type") == "presence_diff" and message["topic"] == LOBBY:
            for entry in message["leaves"]:
                for sid in entry["ids"]:
                    self.lobby.pop(sid, None)
                    self.left.append(sid)
            for entry in message["joins"]:
                self.lobby.update(dict.fromkeys(entry["ids"], entry["name"]))
        return message

    def send(self, to: str, kind: str, text: str) -> None:
        """A direct message to ``to`` (kind ``dm``), a message to ``ROOM`` (``group``) or a
        broadcast, then a round trip."""
        message = {"dm": {"to": to}, "group": {"group": ROOM}, "broadcast": {}}[kind]
        self.ws.send(json.dumps({"type": kind, **message, "text": text}))
        self.round_trip()

    def join(self, room: str) -> None:
        self.ws.send(json.dumps({"type": "join", "group": room}))
        self.round_trip()

    def round_trip(self) -> None:
        """Send an echo and wait for it, failing on an error before it. The worker handles one
        client's messages in order, so the echo means the sends before it returned (with Redis:
        their messages were numbered and recorded for their recipients)."""
        self.marks += 1
        mark = f"mark {self.marks}"
        self.ws.send(json.dumps({"type": "echo", "text": mark}))
        for _ in range(1000):  # bounded: own broadcasts, room messages and diffs come too
            reply = self._next()
            assert reply["type"] != "error", f"refused: {reply}"
            if reply.get("type") == "echo" and reply.get("text") == mark:
                return
        raise AssertionError(f"no echo of {mark!r}")

    def wait_lobby(self, check: Callable[[dict[str, str]], bool]) -> bool:
        """Read until the lobby as seen here passes ``check``; False after PRESENCE_WAIT_S."""
        deadline = time.monotonic() + PRESENCE_WAIT_S
        while not check(self.lobby):  # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self._next(timeout=left)
            except TimeoutError:
                return False
        return True


def client(stack: ExitStack, port: int, name: str) -> Client:
    url = f"ws://127.0.0.1:{port}/ws?name={name}"
    return Client(stack.enter_context(connect(url, open_timeout=CLIENT_WAIT_S)))


# -- the page ----------------------------------------------------------------------------------


class Frames:
    """Every frame the page's WebSockets received, per socket, as Chromium saw them."""

    def __init__(self, page: Page) -> None:
        self.sockets: list[list[dict[str, Any]]] = []
        page.on("websocket", self._opened)

    def _opened(self, socket: WebSocket) -> None:
        frames: list[dict[str, Any]] = []
        self.sockets.append(frames)
        socket.on("framereceived", lambda payload: frames.append(json.loads(payload)))

    def welcomes(self) -> list[dict[str, Any]]:
        return [f for frames in self.sockets for f in frames if f.get("type") == "welcome"]

    def seqs(self) -> list[int]:
        return [f["seq"] for frames in self.sockets for f in frames if f.get("type") != "welcome"]


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 760})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # Fake timers that run in real time; reconnect_now() jumps them ahead.
    opened.clock.install(time=datetime.datetime.now())
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], "the page raised uncaught errors"


def log_texts(page: Page) -> list[str]:
    """The texts of the direct, broadcast and room messages in the page's log, top to bottom."""
    kinds = ("dm", "broadcast", "group")
    selector = ", ".join(f'#log [data-testid="message"][data-kind="{k}"] .text' for k in kinds)
    return page.locator(selector).all_inner_texts()


def event_entries(page: Page, event: str) -> Locator:
    return page.locator(f'#log [data-testid="message"][data-event="{event}"]')


def reconnect_now(page: Page) -> None:
    """Let the page's pending retry run now instead of waiting out its backoff (up to 30 s):
    the page's clock jumps ahead until a connection is welcomed (bounded)."""
    for _ in range(20):
        page.clock.fast_forward(BACKOFF_CAP_MS)
        try:
            expect(status(page)).to_have_attribute("data-state", "connected", timeout=1000)
            return
        except AssertionError:
            continue  # that attempt was refused or is still on its way
    raise AssertionError(f"the page did not reconnect: {status(page).inner_text()!r}")


def restart_a_and_resume(workers: Workers, page: Page, ann_id: str) -> None:
    """Start A again on its port; the page resumes its session there and says so once."""
    workers.start(workers.a)
    reconnect_now(page)
    expect(status(page)).to_have_text("connected (resumed)")
    expect(page.get_by_test_id("me-id")).to_have_text(ann_id)  # the same session
    expect(event_entries(page, "recovered")).to_have_count(1)
    expect(event_entries(page, "not_recovered")).to_have_count(0)


def open_page(page: Page, workers: Workers) -> str:
    """The demo page as Ann, served by worker A (so connected to it); returns her id."""
    page.goto(f"{workers.url(workers.a)}/?name=Ann")
    expect(status(page)).to_have_attribute("data-state", "connected")
    return my_id(page)


# -- tests -------------------------------------------------------------------------------------


def test_the_demo_page_keeps_its_conversation_across_a_restart_of_its_worker(
    workers: Workers, page: Page
) -> None:
    frames = Frames(page)
    ann_id = open_page(page, workers)
    join(page, ROOM)
    with ExitStack() as stack:
        bob = client(stack, workers.b, "Bob")
        bob.join(ROOM)
        expected: list[str] = []

        def say(kind: str, text: str) -> None:
            bob.send(ann_id, kind, text)
            expected.append(text)

        say("dm", "1 before the restart (dm)")
        say("broadcast", "2 before the restart (broadcast)")
        say("group", "3 before the restart (room)")
        expect(page.get_by_text(expected[-1])).to_have_count(1)

        # Worker A drains: the page's connection is closed and its session detached.
        workers.terminate_a()
        say("dm", "4 while its worker drains (dm)")  # reaches the connection or the journal
        workers.wait_a()
        expect(status(page)).to_have_attribute("data-state", "reconnecting")
        listed = httpx.get(f"{workers.url(workers.b)}/api/sessions", timeout=10).json()
        assert {"id": ann_id, "state": "detached"} in [
            {"id": s["id"], "state": s["state"]} for s in listed["sessions"]
        ]

        # Worker A is down: these wait in Redis for the detached session.
        say("dm", "5 while its worker is down (dm)")
        say("broadcast", "6 while its worker is down (broadcast)")
        say("group", "7 while its worker is down (room)")
        say("dm", "8 while its worker is down (dm)")

        restart_a_and_resume(workers, page, ann_id)

        say("dm", "9 after the restart (dm)")
        say("broadcast", "10 after the restart (broadcast)")
        say("group", "11 after the restart (room)")
        expect(page.get_by_text(expected[-1])).to_have_count(1)

    # Every message once, in Bob's order, nothing else, nothing twice.
    assert log_texts(page) == expected
    # The page said how many it recovered: what the resumed welcome announced.
    resumed = [w for w in frames.welcomes() if w["resumed"]]
    assert len(resumed) == 1 and resumed[0]["id"] == ann_id, frames.welcomes()
    replay = resumed[0]["replay"]
    assert replay >= 4  # at least 5 to 8 were missed
    expect(event_entries(page, "recovered")).to_contain_text(
        f"Reconnected: same session, {replay} missed message(s) recovered"
    )
    # On the wire too: every number once, in order, none skipped (no duplicate that the
    # client had to drop).
    seqs = frames.seqs()
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "resume-restart-Ann.png"))


def test_presence_survives_a_restart_of_the_pages_worker(workers: Workers, page: Page) -> None:
    """docs/resumption.md: a rolling restart is invisible apart from latency, and a quick
    reconnect causes no leave and no join. So after A's restart the page lists who came online
    meanwhile, and the others still see the page's person, who never left."""
    ann_id = open_page(page, workers)
    problems: list[str] = []
    with ExitStack() as stack:
        bob = client(stack, workers.b, "Bob")
        # Settled before the restart: each sees the other.
        expect(person(page, bob.id)).to_be_visible()
        assert bob.wait_lobby(lambda lobby: ann_id in lobby), "Bob never saw Ann join"

        workers.terminate_a()
        workers.wait_a()
        expect(status(page)).to_have_attribute("data-state", "reconnecting")
        carl = client(stack, workers.b, "Carl")  # comes online while the page is away
        # ... and is known cluster-wide before A is back (Bob saw him join).
        assert bob.wait_lobby(lambda lobby: carl.id in lobby), "Bob never saw Carl join"

        restart_a_and_resume(workers, page, ann_id)

        try:
            expect(person(page, carl.id)).to_be_visible(timeout=PRESENCE_WAIT_S * 1000)
        except AssertionError:
            problems.append("the page never listed Carl, who came online during the restart")
        if not person(page, bob.id).is_visible():
            problems.append("the page no longer lists Bob")
        if not bob.wait_lobby(lambda lobby: ann_id in lobby):
            problems.append("after the resume Bob does not see Ann online")
        if ann_id in bob.left:
            problems.append("Bob saw Ann leave during the restart")
        if ann_id not in carl.lobby and not carl.wait_lobby(lambda lobby: ann_id in lobby):
            problems.append("Carl never saw Ann online")
    assert problems == [], "; ".join(problems)
