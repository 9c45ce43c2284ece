"""Prometheus metrics, the admin API and log records, on a real server with real clients."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from example_app import create_app
from example_app.app import Member
from wsession import (
    ConfigurationError,
    EndReason,
    Session,
    SessionManager,
    WSessionMiddleware,
    get_session,
)
from wsession.admin import admin_app
from wsession.metrics import SessionMetrics, metrics_app, register_metrics

from .support import HookRecorder, Server, read_until_closed, run_server

pytestmark = pytest.mark.anyio

TOKEN = "test-admin-token-3f9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def example(
    monkeypatch: pytest.MonkeyPatch, *, admin: bool = True
) -> AsyncIterator[tuple[Server, SessionManager, HookRecorder, httpx.AsyncClient]]:
    """The example app on a real server, with a hook recorder installed first."""
    if admin:
        monkeypatch.setenv("WSESSION_ADMIN_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("WSESSION_ADMIN_TOKEN", raising=False)
    manager = SessionManager(data_model=Member)
    recorder = HookRecorder()
    recorder.install(manager)
    async with run_server(create_app(manager)) as server, httpx.AsyncClient() as http:
        yield server, manager, recorder, http


async def join_as(server: Server, name: str) -> tuple[ClientConnection, str]:
    ws = await connect(f"{server.ws}/ws?name={name}")
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws, welcome["id"]


async def scrape(http: httpx.AsyncClient, server: Server) -> Samples:
    response = await http.get(f"{server.http}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Poll ``check`` (sync or async) until it returns true; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_a_scripted_scenario(monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(monkeypatch) as (server, manager, recorder, http):
        clients = [await join_as(server, name) for name in ("ann", "ben", "cat")]
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}/ws?name=")
        assert refused.value.response.status_code == 403

        live = await scrape(http, server)
        assert value(live, "wsession_sessions_live") == 3
        assert value(live, "wsession_sessions_accepted_total") == 3
        assert value(live, "wsession_sessions_refused_total", reason="bad_name") == 1

        (ann, _), (ben, _), (cat, cat_id) = clients
        for ws, _ in clients:  # a presence diff reached each (sends counted by the manager)
            async with asyncio.timeout(5):
                while json.loads(await ws.recv())["type"] != "presence_diff":
                    pass
        await ann.close()
        await ben.close()
        kicked = await http.post(f"{server.http}/api/kick/{cat_id}")
        assert kicked.status_code == 200
        closed = await read_until_closed(cat)
        assert closed is not None and closed.code == 4000
        await recorder.wait_ended(3)
        # Each disconnect hook is timed after it returns: wait for the last observation.
        await until(lambda: manager.stats.hook_seconds["disconnect"].count == 3)

        samples = await scrape(http, server)
        assert value(samples, "wsession_sessions_live") == 0
        assert value(samples, "wsession_sessions_accepted_total") == 3
        assert value(samples, "wsession_sessions_refused_total", reason="bad_name") == 1
        assert value(samples, "wsession_sessions_ended_total", reason="client closed") == 2
        assert value(samples, "wsession_sessions_ended_total", reason="server closed") == 1
        assert value(samples, "wsession_hook_errors_total") == 0
        assert value(samples, "wsession_slow_consumers_total") == 0
        assert value(samples, "wsession_dropped_messages_total") == 0
        # Two connect hooks (the recorder's, then the name check) ran for all four attempts;
        # one disconnect hook (the recorder's; presence leaves in the teardown, no hook) for
        # three endings.
        for phase, calls in (("connect", 2 * 4), ("disconnect", 3)):
            histogram = manager.stats.hook_seconds[phase]
            assert value(samples, "wsession_hook_duration_seconds_count", phase=phase) == calls
            assert value(
                samples, "wsession_hook_duration_seconds_bucket", phase=phase, le="+Inf"
            ) == (calls)
            total = value(samples, "wsession_hook_duration_seconds_sum", phase=phase)
            assert total == pytest.approx(histogram.total)
            assert total is not None and 0 < total < 5
        # Presence and the kick's sends, by result, as the manager counted them.
        sends = {str(k): v for k, v in manager.stats.sends.items()}
        assert sends.get("delivered", 0) > 0
        for result, count in sends.items():
            assert value(samples, "wsession_sends_total", result=result) == count


async def test_metrics_endpoint_content_negotiation_and_methods() -> None:
    manager = SessionManager()
    registry = CollectorRegistry()
    register_metrics(manager, registry, namespace="chat")
    manager.stats.accepted, manager.stats.ended = 5, 2
    manager.stats.refused_by["too_many"] += 1
    app = Starlette(routes=[Route("/m", metrics_app(registry))])
    async with run_server(app) as server, httpx.AsyncClient() as http:
        plain = await http.get(f"{server.http}/m")
        assert plain.status_code == 200
        assert plain.headers["content-type"].startswith("text/plain")
        # live is len(manager.local) (no connection here), not accepted - ended
        assert "chat_sessions_live 0.0" in plain.text
        assert "chat_sessions_accepted_total 5.0" in plain.text
        assert 'chat_sessions_refused_total{reason="too_many"} 1.0' in plain.text
        om = await http.get(f"{server.http}/m", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        head = await http.head(f"{server.http}/m")
        assert head.status_code == 200
        post = await http.post(f"{server.http}/m")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"


def test_register_metrics_rejects_clashes_and_bad_namespaces() -> None:
    registry = CollectorRegistry()
    collector = register_metrics(SessionManager(), registry)
    assert isinstance(collector, SessionMetrics)
    with pytest.raises(ConfigurationError, match="registry"):
        register_metrics(SessionManager(), registry)
    register_metrics(SessionManager(), registry, namespace="other")  # its own names: fine
    with pytest.raises(ConfigurationError, match="namespace"):
        SessionMetrics(SessionManager(), namespace="bad-name")
    registry.unregister(collector)
    register_metrics(SessionManager(), registry)  # the names are free again


def test_importing_wsession_does_not_import_prometheus() -> None:
    code = (
        "import sys, wsession, wsession.admin; "
        "sys.exit(1 if 'prometheus_client' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -- admin API ----------------------------------------------------------------------------


async def test_admin_refuses_missing_and_wrong_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(monkeypatch) as (server, _, _, http):
        ws, sid = await join_as(server, "ann")
        url = f"{server.http}/admin/sessions"
        attempts: list[dict[str, str]] = [
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer"},
            {"Authorization": f"bearer  {TOKEN[:-1]}"},
        ]
        for headers in attempts:
            for method, path in (
                ("GET", "/admin/sessions"),
                ("GET", "/admin/stats"),
                ("POST", f"/admin/sessions/{sid}/kick"),
                ("GET", "/admin/no-such-page"),
            ):
                response = await http.request(method, f"{server.http}{path}", headers=headers)
                assert response.status_code == 401, (headers, path)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert sid not in response.text
        ok = await http.get(url, headers=AUTH)
        assert ok.status_code == 200
        assert [s["id"] for s in ok.json()["sessions"]] == [sid]
        # The refused kick attempts did nothing.
        assert (await manager_count(http, server)) == 1
        await ws.close()


async def manager_count(http: httpx.AsyncClient, server: Server) -> int:
    stats = (await http.get(f"{server.http}/admin/stats", headers=AUTH)).json()
    return int(stats["live"])


async def test_admin_lists_pages_and_filters_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(monkeypatch) as (server, manager, _, http):
        tab1, id1 = await join_as(server, "alice")
        bob, bob_id = await join_as(server, "bob")
        tab2, id2 = await join_as(server, "alice")
        await bob.send(json.dumps({"type": "join", "group": "room"}))
        await until(lambda: manager.members("room"))

        async def listing(**params: Any) -> httpx.Response:
            return await http.get(f"{server.http}/admin/sessions", params=params, headers=AUTH)

        everything = (await listing()).json()
        assert everything["total"] == 3
        assert [s["id"] for s in everything["sessions"]] == [id1, bob_id, id2]  # oldest first
        entry = everything["sessions"][1]
        assert set(entry) == {
            "id",
            "path",
            "client",
            "connected_at",
            "state",
            "user_key",
            "groups",
            "subprotocol",
            "node",
        }
        assert entry["path"] == "/ws" and entry["state"] == "open"
        assert entry["user_key"] == "bob" and entry["groups"] == ["room"]
        assert entry["client"]["host"] == "127.0.0.1" and isinstance(entry["client"]["port"], int)
        assert entry["connected_at"].endswith("+00:00")
        assert "data" not in entry

        page1 = (await listing(limit=2)).json()
        page2 = (await listing(limit=2, offset=2)).json()
        assert (page1["total"], page1["limit"], page1["offset"]) == (3, 2, 0)
        assert [s["id"] for s in page1["sessions"] + page2["sessions"]] == [id1, bob_id, id2]
        assert (await listing(offset=10)).json()["sessions"] == []

        alice = (await listing(user="alice")).json()
        assert alice["total"] == 2 and {s["id"] for s in alice["sessions"]} == {id1, id2}
        room = (await listing(group="room")).json()
        assert [s["id"] for s in room["sessions"]] == [bob_id]
        assert (await listing(group="nobody-here")).json()["total"] == 0
        assert (await listing(path="/ws")).json()["total"] == 3
        assert (await listing(path="/elsewhere")).json()["total"] == 0
        assert (await listing(user="alice", limit=1, offset=1)).json()["sessions"][0]["id"] == id2

        for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"offset": -1}):
            response = await listing(**bad)
            assert response.status_code == 400, bad
            assert "error" in response.json()

        one = await http.get(f"{server.http}/admin/sessions/{bob_id}", headers=AUTH)
        assert one.status_code == 200 and one.json()["id"] == bob_id
        missing = await http.get(f"{server.http}/admin/sessions/nope", headers=AUTH)
        assert missing.status_code == 404

        stats = (await http.get(f"{server.http}/admin/stats", headers=AUTH)).json()
        assert stats["live"] == 3 and stats["local_live"] == 3
        assert stats["accepted"] == 3 and stats["ended"] == 0
        for ws in (tab1, bob, tab2):
            await ws.close()


async def test_admin_kick_ends_the_session_and_runs_hooks_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with example(monkeypatch) as (server, _, recorder, http):
        ann, ann_id = await join_as(server, "ann")
        ben, ben_id = await join_as(server, "ben")
        kick_url = f"{server.http}/admin/sessions/{ann_id}/kick"

        for bad in ({"code": 1005}, {"code": "4000"}, {"reason": 7}, {"reason": "x" * 124}, [1]):
            response = await http.post(kick_url, json=bad, headers=AUTH)
            assert response.status_code == 400, bad
        not_json = await http.post(kick_url, content=b"{nope", headers=AUTH)
        assert not_json.status_code == 400
        assert recorder.ended == []  # bad requests kicked nobody

        response = await http.post(kick_url, json={"code": 4001, "reason": "bye"}, headers=AUTH)
        assert response.status_code == 200
        assert response.json() == {"result": "closed", "id": ann_id, "code": 4001, "reason": "bye"}
        closed = await read_until_closed(ann)
        assert closed is not None and (closed.code, closed.reason) == (4001, "bye")
        await recorder.wait_ended(1)
        assert recorder.ended == [(ann_id, EndReason.SERVER_CLOSED, 4001, "bye")]
        again = await http.post(kick_url, headers=AUTH)
        assert again.status_code == 404
        unknown = await http.post(f"{server.http}/admin/sessions/nope/kick", headers=AUTH)
        assert unknown.status_code == 404

        # No body: the defaults.
        default = await http.post(f"{server.http}/admin/sessions/{ben_id}/kick", headers=AUTH)
        assert default.status_code == 200
        closed = await read_until_closed(ben)
        assert closed is not None and (closed.code, closed.reason) == (4000, "kicked by admin")
        await recorder.wait_ended(2)
        assert sorted(recorder.ended_ids()) == sorted([ann_id, ben_id])  # once each

        stats = (await http.get(f"{server.http}/admin/stats", headers=AUTH)).json()
        assert stats["ended_by"] == {"server closed": 2}
        assert stats["live"] == 0


async def test_admin_is_disabled_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    async with example(monkeypatch, admin=False) as (server, _, _, http):
        ws, sid = await join_as(server, "ann")
        for method, path in (
            ("GET", "/admin/sessions"),
            ("GET", "/admin/stats"),
            ("POST", f"/admin/sessions/{sid}/kick"),
        ):
            response = await http.request(method, f"{server.http}{path}", headers=AUTH)
            assert response.status_code == 404, path
        assert (await http.get(f"{server.http}/metrics")).status_code == 200  # metrics stay
        await ws.close()


async def test_admin_shows_session_data_only_when_configured() -> None:
    manager = SessionManager(data_model=Member)

    @manager.on_connect
    def name_it(session: Session) -> None:
        session.data.name = session.query_params.get("name", "")

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="chat.v1")
        await websocket.send_text(get_session(websocket).id)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass

    app = Starlette(
        routes=[
            WebSocketRoute("/live", endpoint),
            Mount("/hidden", admin_app(manager, token=TOKEN)),
            Mount("/shown", admin_app(manager, token=TOKEN, show_data=True)),
        ],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    async with run_server(app) as server, httpx.AsyncClient() as http:
        ws = await connect(f"{server.ws}/live?name=zoe", subprotocols=["chat.v1"])  # type: ignore[list-item]
        sid = await ws.recv()
        shown = (await http.get(f"{server.http}/shown/sessions", headers=AUTH)).json()
        assert shown["sessions"][0]["id"] == sid
        assert shown["sessions"][0]["data"] == {"name": "zoe"}
        assert shown["sessions"][0]["subprotocol"] == "chat.v1"
        assert shown["sessions"][0]["path"] == "/live"
        hidden = (await http.get(f"{server.http}/hidden/sessions", headers=AUTH)).json()
        assert hidden["sessions"][0]["id"] == sid and "data" not in hidden["sessions"][0]
        await ws.close()


def test_admin_requires_a_token() -> None:
    manager = SessionManager()
    for token in ("", "   "):
        with pytest.raises(ConfigurationError, match="token"):
            admin_app(manager, token=token)
    with pytest.raises(ConfigurationError, match="token"):
        admin_app(manager, token=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="manager"):
        admin_app(object(), token=TOKEN)  # type: ignore[arg-type]


# -- log records ------------------------------------------------------------------------------


async def test_log_records_carry_the_connection_id(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("WSESSION_ADMIN_TOKEN", raising=False)
    manager = SessionManager(data_model=Member)

    @manager.on_connect
    def explode_on_request(session: Session) -> None:
        if session.query_params.get("name") == "boom":
            raise RuntimeError("connect hook broke")

    @manager.on_disconnect
    def always_explode(session: Session) -> None:
        raise RuntimeError("disconnect hook broke")

    caplog.set_level(logging.WARNING, logger="wsession")
    async with run_server(create_app(manager)) as server, httpx.AsyncClient() as http:
        ws, sid = await join_as(server, "ann")
        await ws.close()

        def failure_logged() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.name == "wsession" and "disconnect hook" in r.getMessage()
            ]

        await until(failure_logged)
        (record,) = failure_logged()
        assert record.levelno == logging.ERROR
        assert record.connection_id == sid  # type: ignore[attr-defined]
        assert record.exc_info is not None and "disconnect hook broke" in str(record.exc_info[1])

        with pytest.raises(InvalidStatus):
            await connect(f"{server.ws}/ws?name=boom")
        refusals = [r for r in caplog.records if "connect hook failed" in r.getMessage()]
        assert len(refusals) == 1
        refused_id = refusals[0].connection_id  # type: ignore[attr-defined]
        assert isinstance(refused_id, str) and refused_id and refused_id != sid

        samples = await scrape(http, server)
        assert value(samples, "wsession_hook_errors_total") == 2
        assert value(samples, "wsession_sessions_refused_total", reason="hook_error") == 1


@pytest.mark.anyio
async def test_resumption_metrics_are_exported() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from wsession import SessionManager
    from wsession.metrics import register_metrics

    manager = SessionManager(resume_window=60)
    manager.stats.detached, manager.stats.resumed = 3, 2
    manager.stats.resume_failed["unknown"] = 1
    registry = CollectorRegistry()
    register_metrics(manager, registry)
    text = generate_latest(registry).decode()
    assert "wsession_sessions_detached 0.0" in text
    assert "wsession_sessions_detached_events_total 3.0" in text
    assert "wsession_sessions_resumed_total 2.0" in text
    assert 'wsession_resume_failed_total{reason="unknown"} 1.0' in text
