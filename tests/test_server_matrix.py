"""The server matrix: the same lifecycle contract under uvicorn, hypercorn, daphne and granian.

Each server runs tests/apps/matrix_app.py as a subprocess (tests/servers.py) with the invocation
the README recommends; the app writes every hook run to a file, so "exactly once" is checked
across the process boundary. Where a server deviates (a wrong close code, a dropped reason, no
lifespan), a test asserts today's behaviour, so an upstream fix is noticed and the README's
Compatibility section can be updated.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from wsession import SessionManager, get_session
from wsession.backends import MemoryRegistry

from .servers import SERVERS, ServerProcess, serve
from .support import announce_and_read, mount, reset_connection, run_server

pytestmark = pytest.mark.anyio


# -- a manager that no lifespan entered --------------------------------------------------------


class GatedRegistry(MemoryRegistry):
    """A memory registry that counts entries and holds the first one until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = 0
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def __aenter__(self) -> GatedRegistry:
        self.entered += 1
        self.waiting.set()
        await self.release.wait()
        return self


async def test_first_connections_enter_a_manager_no_lifespan_entered_exactly_once() -> None:
    """daphne sends no lifespan scope: the manager is entered by the first connection, once,
    even when two connections arrive while the registry is still being entered."""
    registry = GatedRegistry()
    manager = SessionManager(registry=registry)

    async def one(server: Any) -> str:
        async with connect(f"{server.ws}/ws", open_timeout=10) as ws:
            return str(await ws.recv())

    inner = mount(announce_and_read, manager)
    scopes = 0
    both_in = asyncio.Event()

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        nonlocal scopes
        if scope["type"] == "websocket":
            scopes += 1
            if scopes == 2:
                both_in.set()
        # Runs on synchronously into the middleware up to its first suspension: by the time the
        # test sees both_in, the second connection has entered the registry or is waiting.
        await inner(scope, receive, send)

    async with run_server(counting) as server:
        first = asyncio.ensure_future(one(server))
        second = asyncio.ensure_future(one(server))
        async with asyncio.timeout(5):
            await registry.waiting.wait()
            await both_in.wait()
        assert registry.entered == 1
        assert manager.stats.accepted == 0
        registry.release.set()
        async with asyncio.timeout(10):
            ids = await asyncio.gather(first, second)
        third = await one(server)
    assert registry.entered == 1
    assert len({*ids, third}) == 3
    assert manager.stats.accepted == 3


async def test_a_manager_entered_in_the_lifespan_is_not_entered_again() -> None:
    registry = GatedRegistry()
    registry.release.set()
    manager = SessionManager(registry=registry)

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)

    async with manager, run_server(mount(endpoint, manager)) as server:
        for _ in range(3):
            async with connect(f"{server.ws}/ws") as ws:
                await ws.recv()
    assert registry.entered == 1


# -- the matrix: one server process per server for the lifecycle checks -------------------------

APP = "tests.apps.matrix_app:app"


