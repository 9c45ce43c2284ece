"""Presence over real uvicorn with real clients, through the example app's contract: tabs
grouped by person, the welcome's base plus the diffs always equal to the live sessions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from example_app import create_app

from .support import next_of, run_server

pytestmark = pytest.mark.anyio


class View:
    """What a client knows of the lobby: the welcome's base, then each diff applied."""

    def __init__(self, welcome: dict[str, Any]) -> None:
        self.ids: dict[str, str] = {}  # id -> name
        self.diffs = 0
        self.apply({"joins": welcome["presence"], "leaves": []})

    def apply(self, diff: dict[str, Any]) -> None:
        for person in diff["leaves"]:
            for i in person["ids"]:
                assert self.ids.pop(i, None) == person["name"], f"a leave of unknown {i}"
        for person in diff["joins"]:
            for i in person["ids"]:
                assert i not in self.ids, f"a join repeated for {i}"
                self.ids[i] = person["name"]

    def people(self) -> dict[str, set[str]]:
        grouped: dict[str, set[str]] = {}
        for i, name in self.ids.items():
            grouped.setdefault(name, set()).add(i)
        return grouped


async def open_tab(url: str, name: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{url}/ws?name={name}", max_queue=None)
    return ws, await next_of(ws, "welcome")


async def follow(ws: ClientConnection, view: View, done: Any, timeout: float = 10) -> None:
    """Apply lobby diffs to ``view`` until ``done(view)``."""
    async with asyncio.timeout(timeout):
        while not done(view):
            message = json.loads(await ws.recv())
            if message["type"] == "presence_diff" and message["topic"] == "lobby":
                view.apply(message)
                view.diffs += 1


async def test_tabs_are_grouped_by_person_and_a_second_tab_is_one_diff() -> None:
    app = create_app(environ={"WSESSION_PRESENCE_INTERVAL": "0.1"})
    assert app.state.sessions.settings.presence_interval == 0.1
    async with run_server(app) as server:
        bob, welcome = await open_tab(server.ws, "bob")
        view = View(welcome)
        await follow(bob, view, lambda v: welcome["id"] in v.ids)
        tabs = [await open_tab(server.ws, "alice") for _ in range(2)]
        alice_ids = {w["id"] for _, w in tabs}
        await follow(bob, view, lambda v: v.people().get("alice") == alice_ids)
        assert view.people() == {"bob": {welcome["id"]}, "alice": alice_ids}
        third, w3 = await open_tab(server.ws, "alice")
        before = view.diffs
        await follow(bob, view, lambda v: w3["id"] in v.ids)
        assert view.diffs == before + 1  # one diff: the third tab, alice already online
        for ws, _ in tabs:
            await ws.close()
        await follow(bob, view, lambda v: v.people().get("alice") == {w3["id"]})
        await third.close()
        await follow(bob, view, lambda v: "alice" not in v.people())
        assert view.people() == {"bob": {welcome["id"]}}
        await bob.close()


async def test_presence_equals_the_live_sessions_after_a_storm_with_mixed_endings() -> None:
    """1,000 clients arrive at once (every one tracked in and subscribed to the lobby); a
    quarter close cleanly, a quarter drop without a close frame, a tenth are kicked by the
    server; once the storm settles, presence is exactly the live sessions, and a subscriber
    that applied every diff to its welcome's base sees the same. (Resumption off: with it, a
    dropped session stays present while it waits for its client; see test_resume.py.)"""
    app = create_app(environ={"WSESSION_PRESENCE_INTERVAL": "0.2", "WSESSION_RESUME_WINDOW": "0"})
    manager = app.state.sessions
    clients = 1000
    async with run_server(app, ws_max_queue=4096) as server:
        watcher, welcome = await open_tab(server.ws, "watcher")
        view = View(welcome)

        async def arrive(i: int) -> tuple[ClientConnection, str]:
            ws, w = await open_tab(server.ws, f"user{i % 400}")  # 400 people, 2-3 tabs each
            return ws, str(w["id"])

        tabs = await asyncio.wait_for(asyncio.gather(*(arrive(i) for i in range(clients))), 25)
        closing, dropping = tabs[:250], tabs[250:500]
        kicked = tabs[500:600]
        await asyncio.gather(*(ws.close() for ws, _ in closing))
        for ws, _ in dropping:
            ws.transport.abort()
        for _, session_id in kicked:
            await manager.close(session_id, 4000, "kicked")
        alive = {session_id for _, session_id in tabs[600:]} | {welcome["id"]}

        deadline = asyncio.get_running_loop().time() + 15
        await manager._wait_local(lambda: set(manager.local) == alive, deadline)
        assert set(manager.local) == alive
        await follow(watcher, view, lambda v: set(v.ids) == alive, timeout=15)
        people = await manager.presence.people("lobby")
        assert {i for sessions in people.values() for i in sessions} == alive
        assert await manager.presence.count("lobby", sessions=True) == len(alive)
        expected_people = {f"user{i % 400}" for i in range(600, clients)} | {"watcher"}
        assert set(people) == set(view.people()) == expected_people
        for ws, _ in tabs[600:]:
            await ws.close()
        await watcher.close()


async def test_the_welcome_lists_the_others_online_as_of_the_last_diff() -> None:
    """``online`` is ``presence`` flattened (one entry per connection), without the new
    connection itself; welcomes of one interval share one encoding of the base."""
    app = create_app(environ={"WSESSION_PRESENCE_INTERVAL": "0.1"})
    async with run_server(app) as server:
        first, hello = await open_tab(server.ws, "ann")
        assert hello["online"] == [] and hello["presence"] == []
        view = View(hello)
        second, hello2 = await open_tab(server.ws, "bob")
        await follow(first, view, lambda v: hello2["id"] in v.ids)  # an interval passed
        third, hello3 = await open_tab(server.ws, "bob")
        expected = sorted([hello["id"], hello2["id"]])
        assert sorted(o["id"] for o in hello3["online"]) == expected
        assert {o["id"]: o["name"] for o in hello3["online"]} == {
            hello["id"]: "ann",
            hello2["id"]: "bob",
        }
        flattened = sorted(i for p in hello3["presence"] for i in p["ids"])
        assert flattened == expected and hello3["id"] not in flattened
        for ws in (first, second, third):
            await ws.close()
