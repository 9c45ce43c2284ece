"""Admission under concurrency: limits that cannot be raced, slots that always come back, and
drains that start while a handshake is still in its connect hooks (issue 11 items 1 and 16)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from wsession import EndReason, Refuse, Session, SessionManager

from .support import HookRecorder, id_echo_app, mount, recorded, run_server

pytestmark = pytest.mark.anyio


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
    async with run_server(id_echo_app(manager)) as server:
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
    async with run_server(id_echo_app(manager)) as server:
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
    async with run_server(id_echo_app(manager)) as server:
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
    async with run_server(id_echo_app(manager)) as server:
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
    async with run_server(id_echo_app(manager)) as server:
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


# -- the client IP behind proxies (issue 11 item 2) -------------------------------------------


def ip_of(peer: str, *forwarded: str, trusted: tuple[str, ...] = ("10.0.0.0/8",)) -> str | None:
    """The client IP admission sees for a handshake from ``peer`` carrying one X-Forwarded-For
    header line per ``forwarded`` value."""
    from wsession._admission import Admission
    from wsession._config import Settings

    headers = [(b"host", b"app.example")]
    headers += [(b"x-forwarded-for", value.encode("latin-1")) for value in forwarded]
    scope = {"type": "websocket", "client": (peer, 4711), "headers": headers}
    return Admission(Settings(trusted_proxies=trusted)).client_ip(scope)


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # No proxy trusted, or a peer that is not one: the header is the client's own words.
        ("203.0.113.9", ("198.51.100.1",), "203.0.113.9"),
        ("192.0.2.1", ("198.51.100.1",), "192.0.2.1"),
        # A trusted proxy appended the address it saw; what the client wrote before is ignored.
        ("10.0.0.1", ("198.51.100.1",), "198.51.100.1"),
        ("10.0.0.1", ("6.6.6.6, 198.51.100.1",), "198.51.100.1"),
        # Several header lines form one list, in order: the last line is the nearest proxy's.
        ("10.0.0.1", ("6.6.6.6", "198.51.100.1"), "198.51.100.1"),
        ("10.0.0.1", ("6.6.6.6, 7.7.7.7", "198.51.100.1, 10.0.0.2"), "198.51.100.1"),
        # A chain of trusted proxies is walked from the right.
        ("10.0.0.1", ("198.51.100.1, 10.0.0.3, 10.0.0.2",), "198.51.100.1"),
        # Every hop trusted: the left-most (a proxy that connected on its own behalf).
        ("10.0.0.1", ("10.0.0.5, 10.0.0.2",), "10.0.0.5"),
        # What is not an IP address stops the walk: nothing trusted vouches for what lies
        # left of it, so the nearest trusted hop stands for the client.
        ("10.0.0.1", ("198.51.100.1, unknown",), "10.0.0.1"),
        ("10.0.0.1", ("198.51.100.1, unknown, 10.0.0.2",), "10.0.0.2"),
        ("10.0.0.1", ("198.51.100.1, 10.0.0.2\x00",), "10.0.0.1"),
        ("10.0.0.1", ("",), "10.0.0.1"),
        ("10.0.0.1", (" , 198.51.100.1 ,",), "198.51.100.1"),
        # Ports are tolerated (some proxies append ip:port); addresses are normalised.
        ("10.0.0.1", ("198.51.100.1:5555",), "198.51.100.1"),
        ("10.0.0.1", ("2001:0DB8:0:0:0:0:0:1",), "2001:db8::1"),
        ("10.0.0.1", ("[2001:db8::1]:4711",), "2001:db8::1"),
        ("10.0.0.1", ("::ffff:198.51.100.1",), "198.51.100.1"),
    ],
)
def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: tuple[str, ...], expected: str
) -> None:
    assert ip_of(peer, *forwarded) == expected


def test_client_ip_ipv6_proxies() -> None:
    trusted = ("::1", "fd00::/8")
    assert ip_of("::1", "2001:db8::7, fd00::2", trusted=trusted) == "2001:db8::7"
    assert ip_of("fd00::9", "2001:db8::7", trusted=trusted) == "2001:db8::7"
    assert ip_of("2001:db8::5", "2001:db8::7", trusted=trusted) == "2001:db8::5"
    assert ip_of("::ffff:10.0.0.1", "198.51.100.1") == "198.51.100.1"  # a dual-stack peer


def test_client_ip_without_trusted_proxies_is_the_peer() -> None:
    assert ip_of("10.0.0.1", "198.51.100.1", trusted=()) == "10.0.0.1"


@pytest.mark.parametrize(
    "bad", [("proxy.internal",), ("10.0.0.1/8",), ("10.0.0.0/33",), ("*",), ("",)]
)
def test_bad_trusted_proxies_name_the_setting(bad: tuple[str, ...]) -> None:
    from wsession import ConfigurationError

    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        SessionManager(trusted_proxies=bad)


@pytest.mark.parametrize("value", [True, False])
def test_trust_forwarded_for_points_to_trusted_proxies(value: bool) -> None:
    from wsession import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"trust_forwarded_for.*trusted_proxies"):
        SessionManager(trust_forwarded_for=value)


async def test_per_ip_limit_cannot_be_dodged_with_forwarded_for() -> None:
    manager = SessionManager(max_sessions_per_ip=1, trusted_proxies=["127.0.0.1"])
    # proxy_headers=False: wsession, not uvicorn, reads the header here (see docs/production.md).
    async with run_server(id_echo_app(manager), proxy_headers=False) as server:
        url = f"{server.ws}/ws"

        async def as_proxied(*lines: str) -> ClientConnection | int:
            try:
                ws = await connect(url, additional_headers=[("X-Forwarded-For", v) for v in lines])
            except InvalidStatus as refused:
                return refused.response.status_code
            await ws.recv()
            return ws

        first = await as_proxied("1.1.1.1, 203.0.113.9")
        assert not isinstance(first, int)
        # The client rotates what it writes; the proxy (us) appends its real address.
        assert await as_proxied("2.2.2.2, 203.0.113.9") == 429
        assert await as_proxied("3.3.3.3", "203.0.113.9") == 429
        other = await as_proxied("203.0.113.10")
        assert not isinstance(other, int)
        await first.close()
        await other.close()
    assert manager.stats.refused_by == {"limit_ip": 2}


async def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    manager = SessionManager(max_sessions_per_ip=1, trusted_proxies=["10.0.0.1"])
    async with run_server(id_echo_app(manager), proxy_headers=False) as server:
        first = await connect(f"{server.ws}/ws", additional_headers={"X-Forwarded-For": "1.1.1.1"})
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}/ws", additional_headers={"X-Forwarded-For": "2.2.2.2"})
        assert refused.value.response.status_code == 429
        await first.close()


# -- the Host header, against DNS rebinding (issue 12 item 7) ---------------------------------


async def rebinding_status(port: int, authority: str, origin: str | None) -> int:
    """Handshake with Host ``authority`` (and ``origin``), as a browser does after a rebinding
    page's name started to resolve to this server: 101, or the refusal's HTTP status."""
    try:
        ws = await connect(
            f"ws://{authority}/ws",
            host="127.0.0.1",
            port=port,
            origin=origin,  # type: ignore[arg-type]
            proxy=None,
        )
    except InvalidStatus as refused:
        return refused.response.status_code
    await ws.close()
    return 101


async def test_same_origin_alone_trusts_the_host_header() -> None:
    # The documented trade-off: without allowed_hosts, a page served from evil.example whose
    # name now resolves to this server is "same-origin" with itself.
    manager = SessionManager(allowed_origins=["same-origin"])
    async with run_server(id_echo_app(manager)) as server:
        evil = "evil.example:8000"
        assert await rebinding_status(server.port, evil, f"http://{evil}") == 101


async def test_allowed_hosts_refuses_a_rebinding_handshake() -> None:
    manager = SessionManager(allowed_origins=["same-origin"], allowed_hosts=["127.0.0.1"])
    async with run_server(id_echo_app(manager)) as server:
        evil = "evil.example:8000"
        assert await rebinding_status(server.port, evil, f"http://{evil}") == 403
        assert await rebinding_status(server.port, evil, None) == 403  # no Origin either
        own = f"127.0.0.1:{server.port}"
        assert await rebinding_status(server.port, own, f"http://{own}") == 101
    assert manager.stats.refused_by == {"host": 2}


@pytest.mark.parametrize(
    ("allowed", "host", "admitted"),
    [
        (("app.example",), "app.example", True),
        (("app.example",), "APP.example:8443", True),  # no port given: any port
        (("app.example",), "app.example.", True),  # the root label's dot
        (("app.example:8443",), "app.example:8443", True),
        (("app.example:8443",), "app.example", False),
        (("app.example:80",), "app.example", True),  # ws:// default port
        (("app.example",), "evil.example", False),
        (("app.example",), "app.example.evil.example", False),
        (("app.example",), "app.example@evil.example", False),
        (("[::1]:8000",), "[::1]:8000", True),
        (("[::1]:8000",), "[0:0::1]:8000", False),  # spelled differently: not the same Host
        (("app.example",), "", False),
        (("app.example",), None, False),
        (("app.example",), ("app.example", "evil.example"), False),  # two Host headers
    ],
)
def test_allowed_hosts_matching(
    allowed: tuple[str, ...], host: str | tuple[str, ...] | None, admitted: bool
) -> None:
    from wsession._admission import Admission, Ticket
    from wsession._config import Settings

    hosts = (host,) if isinstance(host, str) else host or ()
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "client": ("127.0.0.1", 4711),
        "headers": [(b"host", h.encode("latin-1")) for h in hosts],
    }
    result = Admission(Settings(allowed_hosts=allowed)).admit(scope)
    if admitted:
        assert isinstance(result, Ticket)
    else:
        assert isinstance(result, Refuse)
        assert (result.status, result.code, result.label) == (403, 1008, "host")


@pytest.mark.parametrize(
    "bad", [("https://app.example",), ("app.example/path",), ("",), ("app.example:99999",)]
)
def test_bad_allowed_hosts_name_the_setting(bad: tuple[str, ...]) -> None:
    from wsession import ConfigurationError

    with pytest.raises(ConfigurationError, match="allowed_hosts"):
        SessionManager(allowed_hosts=bad)


# -- caps on groups (issue 12 item 8) ---------------------------------------------------------


async def test_group_caps_are_enforced_by_join() -> None:
    from wsession import LimitExceeded, WSessionError

    manager = SessionManager(max_groups_per_session=3, max_group_name_length=10)
    async with run_server(id_echo_app(manager)) as server, connect(f"{server.ws}/ws") as ws:
        session_id = await ws.recv()
        assert isinstance(session_id, str)
        assert await manager.join(session_id, "x" * 10)
        with pytest.raises(LimitExceeded, match="max_group_name_length") as too_long:
            await manager.join(session_id, "x" * 11)
        assert isinstance(too_long.value, ValueError)
        assert isinstance(too_long.value, WSessionError)
        assert await manager.join(session_id, "b")
        assert await manager.join(session_id, "c")
        with pytest.raises(LimitExceeded, match="max_groups_per_session"):
            await manager.join(session_id, "d")
        assert await manager.join(session_id, "c")  # already a member: not a new group
        assert await manager.leave(session_id, "c")
        assert await manager.join(session_id, "d")
        assert manager.local[session_id].groups == {"x" * 10, "b", "d"}
        assert await manager.members("x" * 11) == []


async def test_concurrent_joins_cannot_race_the_group_cap() -> None:
    from wsession import LimitExceeded

    manager = SessionManager(max_groups_per_session=2)
    async with run_server(id_echo_app(manager)) as server, connect(f"{server.ws}/ws") as ws:
        session_id = await ws.recv()
        assert isinstance(session_id, str)
        results = await asyncio.gather(
            *(manager.join(session_id, f"room-{i}") for i in range(5)), return_exceptions=True
        )
        assert results.count(True) == 2
        assert sum(isinstance(r, LimitExceeded) for r in results) == 3
        assert len(manager.local[session_id].groups) == 2


def test_group_caps_have_defaults_and_are_validated() -> None:
    from wsession import ConfigurationError, Settings

    assert (Settings().max_groups_per_session, Settings().max_group_name_length) == (100, 256)
    with pytest.raises(ConfigurationError, match="max_groups_per_session"):
        SessionManager(max_groups_per_session=0)
    with pytest.raises(ConfigurationError, match="max_group_name_length"):
        SessionManager(max_group_name_length=0)


async def test_uvicorn_proxy_headers_let_a_local_client_pick_its_ip() -> None:
    # What docs/production.md warns about: uvicorn (not wsession) trusts X-Forwarded-For from
    # 127.0.0.1 by default, so a local client chooses its per-IP bucket; --no-proxy-headers
    # closes it. wsession's trusted_proxies is empty in both runs.
    for proxy_headers, second in ((True, "admitted"), (False, 429)):
        manager = SessionManager(max_sessions_per_ip=1)
        async with run_server(id_echo_app(manager), proxy_headers=proxy_headers) as server:
            url = f"{server.ws}/ws"
            first = await connect(url, additional_headers={"X-Forwarded-For": "1.1.1.1"})
            try:
                other = await connect(url, additional_headers={"X-Forwarded-For": "2.2.2.2"})
            except InvalidStatus as refused:
                outcome: str | int = refused.response.status_code
            else:
                outcome = "admitted"
                await other.close()
            await first.close()
        assert outcome == second, f"proxy_headers={proxy_headers}"