@dataclass
class Running:
    """A matrix server with the file its app records hook runs to."""

    server: ServerProcess
    events: Path

    @property
    def name(self) -> str:
        return self.server.name

    def hooks(self, tag: str) -> tuple[Counter[str], list[dict[str, Any]]]:
        """(connect hook runs by session id, disconnect records) of the sessions tagged ``tag``."""
        lines = [json.loads(line) for line in self.events.read_text().splitlines()]
        mine = [e for e in lines if e["tag"] == tag]
        connects = Counter(e["id"] for e in mine if e["event"] == "connect")
        return connects, [e for e in mine if e["event"] == "disconnect"]

    async def ended(self, tag: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``count`` sessions tagged ``tag`` ran their disconnect hooks; check that
        each ran them exactly once and that every connected one ended; return the records."""
        deadline = time.monotonic() + timeout
        # Another process appends to the file: nothing to await but the file itself.
        while len(self.hooks(tag)[1]) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        connects, ends = self.hooks(tag)
        assert len(ends) == count, f"{self.name}: {len(ends)} of {count} sessions ended"
        assert all(n == 1 for n in connects.values()), f"{self.name}: a connect hook ran twice"
        assert Counter(e["id"] for e in ends) == connects, f"{self.name}: hooks not exactly once"
        return ends

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.server.http}/stats", timeout=10)
        return response.json()  # type: ignore[no-any-return]

    async def kick(self, session_id: str, code: int, reason: str) -> bool:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{self.server.http}/kick",
                params={"id": session_id, "code": str(code), "reason": reason},
                timeout=10,
            )
        return bool(response.json()["closed"])


@pytest.fixture(scope="module", params=SERVERS)
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    """One process per server for the whole module (each test tags its own sessions)."""
    tmp = tmp_path_factory.mktemp(request.param)
    events = tmp / "events.jsonl"
    events.touch()
    with serve(request.param, APP, tmp, {"WSESSION_EVENTS_FILE": str(events)}) as server:
        yield Running(server, events)


def tagged(running: Running, tag: str, **query: str) -> str:
    params = "&".join(f"{k}={v}" for k, v in {"tag": tag, **query}.items())
    return f"{running.server.ws}/ws?{params}"


async def closed_by_server(ws: Any, timeout: float = 10.0) -> Close | None:
    """Read until the server closes; the close frame it sent (``None``: none arrived)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd


# Where a server passes the client's close code and reason on to the app.
CLIENT_CODE_PASSED = {"uvicorn": True, "hypercorn": False, "daphne": True, "granian": True}
CLIENT_REASON_PASSED = {"uvicorn": True, "hypercorn": False, "daphne": False, "granian": False}
# Where a server passes the app's (or wsession's) close reason on to the client.
SERVER_REASON_PASSED = {"uvicorn": True, "hypercorn": True, "daphne": False, "granian": True}


async def test_client_close_frame(running: Running) -> None:
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag)) as ws:
        await ws.recv()
        await ws.close(4001, "client leaving")
    [end] = await running.ended(tag, 1)
    if CLIENT_CODE_PASSED[running.name]:
        assert (end["end_reason"], end["code"]) == ("client closed", 4001)
    else:  # see test_hypercorn_reports_a_clean_client_close_as_1006
        assert end["end_reason"] == "connection lost"
    expected_reason = "client leaving" if CLIENT_REASON_PASSED[running.name] else None
    assert end["reason"] == expected_reason


async def test_tcp_reset_without_close_frame(running: Running) -> None:
    tag = uuid.uuid4().hex
    ws = await connect(tagged(running, tag))
    await ws.recv()
    reset_connection(ws)
    [end] = await running.ended(tag, 1)
    assert end["end_reason"] == "connection lost"
    assert end["code"] in (1005, 1006)


@pytest.mark.parametrize(
    ("mode", "reason", "code"),
    [
        ("close", "app closed", 4002),
        ("return", "app returned", None),
        ("raise-after", "app raised", 1011),
    ],
)
async def test_app_side_endings(running: Running, mode: str, reason: str, code: int | None) -> None:
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag, mode=mode)) as ws:
        await ws.recv()
        if mode == "close":
            close = await closed_by_server(ws)
            assert close is not None and close.code == 4002
            assert close.reason == ("app closing" if SERVER_REASON_PASSED[running.name] else "")
        elif (
            running.name != "daphne"
        ):  # see test_daphne_keeps_the_socket_open_after_the_app_returns
            await closed_by_server(ws)
    [end] = await running.ended(tag, 1)
    assert (end["end_reason"], end["code"]) == (reason, code)


async def test_app_raises_before_accept(running: Running) -> None:
    tag = uuid.uuid4().hex
    with pytest.raises(InvalidStatus) as refused:
        await connect(tagged(running, tag, mode="raise-before"))
    # granian answers 403, see test_granian_answers_an_app_error_before_accept_with_403.
    assert refused.value.response.status_code == (403 if running.name == "granian" else 500)
    [end] = await running.ended(tag, 1)
    assert end["end_reason"] == "app raised"


