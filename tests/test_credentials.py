"""Credentials on long-lived connections, on a real uvicorn server: expiry at expires_at +
expiry_grace, in-band refresh, revocation, and their counters (in-memory registry; the Redis
cluster is in test_credentials_cluster.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from example_app.app import create_app
from wsession import (
    ConfigurationError,
    EndReason,
    Refuse,
    Session,
    SessionManager,
    SessionStateError,
    get_session,
)

from .support import HookRecorder, mount, next_of, read_until_closed, recorded, run_server

pytestmark = pytest.mark.anyio


def example(**env: str) -> tuple[Starlette, SessionManager, HookRecorder]:
    """The example app configured by ``env``, with a recorder on its manager."""
    app = create_app(environ=env)
    manager: SessionManager = app.state.sessions
    recorder = HookRecorder()
    recorder.install(manager)
    return app, manager, recorder


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    return await next_of(ws, "welcome")


async def until_echo(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message before the next echo (the echo marks "everything sent so far")."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while (message := json.loads(await ws.recv()))["type"] != "echo":
            seen.append(message)
    return seen


def parse(stamp: str) -> datetime:
    at = datetime.fromisoformat(stamp)
    assert at.utcoffset() == timedelta(0), stamp  # UTC
    return at


# -- expiry ---------------------------------------------------------------------------------


async def test_expiry_closes_at_ttl_plus_grace_with_4401() -> None:
    ttl, grace = 0.6, 0.3
    app, manager, recorder = example(
        WSESSION_SESSION_TTL=str(ttl), WSESSION_EXPIRY_GRACE=str(grace)
    )
    async with run_server(app) as server:
        ws = await connect(f"{server.ws}/ws?name=alice")
        first = await welcome(ws)
        expires_at = parse(first["expires_at"])
        now = datetime.now(UTC)
        assert timedelta(0) < expires_at - now <= timedelta(seconds=ttl)
        close = await read_until_closed(ws)
        closed_at = datetime.now(UTC)
        await recorder.wait_ended(1)
    assert (close.code, close.reason) == (4401, "expired")
    late = (closed_at - (expires_at + timedelta(seconds=grace))).total_seconds()
    assert -0.05 <= late <= 1.0, late  # at TTL + grace, within 1 s
    assert recorder.ended == [(first["id"], EndReason.SERVER_CLOSED, 4401, "expired")]
    assert manager.stats.expired == 1
    assert manager.stats.as_dict()["expired"] == 1


async def test_refresh_in_time_keeps_the_session_open_over_many_ttls() -> None:
    """Twenty refreshes over about twelve TTLs (small TTLs stand in for a long clock): each one
    moves expires_at forward and re-arms the timer; the session closes only once they stop."""
    ttl, grace = 0.5, 0.1
    app, manager, recorder = example(
        WSESSION_SESSION_TTL=str(ttl), WSESSION_EXPIRY_GRACE=str(grace)
    )
    refreshes = 20
    async with run_server(app) as server:
        ws = await connect(f"{server.ws}/ws?name=alice")
        first = await welcome(ws)
        started = time.monotonic()
        expires_at = parse(first["expires_at"])
        for _ in range(refreshes):
            # A client's schedule, as a real one keeps it: refresh when 40 % of the TTL is left.
            wait = (expires_at - datetime.now(UTC)).total_seconds() - 0.4 * ttl
            await asyncio.sleep(max(0.0, wait))
            await ws.send(json.dumps({"type": "refresh"}))
            answer = await next_of(ws, "refreshed")
            moved = parse(answer["expires_at"])
            assert moved > expires_at
            expires_at = moved
        lasted = time.monotonic() - started
        assert not recorder.ended  # never closed while refreshed in time
        close = await read_until_closed(ws)
        closed_at = datetime.now(UTC)
        await recorder.wait_ended(1)
    assert lasted > 10 * (ttl + grace)  # the session outlived many TTLs
    assert (close.code, close.reason) == (4401, "expired")
    late = (closed_at - (expires_at + timedelta(seconds=grace))).total_seconds()
    assert -0.05 <= late <= 1.0, late
    assert manager.stats.refreshes == {"ok": refreshes}
    assert manager.stats.expired == 1
    assert recorder.reasons() == [EndReason.SERVER_CLOSED]


async def test_without_a_ttl_there_is_no_expiry_and_refresh_is_an_error() -> None:
    app, manager, _ = example()
    async with run_server(app) as server, connect(f"{server.ws}/ws?name=alice") as ws:
        assert "expires_at" not in await welcome(ws)
        await ws.send(json.dumps({"type": "refresh"}))
        assert (await next_of(ws, "error"))["error"]
        session = next(iter(manager.local.values()))
        assert session.expires_at is None and session._expiry is None  # no object at all


# -- refresh that fails ----------------------------------------------------------------------


def refresh_app(manager: SessionManager) -> Starlette:
    """Each text message is a credential: the app refreshes with it and answers the new
    expiry (ISO) or "refused"."""

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        session = get_session(ws)
        await ws.send_text(session.id)
        try:
            while True:
                credential = await ws.receive_text()
                at = await manager.refresh(session, credential)
                await ws.send_text(at.isoformat() if at is not None else "refused")
        except WebSocketDisconnect:
            pass

    return mount(endpoint, manager)


def refreshing_manager(**settings: Any) -> tuple[SessionManager, HookRecorder]:
    manager, recorder = recorded(expiry_grace=0, **settings)

    @manager.on_connect
    def admit(session: Session) -> None:
        session.user_key = "alice"
        session.expires_at = datetime.now(UTC) + timedelta(hours=1)

    @manager.on_refresh
    async def check(session: Session, credential: Any) -> datetime | None:
        now = datetime.now(UTC)
        if credential == "good":
            return now + timedelta(hours=2)
        if credential == "short":
            return now + timedelta(seconds=0.3)  # a new token may expire sooner
        if credential == "refuse":
            raise Refuse(reason="token revoked")
        if credential == "past":
            return now - timedelta(seconds=1)  # an expired token must never be accepted
        if credential == "naive":
            return datetime.now() + timedelta(hours=2)  # naive: the point of the test
        if credential == "steal":
            session.user_key = "mallory"  # raises SessionStateError: refused
        if credential == "boom":
            raise RuntimeError("validator broke")
        return None

    return manager, recorder


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        ("none", "refresh failed"),
        ("refuse", "token revoked"),
        ("past", "credential expired"),
        ("naive", "refresh failed"),
        ("steal", "refresh failed"),
        ("boom", "refresh failed"),
    ],
)
async def test_a_failing_refresh_closes_with_the_expiry_code(credential: str, reason: str) -> None:
    manager, recorder = refreshing_manager()
    async with run_server(refresh_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws")
        session_id = await ws.recv()
        session = manager.local[str(session_id)]
        before = session.expires_at
        await ws.send("good")
        assert parse(str(await ws.recv())) > before  # type: ignore[operator]
        await ws.send(credential)
        close = await read_until_closed(ws, timeout=5)
        await recorder.wait_ended(1)
    assert (close.code, close.reason) == (4401, reason)
    assert recorder.ended == [(session_id, EndReason.SERVER_CLOSED, 4401, reason)]
    assert session.user_key == "alice"  # never changed by a refresh
    assert manager.stats.refreshes == {"ok": 1, "failed": 1}
    assert manager.stats.expired == 0
    assert manager.stats.hook_errors == (1 if credential in ("naive", "steal", "boom") else 0)


async def test_a_refresh_to_an_earlier_expiry_re_arms_the_timer() -> None:
    manager, recorder = refreshing_manager()
    async with run_server(refresh_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws")
        session_id = str(await ws.recv())
        await ws.send("short")
        expires_at = parse(str(await ws.recv()))
        close = await read_until_closed(ws, timeout=3)
        closed_at = datetime.now(UTC)
        await recorder.wait_ended(1)
    assert (close.code, close.reason) == (4401, "expired")
    assert -0.05 <= (closed_at - expires_at).total_seconds() <= 1.0  # grace 0 here
    assert recorder.ended == [(session_id, EndReason.SERVER_CLOSED, 4401, "expired")]


async def test_refresh_without_a_refresh_hook_fails_closed() -> None:
    manager, recorder = recorded()
    async with run_server(refresh_app(manager)) as server:
        ws = await connect(f"{server.ws}/ws")
        await ws.recv()
        await ws.send("anything")
        close = await read_until_closed(ws, timeout=5)
        await recorder.wait_ended(1)
    assert close.code == 4401
    assert manager.stats.refreshes == {"failed": 1}


async def test_refresh_of_an_unknown_id_changes_nothing() -> None:
    manager, _ = refreshing_manager()
    assert await manager.refresh("no-such-id", "good") is None
    assert manager.stats.refreshes == {}


# -- the expires_at field --------------------------------------------------------------------


async def test_expires_at_is_set_in_connect_hooks_only_and_must_be_aware() -> None:
    manager, recorder = recorded()
    seen: list[BaseException] = []

    @manager.on_connect
    def admit(session: Session) -> None:
        mode = session.query_params.get("mode")
        if mode == "naive":
            session.expires_at = datetime.now() + timedelta(hours=1)  # naive on purpose
        else:
            eastern = datetime.now(UTC).astimezone(timezone_minus_5())
            session.expires_at = eastern + timedelta(hours=1)

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        session = get_session(ws)
        try:
            session.expires_at = datetime.now(UTC)
        except SessionStateError as exc:
            seen.append(exc)
        assert session.expires_at is not None
        await ws.send_text(session.expires_at.isoformat())
        await ws.close()

    async with run_server(mount(endpoint, manager)) as server:
        async with connect(f"{server.ws}/ws") as ws:
            assert parse(str(await ws.recv())) > datetime.now(UTC)  # stored in UTC
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}/ws?mode=naive")
        await recorder.wait_ended(1)
    assert refused.value.response.status_code == 500  # a hook error: refused
    assert len(seen) == 1
    assert manager.stats.refused_by == {"hook_error": 1}


def timezone_minus_5() -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=-5))


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="expiry_reason"):
        SessionManager(expiry_reason="é" * 62)  # 124 bytes: more than a close frame holds
    with pytest.raises(ConfigurationError, match="expiry_code"):
        SessionManager(expiry_code=999)
    with pytest.raises(ConfigurationError, match="revocation_ttl"):
        SessionManager(revocation_ttl=0)
    with pytest.raises(ConfigurationError, match="expiry_grace"):
        SessionManager(expiry_grace=-1)


async def test_a_closed_session_with_an_armed_expiry_is_freed_without_the_gc() -> None:
    """The expiry timer is cancelled at the end, and a cancelled handle drops the session:
    plain reference counting frees a session whose expiry was an hour away (uvicorn's own
    keepalive timer is switched off, as in test_server_lifecycle)."""
    manager, recorder = refreshing_manager()
    freed = asyncio.Event()
    armed: list[bool] = []

    @manager.on_connect
    def watch(session: Session) -> None:
        weakref.finalize(session, freed.set)

    gc.disable()
    try:
        async with run_server(refresh_app(manager), ws_ping_interval=None) as server:
            async with connect(f"{server.ws}/ws") as ws:
                session_id = str(await ws.recv())
                await ws.send("good")  # re-armed once too
                await ws.recv()
                expiry = manager.local[session_id]._expiry
                armed.append(expiry is not None and expiry.timer is not None)
                del expiry
            await recorder.wait_ended(1)
            async with asyncio.timeout(5):  # the connection task unwinds after the hooks
                await freed.wait()
    finally:
        gc.enable()
    assert armed == [True]
    assert freed.is_set()


# -- revocation ------------------------------------------------------------------------------


async def test_revoke_closes_every_tab_of_the_user_once_and_the_denylist_refuses_them() -> None:
    app, manager, recorder = example(WSESSION_REVOCATION_TTL="30")
    async with run_server(app) as server, httpx.AsyncClient() as client:
        tabs = [await connect(f"{server.ws}/ws?name=alice") for _ in range(2)]
        ids = [(await welcome(ws))["id"] for ws in tabs]
        bob = await connect(f"{server.ws}/ws?name=bob")
        known = {i for person in (await welcome(bob))["presence"] for i in person["ids"]}
        while not known >= set(ids):  # bob was told of both tabs (coalesced diffs)
            diff = await next_of(bob, "presence_diff")
            known.update(i for person in diff["joins"] for i in person["ids"])
        started = time.monotonic()
        answer = await client.post(f"{server.http}/api/revoke/alice")
        assert answer.status_code == 200 and answer.json() == {"closed": 2}
        closes = [await read_until_closed(ws, timeout=1) for ws in tabs]
        assert time.monotonic() - started < 1.0
        assert [(c.code, c.reason) for c in closes] == [(4403, "revoked")] * 2
        await recorder.wait_ended(2)
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}/ws?name=alice")
        assert refused.value.response.status_code == 403
        assert await manager.is_revoked(user_key="alice")
        assert not await manager.is_revoked(user_key="bob")
        # bob is untouched and told of each of alice's tabs leaving exactly once (diffs of the
        # lobby, coalesced: the two leaves may come in one diff or two)
        offline: list[str] = []
        while len(offline) < len(ids):
            diff = await next_of(bob, "presence_diff")
            offline += [i for person in diff["leaves"] for i in person["ids"]]
        assert sorted(offline) == sorted(ids)
        await bob.send(json.dumps({"type": "echo", "text": "mark"}))
        assert not [m for m in await until_echo(bob) if m.get("leaves")]
        await bob.close()
        await recorder.wait_ended(3)
    assert sorted(recorder.ended_ids()[:2]) == sorted(ids)
    assert [e[1:] for e in recorder.ended[:2]] == [(EndReason.SERVER_CLOSED, 4403, "revoked")] * 2
    stats = manager.stats.as_dict()
    assert stats["revocations"] == {"user": 1} and stats["revoked"] == 2
    assert stats["refused_by"] == {"revoked": 1}


async def test_revoke_session_closes_one_and_denylists_its_id() -> None:
    manager, recorder = recorded(revocation_ttl=30)
    async with run_server(refresh_app(manager)) as server:
        one, two = await connect(f"{server.ws}/ws"), await connect(f"{server.ws}/ws")
        one_id, two_id = str(await one.recv()), str(await two.recv())
        assert await manager.revoke_session(one_id, 4403, "revoked")
        close = await read_until_closed(one, timeout=1)
        await recorder.wait_ended(1)
        assert (close.code, close.reason) == (4403, "revoked")
        assert await manager.is_revoked(session_id=one_id)
        assert not await manager.is_revoked(session_id=two_id)
        assert not await manager.revoke_session(one_id)  # gone: nothing closed
        await two.close()
        await recorder.wait_ended(2)
    assert recorder.ended[0] == (one_id, EndReason.SERVER_CLOSED, 4403, "revoked")
    assert manager.stats.revocations == {"session": 2}
    assert manager.stats.revoked == 1


async def test_without_revocation_ttl_nothing_is_denylisted() -> None:
    manager, _ = recorded()
    assert await manager.revoke_user("alice") == 0
    assert not await manager.is_revoked(user_key="alice")
    with pytest.raises(ValueError, match="user_key, session_id"):
        await manager.is_revoked()
    with pytest.raises(ValueError, match="user_key"):
        await manager.revoke_user("")


async def test_revoke_goes_through_the_api_guard_like_kick() -> None:
    app, _, _ = example()
    async with run_server(app) as server, httpx.AsyncClient() as client:
        foreign = await client.post(
            f"{server.http}/api/revoke/alice", headers={"origin": "https://evil.example"}
        )
        plain = await client.post(
            f"{server.http}/api/revoke/alice",
            content="x",
            headers={"content-type": "text/plain"},
        )
    assert foreign.status_code == 403
    assert plain.status_code == 415


# -- counters and metrics --------------------------------------------------------------------


async def test_counters_reach_stats_and_prometheus() -> None:
    from prometheus_client import CollectorRegistry

    from wsession.metrics import register_metrics

    manager, recorder = refreshing_manager()
    registry = CollectorRegistry()
    register_metrics(manager, registry)
    async with run_server(refresh_app(manager)) as server:
        failing, expiring, revoked = [await connect(f"{server.ws}/ws") for _ in range(3)]
        for ws in (failing, expiring, revoked):
            await ws.recv()
        await failing.send("good")
        await failing.recv()
        await failing.send("none")
        assert (await read_until_closed(failing, timeout=3)).code == 4401
        await expiring.send("short")
        await expiring.recv()
        assert (await read_until_closed(expiring, timeout=3)).reason == "expired"
        assert await manager.revoke_user("alice") == 1
        assert (await read_until_closed(revoked, timeout=3)).code == 4403
        await recorder.wait_ended(3)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("wsession_refreshes_total", result="ok") == 2
    assert sample("wsession_refreshes_total", result="failed") == 1
    assert sample("wsession_sessions_expired_total") == 1
    assert sample("wsession_revocations_total", kind="user") == 1
    assert sample("wsession_revoked_sessions_total") == 1
    stats = manager.stats.as_dict()
    assert [stats[k] for k in ("expired", "refreshes", "revocations", "revoked")] == [
        1,
        {"ok": 2, "failed": 1},
        {"user": 1},
        1,
    ]
