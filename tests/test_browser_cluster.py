"""The demo page against a cluster: two workers on one Redis, a person on each, in Chromium.

People on different workers see each other come and go, and message each other directly and in
a room. Needs the system Chromium and redis-server (both skip locally when missing; CI requires
them, see tests/test_browser.py and tests/redis_support.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from example_app.app import Member, create_app
from tests.browser_support import ThreadedServer
from tests.redis_support import RedisServer
from tests.test_browser import Pages, browser, join, messages, my_id, person, write
from wsession import SessionManager
from wsession.backends.redis import RedisRegistry

pytestmark = [pytest.mark.browser, pytest.mark.redis]
__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with tests/test_browser.py


@pytest.fixture
def workers(redis_server: RedisServer) -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    prefix = f"browser-cluster-{secrets.token_hex(4)}"

    def worker_app() -> object:
        registry = RedisRegistry(redis_server.url, prefix=prefix, heartbeat=0.5)
        return create_app(SessionManager(data_model=Member, registry=registry))

    first, second = ThreadedServer(worker_app), ThreadedServer(worker_app)
    first.start()
    second.start()
    try:
        yield first, second
    finally:
        first.stop(keep_port=False)
        second.stop(keep_port=False)


def test_people_on_two_workers_see_and_message_each_other(
    browser: Browser,
    workers: tuple[ThreadedServer, ThreadedServer],
) -> None:
    first, second = workers
    pages = Pages(browser, first, "cluster")
    try:
        alice = pages.open("Alice")  # on the first worker
        pages.server = second
        bob = pages.open("Bob")  # on the second worker
        alice_id, bob_id = my_id(alice), my_id(bob)
        expect(person(bob, alice_id)).to_contain_text("Alice")  # from the cluster-wide welcome
        expect(person(alice, bob_id)).to_contain_text("Bob")  # a presence event across workers

        person(alice, bob_id).click()
        write(alice, "hello from worker one")
        expect(messages(bob, "dm", "hello from worker one")).to_contain_text("Alice")

        join(alice, "cross")
        join(bob, "cross")
        write(bob, "room message across workers")
        for page in (alice, bob):
            expect(messages(page, "group", "room message across workers")).to_be_visible()
        pages.shoot(bob, "Bob-on-second-worker")

        pages.close(bob)
        expect(person(alice, bob_id)).to_have_count(0, timeout=2000)
    finally:
        pages.close_all()
    assert pages.page_errors == []