async def test_kick_through_the_manager(running: Running) -> None:
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag)) as ws:
        session_id = str(await ws.recv())
        assert await running.kick(session_id, 4003, "kicked")
        close = await closed_by_server(ws)
    assert close is not None and close.code == 4003
    assert close.reason == ("kicked" if SERVER_REASON_PASSED[running.name] else "")
    [end] = await running.ended(tag, 1)
    # wsession records the close it sent, whatever the server passed on.
    assert (end["end_reason"], end["code"], end["reason"]) == ("server closed", 4003, "kicked")


async def test_refusal_before_accept(running: Running) -> None:
    tag = uuid.uuid4().hex
    before = await running.stats()
    with pytest.raises(InvalidStatus) as refused:
        await connect(tagged(running, tag, refuse="1"))
    response = refused.value.response
    assert response.status_code == 403
    # daphne offers no denial extension: a bare 403 (test_daphne_refusal_has_no_body).
    assert response.body == (b"" if running.name == "daphne" else b"go away")
    after = await running.stats()
    assert after["refused_by"].get("test", 0) == before["refused_by"].get("test", 0) + 1
    assert running.hooks(tag) == (Counter(), [])  # refused in the connect hook: no hook ran


@pytest.mark.timeout(60)
async def test_storm_of_300_clients_leaving_in_mixed_ways(running: Running) -> None:
    """Clean closes, resets, app closes and kicks at once: hooks exactly once, counters
    balance."""
    tag = uuid.uuid4().hex
    ways = ["close", "reset", "app", "kick"] * 75
    random.Random(13).shuffle(ways)
    seen: list[str] = []

    async def one(way: str) -> None:
        mode = "close" if way == "app" else "echo"
        ws = await connect(tagged(running, tag, mode=mode), open_timeout=30)
        try:
            session_id = str(await ws.recv())
            seen.append(session_id)
            if way == "close":
                await ws.close()
            elif way == "reset":
                reset_connection(ws)
            elif way == "kick":
                assert await running.kick(session_id, 4003, "kicked")
                await closed_by_server(ws, timeout=30)
            else:
                await closed_by_server(ws, timeout=30)
        finally:
            ws.transport.abort()  # whatever happened, leave no socket behind

    async with asyncio.timeout(45):
        await asyncio.gather(*(one(way) for way in ways))
    ends = await running.ended(tag, 300, timeout=20)
    assert {e["id"] for e in ends} == set(seen)
    assert Counter(e["end_reason"] for e in ends)["server closed"] == 75
    stats = await running.stats()
    assert stats["live"] == 0
    assert stats["accepted"] == stats["ended"]


# -- known deviations: each asserts today's server behaviour, so an upstream fix is noticed ------


@pytest.mark.parametrize("running", ["hypercorn"], indirect=True)
async def test_hypercorn_reports_a_clean_client_close_as_1006(running: Running) -> None:
    """hypercorn 0.18 hands the app ``websocket.disconnect`` with 1006 whatever the client's
    close frame said, so wsession can only record a lost connection."""
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag)) as ws:
        await ws.recv()
        await ws.close(1000, "bye")
    [end] = await running.ended(tag, 1)
    assert (end["end_reason"], end["code"], end["reason"]) == ("connection lost", 1006, None)


@pytest.mark.parametrize("running", ["daphne", "granian"], indirect=True)
async def test_daphne_and_granian_drop_the_client_close_reason(running: Running) -> None:
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag)) as ws:
        await ws.recv()
        await ws.close(4001, "client leaving")
    [end] = await running.ended(tag, 1)
    assert (end["end_reason"], end["code"], end["reason"]) == ("client closed", 4001, None)


@pytest.mark.parametrize("running", ["daphne"], indirect=True)
async def test_daphne_drops_the_close_reason_sent_to_the_client(running: Running) -> None:
    """The kick's reason never reaches the client; wsession still records the one it sent."""
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag)) as ws:
        assert await running.kick(str(await ws.recv()), 4003, "kicked")
        close = await closed_by_server(ws)
    assert close is not None and (close.code, close.reason) == (4003, "")
    [end] = await running.ended(tag, 1)
    assert (end["code"], end["reason"]) == (4003, "kicked")


