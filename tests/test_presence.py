"""Presence (issue 15): tracking, grouping by person, coalesced diffs, bounds, and leaving when a
session ends. In process (wsession.testing's AsyncSessionClient) with the manual clock, so an
interval passes only when the test says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    ConfigurationError,
    InvalidMessage,
    LimitExceeded,
    Session,
    SessionManager,
    WSessionMiddleware,
    get_session,
)
from wsession.testing import AsyncConnection, AsyncSessionClient, ManualClock

INTERVAL = 0.5


def presence_app(manager: SessionManager) -> Starlette:
    """``/ws?user=U&tab=T``: tracked in ``lobby`` with ``{"tab": T}`` and subscribed to it;
    answers ``ready``; then ``ping`` -> ``pong`` (a marker: whatever came before it was sent
    before it), ``untrack`` -> ``untracked``."""

    async def endpoint(ws: WebSocket) -> None:
        session = get_session(ws)
        await ws.accept()
        try:
            await manager.presence.track(session, "lobby", {"tab": ws.query_params.get("tab", "")})
        except LimitExceeded as exc:
            await ws.send_json({"type": "error", "error": str(exc)})
        await manager.presence.subscribe(session, "lobby")
        await ws.send_json({"type": "ready"})
        try:
            async for text in ws.iter_text():
                if text == "untrack":
                    await manager.presence.untrack(session, "lobby")
                    await ws.send_json({"type": "untracked"})
                else:
                    await ws.send_json({"type": "pong"})
        except WebSocketDisconnect:
            pass

    def name_user(session: Session) -> None:
        user = session.query_params.get("user")
        if user:
            session.user_key = user

    manager.on_connect(name_user)
    return Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


@asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[tuple[SessionManager, AsyncSessionClient]]:
    manager = SessionManager(presence_interval=INTERVAL, **settings)
    async with AsyncSessionClient(presence_app(manager), manager=manager) as client:
        yield manager, client


async def opened(conn: AsyncConnection) -> AsyncConnection:
    assert (await conn.receive_json())["type"] == "ready"
    return conn


async def next_diffs(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Every message up to the ``pong`` answering a ``ping`` sent now (diffs only)."""
    await conn.send_text("ping")
    seen: list[dict[str, Any]] = []
    for _ in range(50):
        message = await conn.receive_json(timeout=5)
        if message.get("type") == "pong":
            return seen
        seen.append(message)
    raise AssertionError(f"no pong after {seen}")


async def flush(manager: SessionManager, clock: ManualClock) -> None:
    clock.advance(INTERVAL)
    await manager.presence.wait_idle()


@pytest.mark.anyio
async def test_one_interval_one_diff_grouped_by_person() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=alice&tab=1") as a1:
            await opened(a1)
            async with client.connect("/ws?user=alice&tab=2") as a2:
                await opened(a2)
                async with client.connect("/ws?user=bob&tab=1") as b:
                    await opened(b)
                    assert await next_diffs(a1) == []  # the interval has not passed
                    await flush(manager, clock)
                    [diff] = await next_diffs(a1)
                    assert diff == {
                        "type": "presence_diff",
                        "topic": "lobby",
                        "joins": {
                            "alice": {a1.session.id: {"tab": "1"}, a2.session.id: {"tab": "2"}},
                            "bob": {b.session.id: {"tab": "1"}},
                        },
                        "leaves": {},
                        "arrived": ["alice", "bob"],
                        "departed": [],
                    }
                    assert await next_diffs(b) == [diff]  # the same diff, once
                    people = await manager.presence.people("lobby")
                    assert people == {
                        "alice": {a1.session.id: {"tab": "1"}, a2.session.id: {"tab": "2"}},
                        "bob": {b.session.id: {"tab": "1"}},
                    }
                    assert await manager.presence.count("lobby") == 2
                    assert await manager.presence.count("lobby", sessions=True) == 3


