"""The demo page in a real headless Chromium: presence, direct messages, rooms, kick, reconnect.

Needs a system Chromium (Debian: ``apt-get install chromium-headless-shell``) driven by
Playwright (never ``playwright install``: no browser download). Without one these tests skip,
unless ``WSESSION_REQUIRE_BROWSER=1`` (CI sets it) turns the skip into a failure.

Screenshots of every page go to ``test-artifacts/``; ``WSESSION_UPDATE_SCREENSHOT=1`` also
refreshes ``docs/screenshot.png`` from the chat scenario.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from example_app.app import create_app
from tests.browser_support import CHROMIUM_ARGS, ThreadedServer, find_chromium

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"
VIEWPORT: ViewportSize = {"width": 1280, "height": 760}
# The brief: a closed page disappears from the others' lists within a second.
PRESENCE_DEADLINE_MS = 1000


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = find_chromium()
    if chromium is None:
        message = (
            "no system Chromium found (install the chromium-headless-shell or chromium package,"
            " or set WSESSION_CHROMIUM to a binary)"
        )
        if os.environ.get("WSESSION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WSESSION_REQUIRE_BROWSER=1 but {message}", pytrace=False)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def server() -> Iterator[ThreadedServer]:
    running = ThreadedServer(create_app)
    running.start()
    try:
        yield running
    finally:
        running.stop(keep_port=False)


class Pages:
    """Opens demo pages (one browser context each, like separate people) and cleans up."""

    def __init__(self, browser: Browser, server: ThreadedServer, test_name: str) -> None:
        self.browser, self.server, self.test_name = browser, server, test_name
        self._open: list[tuple[str, BrowserContext, Page]] = []
        self.page_errors: list[str] = []

    def open(
        self, name: str | None, *, clock: datetime.datetime | None = None, via: str | None = None
    ) -> Page:
        """A new page for ``name`` (``None``: no ``?name=``, so the page asks for one), loaded
        from ``via`` (a proxy's base URL) instead of the server when given."""
        context = self.browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        label = name or "anonymous"
        page.on("pageerror", lambda error: self.page_errors.append(f"{label}: {error}"))
        self._open.append((label, context, page))
        if clock is not None:
            page.clock.install(time=clock)
        query = "" if name is None else f"?name={quote(name)}"
        page.goto(f"{via or self.server.url}/{query}")
        if name is not None:
            expect(status(page)).to_have_attribute("data-state", "connected")
        return page

    def shoot(self, page: Page, label: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{self.test_name}-{label}.png"
        page.screenshot(path=str(path))
        return path

    def close(self, page: Page) -> None:
        """Screenshot, then close the page the way a user closes a tab."""
        for entry in self._open:
            if entry[2] is page:
                self.shoot(page, entry[0])
                self._open.remove(entry)
                entry[1].close()
                return
        raise ValueError("not a page of ours")

    def close_all(self) -> None:
        while self._open:
            self.close(self._open[-1][2])


@pytest.fixture
def pages(
    browser: Browser, server: ThreadedServer, request: pytest.FixtureRequest
) -> Iterator[Pages]:
    opened = Pages(browser, server, re.sub(r"\W+", "_", request.node.name))
    try:
        yield opened
    finally:
        opened.close_all()
    assert opened.page_errors == [], "the page raised uncaught errors"


# -- page helpers ------------------------------------------------------------------------------


def status(page: Page) -> Locator:
    return page.get_by_test_id("status")


def my_id(page: Page) -> str:
    me = page.get_by_test_id("me-id")
    expect(me).not_to_be_empty()
    return me.inner_text()


def person(page: Page, session_id: str) -> Locator:
    return page.locator(f'#online-list [data-testid="person"][data-id="{session_id}"]')


def messages(page: Page, kind: str, text: str) -> Locator:
    return page.locator(f'#log [data-testid="message"][data-kind="{kind}"]').filter(has_text=text)


def write(page: Page, text: str) -> None:
    page.get_by_test_id("message-input").fill(text)
    page.get_by_test_id("send-button").click()


def join(page: Page, room: str) -> None:
    page.get_by_test_id("room-input").fill(room)
    page.get_by_test_id("join-button").click()
    expect(page.locator(f'#room-list [data-testid="room"][data-room="{room}"]')).to_be_visible()
    # Joining selects the room as the target of the next message.
    expect(page.get_by_test_id("target-select")).to_have_value(f"room:{room}")


def stats(server: ThreadedServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/stats", timeout=5)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


# -- tests -------------------------------------------------------------------------------------


def test_chat_presence_direct_messages_rooms_and_a_closed_tab(
    pages: Pages, server: ThreadedServer
) -> None:
    alice = pages.open("Alice")
    alice_id = my_id(alice)
    expect(alice.get_by_test_id("online-empty")).to_be_visible()

    bob = pages.open("Bob")
    bob_id = my_id(bob)
    assert bob_id != alice_id
    # Bob learns about Alice from the welcome, Alice about Bob from a pushed presence event.
    expect(person(bob, alice_id)).to_contain_text("Alice")
    expect(person(alice, bob_id)).to_contain_text("Bob")
    expect(alice.get_by_test_id("online-count")).to_have_text("2")

    # A direct message: click Bob, write; only Bob receives it.
    person(alice, bob_id).click()
    expect(alice.get_by_test_id("target-select")).to_have_value(f"dm:{bob_id}")
    write(alice, "hi Bob, got a minute?")
    expect(messages(bob, "dm", "hi Bob, got a minute?")).to_contain_text("Alice")
    expect(messages(alice, "dm-out", "hi Bob, got a minute?")).to_contain_text("Bob")
    person(bob, alice_id).click()
    write(bob, "sure, see you in #standup")
    expect(messages(alice, "dm", "sure, see you in #standup")).to_contain_text("Bob")

    # A room: both join, one message reaches both members.
    join(alice, "standup")
    join(bob, "standup")
    write(bob, "yesterday: shipped presence")
    for page in (alice, bob):
        expect(messages(page, "group", "yesterday: shipped presence")).to_contain_text("#standup")
    write(alice, "today: the browser test")
    for page in (alice, bob):
        expect(messages(page, "group", "today: the browser test")).to_be_visible()

    # A broadcast reaches everyone, the sender included.
    alice.get_by_test_id("target-select").select_option("everyone")
    write(alice, "demo at 3pm")
    for page in (alice, bob):
        expect(messages(page, "broadcast", "demo at 3pm")).to_be_visible()

    # The admin panel shows the server's counters (refreshed on presence and on the button).
    alice.get_by_test_id("stats-refresh").click()
    before = stats(server)
    assert before["live"] == 2
    expect(alice.get_by_test_id("stat-live")).to_have_text("2")
    expect(alice.get_by_test_id("stat-disconnected_total")).to_have_text(
        str(before["disconnected_total"])
    )
    pages.shoot(alice, "Alice-chatting")
    if os.environ.get("WSESSION_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / f"{pages.test_name}-Alice-chatting.png", DOCS_SCREENSHOT)

    # Bob closes his tab: gone from Alice's list within a second, counted exactly once.
    pages.close(bob)
    expect(person(alice, bob_id)).to_have_count(0, timeout=PRESENCE_DEADLINE_MS)
    after = stats(server)  # the counter moves before the hook that told Alice
    assert after["disconnected_total"] == before["disconnected_total"] + 1
    assert after["connected_total"] == before["connected_total"]
    offline = alice.locator(
        f'#log [data-testid="message"][data-kind="presence"][data-id="{bob_id}"]'
        '[data-event="offline"]'
    )
    expect(offline).to_have_count(1)
    expect(alice.get_by_test_id("online-empty")).to_be_visible()
    expect(alice.get_by_test_id("stat-disconnected_total")).to_have_text(
        str(after["disconnected_total"])
    )


def test_kick_from_the_admin_panel_shows_kicked_and_does_not_reconnect(
    pages: Pages, server: ThreadedServer
) -> None:
    admin = pages.open("Admin")
    # Bob's timers are fake (but running) so "never reconnects" can be checked by jumping ahead.
    bob = pages.open("Bob", clock=datetime.datetime.now())
    bob_id = my_id(bob)
    assert bob.evaluate("window.wsessionDemo.connectAttempts") == 1

    kick = admin.locator(f'#session-list [data-testid="kick-button"][data-id="{bob_id}"]')
    expect(kick).to_be_visible()
    kick.click()

    expect(status(bob)).to_have_attribute("data-state", "kicked")
    expect(status(bob)).to_contain_text("kicked")
    expect(bob.get_by_test_id("me-id")).to_be_empty()
    expect(person(admin, bob_id)).to_have_count(0)
    expect(kick).to_have_count(0)  # the admin list refreshed on the presence event

    # Two minutes later (any backoff timer would have fired): still kicked, never reconnected.
    bob.clock.fast_forward("02:00")
    expect(status(bob)).to_have_attribute("data-state", "kicked")
    assert bob.evaluate("window.wsessionDemo.connectAttempts") == 1
    assert stats(server)["connected_total"] == 2  # Admin and Bob, nobody since
    pages.shoot(bob, "Bob-kicked")

    # The page offers a way back, by hand.
    bob.get_by_test_id("reconnect-button").click()
    expect(status(bob)).to_have_attribute("data-state", "connected")
    expect(bob.get_by_test_id("me-id")).not_to_have_text(bob_id)


def test_reconnects_with_backoff_after_a_server_restart(
    pages: Pages, server: ThreadedServer
) -> None:
    start = datetime.datetime(2030, 1, 1, 9, 0, 0)
    alice = pages.open("Alice", clock=start)
    alice.clock.pause_at(start + datetime.timedelta(minutes=1))  # timers fire only on demand
    first_id = my_id(alice)
    join(alice, "ops")

    server.stop()  # the port stays ours, refusing connections
    expect(status(alice)).to_have_attribute("data-state", "reconnecting")
    # The first wait is up to 1 s (full jitter: uniform below 1 s, then 2, 4, ...).
    expect(status(alice)).to_contain_text("reconnecting in 1s (attempt 1")
    expect(alice.get_by_test_id("me-id")).to_be_empty()
    pages.shoot(alice, "Alice-reconnecting")

    alice.clock.run_for(1000)  # the first retry (after less than 1 s) has run and failed
    expect(status(alice)).not_to_contain_text("(attempt 1,")
    # Full jitter may fit a second retry in that second too: whichever attempt is next, one
    # WebSocket was opened per attempt so far (the first connection and each retry).
    attempt = int(re.findall(r"attempt (\d+)", status(alice).inner_text())[0])
    assert attempt >= 2
    assert alice.evaluate("window.wsessionDemo.connectAttempts") == attempt

    server.start()
    alice.clock.run_for(4500)  # at most 2 retries fit in 1 s: the next waits under 4 s
    expect(status(alice)).to_have_attribute("data-state", "connected")
    expect(alice.get_by_test_id("me-id")).not_to_be_empty()
    assert my_id(alice) != first_id  # a new connection, a new id
    assert alice.evaluate("window.wsessionDemo.connectAttempts") > attempt

    # The page re-joined its room: a room message comes back to it from the new server.
    expect(alice.get_by_test_id("target-select")).to_have_value("room:ops")
    write(alice, "back after the restart")
    expect(messages(alice, "group", "back after the restart")).to_be_visible()


def test_a_dropped_connection_resumes_and_the_missed_messages_appear_once(
    pages: Pages, server: ThreadedServer
) -> None:
    """The demo page uses the package's client: after a TCP drop (no close frame) it resumes
    the same session, and what was sent to it meanwhile appears once, in order."""
    from .apps.resume_stub import DropProxy

    proxy = DropProxy(server.port)
    try:
        ann = pages.open("Ann", via=proxy.url)
        ann_id = my_id(ann)
        server_api = httpx.Client(base_url=server.url, timeout=10)
        assert server_api.post(f"/api/send/{ann_id}", json={"text": "before"}).status_code == 200
        expect(messages(ann, "dm", "before")).to_have_count(1)
        assert proxy.cut() >= 1  # TCP gone without a close frame
        for i in range(3):
            response = server_api.post(f"/api/send/{ann_id}", json={"text": f"missed {i}"})
            assert response.status_code == 200
        expect(status(ann)).to_have_attribute("data-state", "connected")
        expect(status(ann)).to_contain_text("resumed")
        expect(ann.get_by_test_id("me-id")).to_have_text(ann_id)  # the same session
        recovered = ann.locator('#log [data-testid="message"]').filter(has_text="recovered")
        expect(recovered).to_have_count(1)
        for i in range(3):
            expect(messages(ann, "dm", f"missed {i}")).to_have_count(1)
        expect(messages(ann, "dm", "before")).to_have_count(1)  # nothing replayed twice
        texts = ann.locator('#log [data-testid="message"][data-kind="dm"]').all_inner_texts()
        order = [next(t for t in texts if f"missed {i}" in t) for i in range(3)]
        assert [texts.index(t) for t in order] == sorted(texts.index(t) for t in order)
        listed = server_api.get("/api/stats").json()
        assert listed["resumed_total"] == 1 and listed["connected_total"] == 1
        server_api.close()
        pages.shoot(ann, "Ann-resumed")
    finally:
        proxy.close()


def test_asks_for_a_name_and_shows_it_as_text(pages: Pages, server: ThreadedServer) -> None:
    page = pages.open(None)
    dialog = page.get_by_test_id("name-dialog")
    expect(dialog).to_be_visible()
    expect(status(page)).to_have_attribute("data-state", "idle")

    page.get_by_test_id("name-input").fill("<b>Carol</b> & co")
    page.get_by_test_id("name-submit").click()
    expect(dialog).to_be_hidden()
    expect(status(page)).to_have_attribute("data-state", "connected")
    # Names are text, never markup.
    expect(page.get_by_test_id("me-name")).to_have_text("<b>Carol</b> & co")
    assert page.locator("#me-name b").count() == 0
    assert "name=" in page.url  # a reload keeps the name
    names = [s["name"] for s in httpx.get(f"{server.url}/api/sessions").json()["sessions"]]
    assert names == ["<b>Carol</b> & co"]