@pytest.mark.parametrize("running", ["daphne"], indirect=True)
async def test_daphne_refuses_close_code_1001_from_the_server(running: Running) -> None:
    """autobahn raises ``invalid close code 1001`` for server close codes other than 1000 and
    3000-4999: the app's close fails and the client sees 1011."""
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag, mode="close1001")) as ws:
        await ws.recv()
        close = await closed_by_server(ws)
    assert close is not None and close.code == 1011
    [end] = await running.ended(tag, 1)
    assert (end["end_reason"], end["code"]) == ("app closed", 1001)  # what the app asked for


async def test_only_daphne_sends_no_lifespan_scope(running: Running) -> None:
    """Under daphne the manager is entered by its first connection, not by the lifespan."""
    async with connect(tagged(running, uuid.uuid4().hex)) as ws:
        await ws.recv()
    assert (await running.stats())["started_lazily"] is (running.name == "daphne")


@pytest.mark.parametrize("running", ["daphne"], indirect=True)
async def test_daphne_leaves_the_socket_open_when_the_app_returns(running: Running) -> None:
    """daphne reaps the returned app but sends no close frame (its websocket timeout is a day);
    the session has ended all the same."""
    tag = uuid.uuid4().hex
    async with connect(tagged(running, tag, mode="return")) as ws:
        await ws.recv()
        [end] = await running.ended(tag, 1)
        assert end["end_reason"] == "app returned"
        with pytest.raises(TimeoutError):
            await closed_by_server(ws, timeout=1.0)  # bounded: nothing arrives


