"""Admission under concurrency: limits that cannot be raced, slots that always come back, and
drains that start while a handshake is still in its connect hooks (issue 11 items 1 and 16)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from wsession import EndReason, Refuse, Session, SessionManager, get_session

from .support import HookRecorder, mount, recorded, run_server

pytestmark = pytest.mark.anyio


def echo_app(manager: SessionManager) -> Starlette:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass

    return mount(endpoint, manager)


async def attempt(url: str) -> ClientConnection | int:
    """Open a connection: the open client, or the HTTP status it was refused with."""
    try:
        ws = await connect(url, open_timeout=10)
    except InvalidStatus as refused:
        return refused.response.status_code
    await ws.recv()  # the app ran: the session is admitted and registered
    return ws


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (state of other tasks, no event to await)
            await asyncio.sleep(0.005)


class Gate:
    """An async connect hook that holds every handshake until the test opens it."""

    def __init__(self) -> None:
        self.arrived = 0
        self.opened = asyncio.Event()

    async def __call__(self, session: Session) -> None:
        self.arrived += 1
        await self.opened.wait()


async def storm(
    manager: SessionManager, gate: Gate, url: str, count: int
) -> tuple[list[ClientConnection], Counter[int]]:
    """``count`` concurrent handshakes held in the gate until each has either reached the hook
    or been refused; then the gate opens. Returns the admitted clients and refusal statuses."""
    tasks = asyncio.gather(*(attempt(url) for _ in range(count)))
    await poll(lambda: gate.arrived + manager.stats.refused >= count)
    gate.opened.set()
    results = await tasks
    admitted = [r for r in results if not isinstance(r, int)]
    refused = Counter(r for r in results if isinstance(r, int))
    return admitted, refused


@pytest.mark.parametrize(
    ("settings", "status", "label"),
    [
        ({"max_sessions_per_ip": 1}, 429, "limit_ip"),
        ({"max_sessions": 1}, 503, "limit_total"),
        ({"max_sessions": 2, "max_sessions_per_ip": 3}, 503, "limit_total"),
        ({"max_sessions_per_ip": 2, "max_sessions": 5}, 429, "limit_ip"),
    ],
)
async def test_concurrent_handshakes_cannot_race_the_limits(
    settings: dict[str, Any], status: int, label: str
) -> None:
    limit = min(settings.values())
    gate = Gate()
    manager = SessionManager(on_connect=[gate], **settings)
    async with run_server(echo_app(manager)) as server:
        admitted, refused = await storm(manager, gate, f"{server.ws}/ws", 5)
        try:
            assert len(admitted) == limit
            assert refused == {status: 5 - limit}
            assert manager.stats.refused_by == {label: 5 - limit}
            assert gate.arrived == limit  # the refused never ran a connect hook
        finally:
            for ws in admitted:
                await ws.close()


async def test_concurrent_handshakes_cannot_race_the_per_user_limit() -> None:
    gate = Gate()
    manager = SessionManager(max_sessions_per_user=1)

    @manager.on_connect
    def identify(session: Session) -> None:
        session.user_key = session.query_params["user"]

    manager.on_connect(gate)
    recorder = HookRecorder()
    recorder.install(manager)
    async with run_server(echo_app(manager)) as server:
        admitted, refused = await storm(manager, gate, f"{server.ws}/ws?user=alice", 5)
        try:
            assert len(admitted) == 1
            assert refused == {429: 4}
            assert manager.stats.refused_by == {"limit_user": 4}
            other = await attempt(f"{server.ws}/ws?user=bob")  # another user still admitted
            assert not isinstance(other, int)
            await other.close()
        finally:
            for ws in admitted:
                await ws.close()
        await recorder.wait_ended(6)
    # The four refused completed their connect hooks: their disconnect hooks ran, once each.
    assert recorder.reasons().count(EndReason.REFUSED) == 4
    assert Counter(recorder.ended_ids()) == Counter(recorder.connected)


# -- slots come back however a handshake fails ------------------------------------------------


def failing_manager(**settings: Any) -> tuple[SessionManager, dict[str, asyncio.Task[Any]]]:
    """A manager whose connect hook fails as ``?mode=`` says (refuse, raise, hang, cancel) and
    sets ``user_key`` from ``?user=`` first."""
    tasks: dict[str, asyncio.Task[Any]] = {}
    manager = SessionManager(**settings)

    @manager.on_connect
    async def hook(session: Session) -> None:
        session.user_key = session.query_params.get("user")
        mode = session.query_params.get("mode", "ok")
        if mode == "refuse":
            raise Refuse(403, label="nope")
        if mode == "raise":
            raise RuntimeError("database down")
        if mode in ("hang", "cancel"):
            task = asyncio.current_task()
            assert task is not None
            tasks[mode] = task
            await asyncio.Event().wait()

    return manager, tasks


LIMITS = {"max_sessions": 1, "max_sessions_per_ip": 1, "max_sessions_per_user": 1}


@pytest.mark.parametrize("mode", ["refuse", "raise", "hang", "cancel"])
async def test_a_failed_handshake_gives_its_slots_back(mode: str) -> None:
    manager, tasks = failing_manager(connect_timeout=0.2, **LIMITS)
    async with run_server(echo_app(manager)) as server:
        url = f"{server.ws}/ws?user=alice"
        failed = asyncio.create_task(attempt(f"{url}&mode={mode}"))
        if mode == "cancel":
            await poll(lambda: "cancel" in tasks)
            tasks["cancel"].cancel()  # the connection's task, while it is in its connect hook
        outcome = await failed
        assert isinstance(outcome, int)  # refused (HTTP 403 / 500), never admitted
        await poll(lambda: manager.admission.reserved == 0)
        ws = await attempt(url)  # every limit is 1: this needs all three slots back
        assert not isinstance(ws, int), f"refused with {ws} after a {mode!r} handshake"
        assert manager.admission.reserved == 1
        await ws.close()
        await poll(lambda: manager.admission.reserved == 0)
    assert not manager.local


async def test_a_refusal_after_the_hooks_gives_its_slots_back() -> None:
    manager, _ = failing_manager(max_sessions=2, max_sessions_per_ip=2, max_sessions_per_user=1)
    async with run_server(echo_app(manager)) as server:
        alice = await attempt(f"{server.ws}/ws?user=alice")
        assert not isinstance(alice, int)
        # Takes a total and an IP slot, runs the hooks, then meets the per-user limit.
        assert await attempt(f"{server.ws}/ws?user=alice") == 429
        assert manager.admission.reserved == 1
        bob = await attempt(f"{server.ws}/ws?user=bob")  # needs the second total/IP slot
        assert not isinstance(bob, int)
        await alice.close()
        await bob.close()
        await poll(lambda: manager.admission.reserved == 0)
    assert manager.stats.refused_by == {"limit_user": 1}


async def test_a_cancelled_session_gives_its_slots_back() -> None:
    manager, _ = recorded(**LIMITS)
    started: list[asyncio.Task[Any]] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        task = asyncio.current_task()
        assert task is not None
        started.append(task)
        await ws.send_text("hello")
        await asyncio.Event().wait()

    async with run_server(mount(endpoint, manager)) as server:
        first = await attempt(f"{server.ws}/ws")
        assert not isinstance(first, int)
        assert await attempt(f"{server.ws}/ws") == 503
        started[0].cancel()
        await poll(lambda: manager.admission.reserved == 0)
        second = await attempt(f"{server.ws}/ws")
        assert not isinstance(second, int)
        await first.close()
        await second.close()


# -- drain while a handshake is in its connect hooks (issue 11 item 16) -----------------------


async def test_a_handshake_in_its_hooks_when_drain_starts_is_refused() -> None:
    gate = Gate()
    manager, recorder = recorded()
    manager.on_connect(gate)
    async with run_server(echo_app(manager)) as server:
        pending = asyncio.create_task(attempt(f"{server.ws}/ws"))
        await poll(lambda: gate.arrived == 1)
        await manager.drain()  # nothing registered yet: returns at once
        gate.opened.set()
        outcome = await pending
        if not isinstance(outcome, int):
            await outcome.close()
        assert outcome == 503
        await recorder.wait_ended(1)
    assert manager.stats.refused_by == {"draining": 1}
    assert manager.stats.accepted == 0
    # Its connect hooks completed, so its disconnect hooks ran, once.
    assert recorder.reasons() == [EndReason.REFUSED]