@pytest.mark.anyio
async def test_a_second_tab_is_not_an_arrival_and_the_last_tab_is_the_departure() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            async with client.connect("/ws?user=alice&tab=1") as a1:
                await opened(a1)
                await flush(manager, clock)
                [first] = await next_diffs(bob)
                assert first["arrived"] == ["alice", "bob"]
                async with client.connect("/ws?user=alice&tab=2") as a2:
                    await opened(a2)
                    await flush(manager, clock)
                    [second] = await next_diffs(bob)
                    assert second["joins"] == {"alice": {a2.session.id: {"tab": "2"}}}
                    assert second["arrived"] == [] and second["departed"] == []
                await flush(manager, clock)  # a2 ended: alice still has a tab
                [third] = await next_diffs(bob)
                assert third["leaves"] == {"alice": {a2.session.id: {"tab": "2"}}}
                assert third["departed"] == []
            await flush(manager, clock)
            [fourth] = await next_diffs(bob)
            assert fourth["leaves"] == {"alice": {a1.session.id: {"tab": "1"}}}
            assert fourth["departed"] == ["alice"]
            assert await manager.presence.people("lobby") == {"bob": {bob.session.id: {"tab": ""}}}


@pytest.mark.anyio
async def test_a_join_and_a_leave_inside_one_interval_send_nothing() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            await flush(manager, clock)
            assert len(await next_diffs(bob)) == 1  # bob's own arrival
            sends_before = sum(manager.stats.sends.values())
            async with client.connect("/ws?user=carol") as carol:
                await opened(carol)
            await flush(manager, clock)
            assert await next_diffs(bob) == []
            # carol's own ready and pong were the only frames: no diff to anyone
            assert sum(manager.stats.sends.values()) == sends_before
            assert await manager.presence.people("lobby") == {"bob": {bob.session.id: {"tab": ""}}}


@pytest.mark.anyio
async def test_a_quick_reconnect_does_not_flap_the_person() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            async with client.connect("/ws?user=alice&tab=1") as old:
                await opened(old)
                await flush(manager, clock)
                await next_diffs(bob)
            # the tab reconnects inside the interval (a new connection id)
            async with client.connect("/ws?user=alice&tab=1") as new:
                await opened(new)
                await flush(manager, clock)
                [diff] = await next_diffs(bob)
                assert diff["leaves"] == {"alice": {old.session.id: {"tab": "1"}}}
                assert diff["joins"] == {"alice": {new.session.id: {"tab": "1"}}}
                assert diff["arrived"] == [] and diff["departed"] == []


@pytest.mark.anyio
async def test_untrack_then_retrack_with_other_meta_is_one_change() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            await flush(manager, clock)
            await next_diffs(bob)
            session = bob.session
            assert await manager.presence.track(session, "lobby", {"tab": "x"})
            assert await manager.presence.track(session, "lobby", {"tab": "y"})
            await flush(manager, clock)
            [diff] = await next_diffs(bob)
            assert diff["leaves"] == {"bob": {session.id: {"tab": ""}}}
            assert diff["joins"] == {"bob": {session.id: {"tab": "y"}}}
            assert diff["arrived"] == diff["departed"] == []
            await bob.send_text("untrack")
            assert (await bob.receive_json())["type"] == "untracked"
            assert manager.presence.topics(session) == frozenset()
            assert not await manager.presence.untrack(session, "lobby")


@pytest.mark.anyio
async def test_an_ended_session_leaves_every_topic_once() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            manager.presence.render = lambda d: {"topic": d.topic, "leaves": d.leaves}
            async with client.connect("/ws?user=alice") as alice:
                await opened(alice)
                session = alice.session
                assert await manager.presence.track(session, "room", {"r": 1})
                assert (
                    await manager.presence.subscribe(bob.session, "room") == {}
                )  # alice: next diff
                await flush(manager, clock)
                await next_diffs(bob)
                await alice.drop()
            assert manager.presence.topics(session) == frozenset()
            manager.presence.session_ended(session)  # a second call finds nothing
            assert not await manager.presence.track(session, "lobby")  # ended: refused
            await flush(manager, clock)
            diffs = await next_diffs(bob)
            assert sorted(diffs, key=lambda d: d["topic"]) == [
                {"topic": "lobby", "leaves": {"alice": {session.id: {"tab": ""}}}},
                {"topic": "room", "leaves": {"alice": {session.id: {"r": 1}}}},
            ]
            assert await manager.presence.people("room") == {}