@pytest.mark.parametrize("running", ["daphne"], indirect=True)
async def test_daphne_refusal_has_no_body(running: Running) -> None:
    """daphne offers no ``websocket.http.response``: wsession falls back to a close before
    accept, which daphne answers with a bare 403."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(tagged(running, uuid.uuid4().hex, refuse="1"))
    assert (refused.value.response.status_code, refused.value.response.body) == (403, b"")


@pytest.mark.parametrize("running", ["granian"], indirect=True)
async def test_granian_adds_upgrade_headers_to_a_denial(running: Running) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(tagged(running, uuid.uuid4().hex, refuse="1"))
    response = refused.value.response
    assert (response.status_code, response.body) == (403, b"go away")
    assert response.headers["upgrade"].lower() == "websocket"
    assert "sec-websocket-accept" in response.headers


@pytest.mark.parametrize("running", ["granian"], indirect=True)
async def test_granian_answers_an_app_error_before_accept_with_403(running: Running) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(tagged(running, uuid.uuid4().hex, mode="raise-before"))
    assert refused.value.response.status_code == 403


# -- SIGTERM with 50 open connections, 10 fresh processes per server ------------------------

SIGTERM_RUNS = 10
DRAIN_TIMEOUT = 1.0
EXIT_MARGIN = 2.0  # seconds past the drain deadline for the process to exit
# daphne (autobahn) refuses close code 1001 from the server (wsession falls back to 1000, see
# the test below); the README recommends draining with 1000 there, which this matrix uses.
DRAIN_CODE = {"uvicorn": 1001, "hypercorn": 1001, "daphne": 1000, "granian": 1001}
# Crashes of the server itself (also without wsession): seen in a run, the run cannot pass.
UPSTREAM_CRASH = {
    "granian": "Cannot drop pointer into Python heap",
    "daphne": "KeyError: 'application_instance'",
}


@dataclass
class Shutdown:
    closes: list[int | None]
    status: int | None
    seconds: float
    connected: Counter[str]
    ended: list[dict[str, Any]]
    log: str


async def sigterm_with_open_connections(
    name: str, tmp_path: Path, drain_code: int, count: int = 50, extra_args: Sequence[str] = ()
) -> Shutdown:
    """Start ``name``, open ``count`` connections (half never read), SIGTERM it, collect."""
    events = tmp_path / "events.jsonl"
    events.touch()
    env = {
        "WSESSION_EVENTS_FILE": str(events),
        "WSESSION_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        "WSESSION_DRAIN_CODE": str(drain_code),
    }
    clients: list[Any] = []

    async def close_code(ws: Any) -> int | None:
        try:
            close = await closed_by_server(ws, timeout=DRAIN_TIMEOUT + 8)
        except TimeoutError:
            return None
        return None if close is None else close.code

    with serve(name, APP, tmp_path, env, extra_args=extra_args) as server:
        try:
            for i in range(count):
                mode = "silent" if i % 2 else "echo"
                clients.append(await connect(f"{server.ws}/ws?mode={mode}", open_timeout=10))
                await clients[-1].recv()
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            closes = await asyncio.gather(*(close_code(ws) for ws in clients))
            status = server.wait(DRAIN_TIMEOUT + 10)
            seconds = time.monotonic() - started
        finally:
            for ws in clients:
                ws.transport.abort()
        log = server.log()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    connected = Counter(e["id"] for e in lines if e["event"] == "connect")
    ended = [e for e in lines if e["event"] == "disconnect"]
    return Shutdown(list(closes), status, seconds, connected, ended, log)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(SIGTERM_RUNS))
@pytest.mark.parametrize("name", SERVERS)
async def test_sigterm_drains_50_open_connections(tmp_path: Path, name: str, run: int) -> None:
    """Every client gets the drain code, every session's hooks run exactly once, and the
    process exits within the drain deadline. A run in which the server itself crashes, or
    granian drops the close frames, is reported as xfailed with numbers (never retried); even
    then no hook ran twice."""
    result = await sigterm_with_open_connections(name, tmp_path, DRAIN_CODE[name])
    ended_ids = Counter(e["id"] for e in result.ended)
    assert all(n == 1 for n in ended_ids.values()), "a disconnect hook ran twice"
    assert set(ended_ids) <= set(result.connected)
    crash = UPSTREAM_CRASH.get(name)
    if crash is not None and crash in result.log:
        pytest.xfail(
            f"{name} crashed on SIGTERM ({crash!r}, upstream): {len(ended_ids)} of 50 sessions "
            f"ran their hooks (none twice), {result.closes.count(DRAIN_CODE[name])} of 50 "
            "clients got the drain code"
        )
    assert result.status is not None, f"{name} still running after the drain"
    assert result.seconds < DRAIN_TIMEOUT + EXIT_MARGIN
    assert len(result.connected) == 50
    assert ended_ids == result.connected
    assert {(e["end_reason"], e["code"]) for e in result.ended} == {
        ("server shutdown", DRAIN_CODE[name])
    }
    got = result.closes.count(DRAIN_CODE[name])
    if name == "granian" and got < 50:
        pytest.xfail(
            f"granian lost {50 - got} of 50 close frames: its worker's own loop SIGTERM handler "
            "tears connections down while wsession drains (hooks all ran once)"
        )
    assert result.closes == [DRAIN_CODE[name]] * 50


@pytest.mark.timeout(60)
async def test_daphne_drain_with_the_default_code_1001_falls_back_to_1000(tmp_path: Path) -> None:
    """autobahn refuses close code 1001 from a server (a bare Exception from ``send``): wsession
    contains it, closes with 1000 instead, and the drain goes on past the first session (issue
    11 item 18). Hooks still record the drain code wsession meant."""
    result = await sigterm_with_open_connections("daphne", tmp_path, 1001, count=10)
    ended_ids = Counter(e["id"] for e in result.ended)
    assert all(n == 1 for n in ended_ids.values()), "a disconnect hook ran twice"
    assert result.closes == [1000] * 10
    assert ended_ids == result.connected
    assert {(e["end_reason"], e["code"]) for e in result.ended} == {("server shutdown", 1001)}


@pytest.mark.timeout(60)
async def test_hypercorn_with_a_worker_process_never_drains(tmp_path: Path) -> None:
    """Without ``-w 0`` the supervisor gets SIGTERM and tells its worker by an event, not a
    signal: wsession's handler never runs, hypercorn cancels the apps after its graceful
    timeout and the clients get 1011. Hooks still run once (as cancelled)."""
    result = await sigterm_with_open_connections(
        "hypercorn", tmp_path, 1001, count=10, extra_args=["-w", "1", "--graceful-timeout", "1"]
    )
    assert set(result.closes) == {1011}
    assert Counter(e["id"] for e in result.ended) == result.connected
    assert {e["end_reason"] for e in result.ended} == {"cancelled"}
