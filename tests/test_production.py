"""Production behaviour: drain on SIGTERM/SIGINT, limits, Origin, idle and dead-peer
detection, hook timeouts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from wsession import EndReason, Refuse, Session, SessionManager

from .support import (
    HookRecorder,
    id_echo_app,
    read_until_closed,
    recorded,
    reset_connection,
    run_server,
)

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, **kwargs)
    return refused.value.response.status_code


# -- graceful drain ---------------------------------------------------------------------


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=ROOT, env=env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_drain_app(
    tmp_path: Path, drain_timeout: float
) -> tuple[subprocess.Popen[bytes], int, Path]:
    events = tmp_path / "events.log"
    port = free_port()
    env = {
        **os.environ,
        "WSESSION_EVENTS_FILE": str(events),
        "WSESSION_DRAIN_TIMEOUT": str(drain_timeout),
    }
    proc = _spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.apps.drain_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "30",
        ],
        env,
    )
    async with asyncio.timeout(20):
        while True:  # bounded by the timeout: wait until the port accepts
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert proc.poll() is None, "uvicorn exited early"
                await asyncio.sleep(0.05)
    return proc, port, events


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("sig", "count"), [(signal.SIGTERM, 200), (signal.SIGINT, 20)])
async def test_signal_drains_every_connection_with_1001(
    tmp_path: Path, sig: signal.Signals, count: int
) -> None:
    proc, port, events = await start_drain_app(tmp_path, drain_timeout=5)
    try:
        modes = ["read", "silent"] * (count // 2)
        clients = []
        for mode in modes:
            ws = await connect(f"ws://127.0.0.1:{port}/ws?mode={mode}", open_timeout=20)
            await ws.recv()
            clients.append(ws)
        started = time.monotonic()
        proc.send_signal(sig)
        closes = await asyncio.gather(*(read_until_closed(ws, timeout=30) for ws in clients))
        assert proc.wait(timeout=30) is not None
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [c.code if c else None for c in closes] == [1001] * count
    assert elapsed < 5 + 3  # the drain deadline plus process exit
    lines = events.read_text().splitlines()
    connected = [line.split()[1] for line in lines if line.startswith("connect ")]
    ended = [line.split()[1] for line in lines if line.startswith("disconnect ")]
    assert len(connected) == count
    assert Counter(ended) == Counter(connected)  # every session's hooks ran exactly once
    assert all("server shutdown 1001" in line for line in lines if line.startswith("disconnect"))


async def test_drain_refuses_new_connections_and_cuts_late_apps() -> None:
    manager, recorder = recorded(drain_timeout=0.5, drain_batch=2)
    async with run_server(id_echo_app(manager, reads=False)) as server:
        clients = [await connect(f"{server.ws}/ws") for _ in range(5)]
        for ws in clients:
            await ws.recv()
        started = time.monotonic()
        await manager.drain()
        assert time.monotonic() - started < 0.5 + 1
        await recorder.wait_ended(5)
        assert await refused_status(f"{server.ws}/ws") == 503
        assert manager.stats.refused_by["draining"] == 1
        for ws in clients:
            assert (await read_until_closed(ws)).code == 1001
    assert set(recorder.reasons()) == {EndReason.SERVER_SHUTDOWN}
    assert await manager.count() == 0


# -- limits -----------------------------------------------------------------------------------


async def test_total_limit_refuses_with_503_and_frees_a_slot() -> None:
    manager, recorder = recorded(max_sessions=2)
    async with run_server(id_echo_app(manager)) as server:
        a = await connect(f"{server.ws}/ws")
        b = await connect(f"{server.ws}/ws")
        assert await refused_status(f"{server.ws}/ws") == 503
        await a.close()
        await recorder.wait_ended(1)
        c = await connect(f"{server.ws}/ws")
        assert manager.stats.refused_by == {"limit_total": 1}
        await b.close()
        await c.close()


async def test_per_ip_limit_with_trusted_forwarded_for() -> None:
    manager, recorder = recorded(max_sessions_per_ip=2, trusted_proxies=["127.0.0.1"])
    async with run_server(id_echo_app(manager), proxy_headers=False) as server:
        url = f"{server.ws}/ws"
        ip1 = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
        ip2 = {"X-Forwarded-For": "10.0.0.2"}
        first = await connect(url, additional_headers=ip1)
        second = await connect(url, additional_headers=ip1)
        assert await refused_status(url, additional_headers=ip1) == 429
        other = await connect(url, additional_headers=ip2)  # another address still admitted
        await first.close()
        await recorder.wait_ended(1)
        again = await connect(url, additional_headers=ip1)
        for ws in (second, other, again):
            await ws.close()
    assert manager.stats.refused_by == {"limit_ip": 1}


async def test_per_user_limit() -> None:
    manager = SessionManager(max_sessions_per_user=1)
    recorder = HookRecorder()

    @manager.on_connect
    def identify(session: Session) -> None:
        session.user_key = session.query_params["user"]

    recorder.install(manager)
    async with run_server(id_echo_app(manager)) as server:
        alice = await connect(f"{server.ws}/ws?user=alice")
        assert await refused_status(f"{server.ws}/ws?user=alice") == 429
        bob = await connect(f"{server.ws}/ws?user=bob")
        await alice.close()
        await recorder.wait_ended(1)
        alice2 = await connect(f"{server.ws}/ws?user=alice")
        await bob.close()
        await alice2.close()
    assert manager.stats.refused_by == {"limit_user": 1}
    # The refused one completed its connect hooks, so its disconnect hooks ran too.
    assert len(recorder.connected) == len(recorder.ended) == 4
    assert recorder.reasons().count(EndReason.REFUSED) == 1
    assert manager.stats.accepted == 3


# -- Origin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "admitted"),
    [
        ("https://app.example", True),
        ("HTTPS://APP.EXAMPLE", True),
        ("https://app.example:443", True),
        ("https://app.example:8443", False),
        ("http://app.example", False),
        ("https://evil.example", False),
        ("null", False),
        (None, True),
    ],
)
async def test_origin_allow_list(origin: str | None, admitted: bool) -> None:
    manager = SessionManager(allowed_origins=["https://app.example"])
    async with run_server(id_echo_app(manager)) as server:
        url = f"{server.ws}/ws"
        if admitted:
            async with connect(url, origin=origin) as ws:  # type: ignore[arg-type]
                assert await ws.recv()
        else:
            assert await refused_status(url, origin=origin) == 403
            assert manager.stats.refused_by == {"origin": 1}


async def test_missing_origin_can_be_refused_and_same_origin_matches_host() -> None:
    manager = SessionManager(allowed_origins=["same-origin"], allow_missing_origin=False)
    async with run_server(id_echo_app(manager)) as server:
        url = f"{server.ws}/ws"
        assert await refused_status(url) == 403
        own = f"http://127.0.0.1:{server.port}"
        async with connect(url, origin=own) as ws:  # type: ignore[arg-type]
            assert await ws.recv()
        assert await refused_status(url, origin="http://127.0.0.1:1") == 403


def test_bad_origin_setting_names_it() -> None:
    from wsession import ConfigurationError

    with pytest.raises(ConfigurationError, match="allowed_origins"):
        SessionManager(allowed_origins=["app.example/path"])


# -- idle and dead peers -------------------------------------------------------------------


async def test_idle_timeout_closes_idle_sessions_only() -> None:
    manager, recorder = recorded(idle_timeout=0.3)
    async with run_server(id_echo_app(manager)) as server:
        idle = await connect(f"{server.ws}/ws")
        busy = await connect(f"{server.ws}/ws")
        idle_id = await idle.recv()
        await busy.recv()

        async def chat() -> None:
            for i in range(12):  # 12 x 0.1 s of traffic: never idle for 0.3 s
                await busy.send(f"m{i}")
                assert await busy.recv() == f"m{i}"
                await asyncio.sleep(0.1)

        await chat()
        closed = await read_until_closed(idle)
        assert (closed.code, closed.reason) == (4408, "idle timeout")
        await recorder.wait_ended(1)
        assert recorder.ended[0][:2] == (idle_id, EndReason.SERVER_CLOSED)
        assert await manager.count() == 1
        await busy.close()


async def test_detect_disconnect_notices_a_reset_client_of_an_app_that_never_reads() -> None:
    manager, recorder = recorded(detect_disconnect=True, close_timeout=0.2)
    async with run_server(id_echo_app(manager, reads=False)) as server:
        ws = await connect(f"{server.ws}/ws")
        sid = await ws.recv()
        reset_connection(ws)
        await recorder.wait_ended(1, timeout=5)
    assert recorder.ended[0][:2] == (sid, EndReason.CONNECTION_LOST)


async def test_without_detection_a_silent_app_is_not_told() -> None:
    """The cost-free default: uvicorn does not tell an app that never reads."""
    manager, recorder = recorded(close_timeout=0.1)
    async with run_server(id_echo_app(manager, reads=False)) as server:
        ws = await connect(f"{server.ws}/ws")
        sid = str(await ws.recv())
        reset_connection(ws)
        # Prove the session survives a client drop: a send-path probe still sees it live.
        for _ in range(20):
            await asyncio.sleep(0)
        assert (await manager.get(sid)) is not None
        assert await manager.close(sid)
        await recorder.wait_ended(1)


# -- hook timeouts ----------------------------------------------------------------------------


async def test_hanging_connect_hook_refuses_within_its_timeout() -> None:
    manager = SessionManager(connect_timeout=0.3)

    @manager.on_connect
    async def hang(session: Session) -> None:
        await asyncio.Event().wait()

    async with run_server(id_echo_app(manager)) as server:
        started = time.monotonic()
        assert await refused_status(f"{server.ws}/ws") == 500
        assert time.monotonic() - started < 2
    assert manager.stats.refused_by == {"hook_timeout": 1}


async def test_hanging_disconnect_hook_is_abandoned_others_run() -> None:
    manager = SessionManager(disconnect_timeout=0.2)
    recorder = HookRecorder()
    recorder.install(manager)  # registered first, so its disconnect hook runs last

    @manager.on_disconnect
    async def hang(session: Session) -> None:
        await asyncio.Event().wait()

    async with run_server(id_echo_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws")
        await ws.recv()
        await ws.close()
        await recorder.wait_ended(1, timeout=5)
    assert manager.stats.hook_errors == 1
    assert await manager.count() == 0


def test_refusal_labels_are_documented() -> None:
    assert Refuse(429, label="limit_ip").label == "limit_ip"