@pytest.mark.anyio
async def test_bounds_raise_clear_errors() -> None:
    async with (
        running(
            max_presence_meta_bytes=40,
            max_presence_topics_per_session=2,
            max_presence_members_per_topic=2,
        ) as (manager, client),
        client.connect("/ws?user=a") as a,
        client.connect("/ws?user=b") as b,
    ):
        await opened(a)
        await opened(b)
        presence = manager.presence
        with pytest.raises(LimitExceeded, match="max_presence_meta_bytes"):
            await presence.track(a.session, "t", {"x": "y" * 40})
        with pytest.raises(InvalidMessage):
            await presence.track(a.session, "t", {"x": float("nan")})
        with pytest.raises(InvalidMessage):
            await presence.track(a.session, "t", ["not", "an", "object"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="non-empty string"):
            await presence.track(a.session, "", {})
        assert await presence.track(a.session, "t2", {})
        with pytest.raises(LimitExceeded, match="max_presence_topics_per_session"):
            await presence.track(a.session, "t3", {})
        assert await presence.track(a.session, "t2", {"again": True})  # not a new topic
        async with client.connect("/ws?user=c") as c:  # lobby holds a and b: full
            error = await c.receive_json()
            assert "max_presence_members_per_topic (2) reached" in error["error"]
            await opened(c)
            assert await presence.count("lobby", sessions=True) == 2
        assert await presence.subscribe(a.session, "s1") == {}  # with lobby: two
        with pytest.raises(LimitExceeded, match="max_presence_topics_per_session"):
            await presence.subscribe(a.session, "s2")


def test_settings_are_validated() -> None:
    bads: list[dict[str, Any]] = [
        {"presence_interval": 0},
        {"presence_interval": 61},
        {"max_presence_meta_bytes": 1},
        {"max_presence_members_per_topic": 0},
    ]
    for bad in bads:
        with pytest.raises(ConfigurationError):
            SessionManager(**bad)
    assert SessionManager().settings.max_presence_members_per_topic >= 10_000


@pytest.mark.anyio
async def test_presence_costs_nothing_until_used() -> None:
    manager = SessionManager()

    async def plain(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"ok": True})
        await ws.receive()

    app = Starlette(
        routes=[WebSocketRoute("/ws", plain)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    async with AsyncSessionClient(app, manager=manager) as client, client.connect("/ws") as conn:
        assert await conn.receive_json() == {"ok": True}
    assert manager._presence is None  # never made: no per-connection work or memory


@pytest.mark.anyio
async def test_subscribe_returns_the_base_the_diffs_apply_to() -> None:
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=bob") as bob:
            await opened(bob)
            await flush(manager, clock)
            await next_diffs(bob)
            presence = manager.presence
            async with client.connect("/ws?user=alice") as alice:
                await opened(alice)
                # alice's join is not sent yet: a new subscriber's base does not hold it ...
                base = await presence.subscribe(bob.session, "lobby")
                assert base == {"bob": {bob.session.id: {"tab": ""}}}
                assert await presence.subscribe(bob.session, "lobby") is base  # one per interval
                assert set(await presence.people("lobby")) == {"alice", "bob"}  # now
            # ... so when she leaves inside the interval, nothing at all is owed to anyone
            await flush(manager, clock)
            assert await next_diffs(bob) == []
            async with client.connect("/ws?user=carol") as carol:
                await opened(carol)
                await flush(manager, clock)
                assert len(await next_diffs(bob)) == 1
                base = await presence.subscribe(bob.session, "lobby")
                assert base == {  # after the diff, the base holds what it sent
                    "bob": {bob.session.id: {"tab": ""}},
                    "carol": {carol.session.id: {"tab": ""}},
                }


@pytest.mark.anyio
async def test_diffs_stay_in_order_when_the_next_flush_comes_before_the_last_is_sent() -> None:
    # Under load the next interval can fall due while the last interval's diffs are still being
    # handed out (a big topic first, then the others): the next diff of a later topic must not
    # overtake the one still waiting, or a subscriber applies a leave before its join.
    with ManualClock() as clock:
        async with running() as (manager, client), client.connect("/ws?user=alice") as alice:
            await opened(alice)
            await flush(manager, clock)
            await next_diffs(alice)
            presence = manager.presence
            async with client.connect("/ws?user=bob") as bob:  # a lobby change first ...
                await opened(bob)
                await presence.subscribe(alice.session, "room")
                assert await presence.track(bob.session, "room")  # ... then the room's
                clock.advance(INTERVAL)  # this interval's diffs: lobby, then room
                assert await presence.untrack(bob.session, "room")  # no await inside
                clock.advance(INTERVAL)  # the next one's, before the first were sent
                await presence.wait_idle()
                diffs = await next_diffs(alice)
    room = [(sorted(d["joins"]), sorted(d["leaves"])) for d in diffs if d["topic"] == "room"]
    assert room == [(["bob"], []), ([], ["bob"])]
    assert [d["topic"] for d in diffs] == ["lobby", "room", "room"]
