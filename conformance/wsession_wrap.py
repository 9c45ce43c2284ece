"""pytest plugin: run someone else's test suite with every ASGI app wrapped by wsession.

Load it with ``-p wsession_wrap`` (this folder on ``PYTHONPATH``). It never edits the suite:

* ``starlette.testclient.TestClient.__init__`` is wrapped so that, once the client is built, its
  app is replaced by :class:`ConformanceApp` on the client and on every transport holding it;
* ``uvicorn.config.Config.load`` is wrapped so that ``loaded_app`` (the app a real server calls)
  becomes a :class:`ConformanceApp`, outermost.

A :class:`ConformanceApp` is ``WSessionMiddleware(app)`` with a fresh ``SessionManager`` whose
hooks record every connect and disconnect. The servers' own entry points for WebSocket scopes
(``WebSocketTestSession._run``, uvicorn's WebSocket protocols' ``run_asgi``) are observed too,
so a scope that reaches an app without going through the wrapper is counted as a bypass.

At the end of the run the plugin checks wsession's lifecycle contract over everything the suite
did: every session whose connect hooks completed had its disconnect hooks run exactly once, and
no session is left in any registry. It prints a summary and fails the run when nothing was
wrapped, when any scope bypassed the wrapper, or when the contract does not hold.

Environment:

* ``WSESSION_CONFORMANCE_OUT``: a folder for the per-process results (``<worker>.json``) and the
  aggregated ``summary.json``; each worker of pytest-xdist writes its own file and the
  controller sums them. Default: ``.wsession-conformance`` in the current folder.
* ``WSESSION_CONFORMANCE_HOOKS``: ``async`` (default) records from async hooks, so wsession's
  shielded teardown path runs; ``sync`` records from plain functions (its fast path).
* ``WSESSION_CONFORMANCE_BREAK``: deliberately break the wrapper, to prove the checks can fail.
  One of :data:`BREAKS`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from wsession import Session, SessionManager

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[Any]]

BREAKS: dict[str, str] = {
    # Mistakes a middleware could make; each must make the comparison with the baseline fail.
    "drop-reason": "strip the reason from the app's websocket.close",
    "drop-subprotocol": "strip the subprotocol from the app's websocket.accept",
    "drop-denial": "hide the websocket.http.response extension from the app",
    "rewrite-codes": "rewrite every websocket.disconnect code to 1000",
    "drop-return": "return None instead of the app's return value (every scope type)",
    # Mistakes of this plugin; each must make the plugin's own checks fail.
    "lose-disconnect": "forget every 7th disconnect record (the contract check must fail)",
    "bypass": "wrap TestClient.app but not its transport (the bypass check must fail)",
}
SUMMARY_FILE = "summary.json"
_LOST_EVERY = 7


class Recorder:
    """What this process saw. Hooks run in server threads (TestClient portals): use the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current_test = "<outside any test>"
        self.wrapped_scopes = 0
        self.served_scopes = 0
        self.bypassed: list[str] = []
        self.connected: dict[str, str] = {}  # session id -> test that opened it
        self.disconnects: dict[str, int] = {}  # session id -> disconnect hook runs
        self.unknown_disconnects: list[str] = []
        self.duplicate_ids: list[str] = []
        self.unfinished_at_disconnect: list[str] = []  # hook ran before the session ended
        self.libraries: Counter[str] = Counter()  # sessions per async library (asyncio, trio)
        self.endings: Counter[str] = Counter()  # "library: end reason" seen by disconnect hooks
        self.managers: list[SessionManager] = []
        self.break_mode = os.environ.get("WSESSION_CONFORMANCE_BREAK", "")
        self.hooks = os.environ.get("WSESSION_CONFORMANCE_HOOKS", "async")
        self._disconnect_calls = 0

    # -- hooks given to every SessionManager --------------------------------------------------

    def record_connect(self, session: Session) -> None:
        library = _event_loop()
        with self.lock:
            self.libraries[library] += 1
            if session.id in self.connected:
                self.duplicate_ids.append(self.current_test)
            self.connected[session.id] = self.current_test
            self.disconnects.setdefault(session.id, 0)

    def record_disconnect(self, session: Session) -> None:
        library = _event_loop()
        with self.lock:
            self.endings[f"{library}: {session.end_reason}"] += 1
            self._disconnect_calls += 1
            if self.break_mode == "lose-disconnect" and self._disconnect_calls % _LOST_EVERY == 0:
                return
            if session.id not in self.connected:
                self.unknown_disconnects.append(self.current_test)
                return
            self.disconnects[session.id] += 1
            if session.end_reason is None or not session.is_closed:
                self.unfinished_at_disconnect.append(self.connected[session.id])

    async def record_connect_async(self, session: Session) -> None:
        await _checkpoint()
        self.record_connect(session)

    async def record_disconnect_async(self, session: Session) -> None:
        await _checkpoint()
        self.record_disconnect(session)

    def new_manager(self) -> SessionManager:
        from wsession import SessionManager

        if self.hooks == "sync":
            manager = SessionManager(
                on_connect=[self.record_connect], on_disconnect=[self.record_disconnect]
            )
        else:
            manager = SessionManager(
                on_connect=[self.record_connect_async],
                on_disconnect=[self.record_disconnect_async],
            )
        with self.lock:
            self.managers.append(manager)
        return manager

    # -- scope accounting -----------------------------------------------------------------------

    def wrapped(self) -> None:
        with self.lock:
            self.wrapped_scopes += 1

    def served(self, app: object) -> None:
        """A server hands a WebSocket scope to ``app``: it must be our wrapper."""
        with self.lock:
            self.served_scopes += 1
            if not isinstance(app, ConformanceApp):
                self.bypassed.append(self.current_test)

    # -- end of run -------------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """This process's counts and contract findings, JSON-ready."""
        live = asyncio.run(_count_live(self.managers))
        with self.lock:
            missing = sorted(t for i, t in self.connected.items() if self.disconnects[i] == 0)
            repeated = sorted(t for i, t in self.connected.items() if self.disconnects[i] > 1)
            stats = [m.stats for m in self.managers]
            ended_by: Counter[str] = Counter()
            for s in stats:
                ended_by.update(s.ended_by)
            return {
                "break": self.break_mode,
                "hooks": self.hooks,
                "wrapped_scopes": self.wrapped_scopes,
                "served_scopes": self.served_scopes,
                "bypassed": sorted(self.bypassed),
                "managers": len(self.managers),
                "connected": len(self.connected),
                "disconnected_once": sum(1 for n in self.disconnects.values() if n == 1),
                "missing_disconnect": missing,
                "repeated_disconnect": repeated,
                "unknown_disconnect": sorted(self.unknown_disconnects),
                "duplicate_ids": sorted(self.duplicate_ids),
                "unfinished_at_disconnect": sorted(self.unfinished_at_disconnect),
                "libraries": dict(self.libraries),
                "endings": dict(self.endings),
                "ended_by": dict(ended_by),
                "live_sessions": live,
                "accepted": sum(s.accepted for s in stats),
                "refused": sum(s.refused for s in stats),
                "ended": sum(s.ended for s in stats),
                "hook_errors": sum(s.hook_errors for s in stats),
            }


def _event_loop() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # Not asyncio: these suites run nothing but asyncio and trio.
        return "trio" if "trio" in sys.modules else "other"
    return "asyncio"


async def _checkpoint() -> None:
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()


async def _count_live(managers: list[SessionManager]) -> int:
    return sum([await m.count() for m in managers])


RECORDER = Recorder()


class ConformanceApp:
    """``WSessionMiddleware(app)`` with recording hooks (and the selected deliberate break)."""

    def __init__(self, app: ASGIApp, recorder: Recorder) -> None:
        from wsession import WSessionMiddleware

        self.app = app
        self.recorder = recorder
        self.manager = recorder.new_manager()
        self.middleware = WSessionMiddleware(app, manager=self.manager)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        brk = self.recorder.break_mode
        if scope["type"] != "websocket":
            result = await self.middleware(scope, receive, send)  # type: ignore[func-returns-value]
            return None if brk == "drop-return" else result
        self.recorder.wrapped()
        if brk == "drop-denial":
            extensions = {
                k: v
                for k, v in (scope.get("extensions") or {}).items()
                if k != "websocket.http.response"
            }
            scope = {**scope, "extensions": extensions}
        if brk == "rewrite-codes":
            receive = _rewrite_codes(receive)
        if brk in ("drop-reason", "drop-subprotocol"):
            send = _strip_sent(send, brk)
        result = await self.middleware(scope, receive, send)  # type: ignore[func-returns-value]
        return None if brk == "drop-return" else result


def _rewrite_codes(receive: Receive) -> Receive:
    async def receive_rewritten() -> Message:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            message = {**message, "code": 1000}
        return message

    return receive_rewritten


def _strip_sent(send: Send, brk: str) -> Send:
    kind, key = (
        ("websocket.close", "reason")
        if brk == "drop-reason"
        else ("websocket.accept", "subprotocol")
    )

    async def send_stripped(message: Message) -> None:
        if message["type"] == kind and key in message:
            message = {k: v for k, v in message.items() if k != key}
        await send(message)

    return send_stripped


# -- patching the servers -----------------------------------------------------------------------


def _patch_starlette(recorder: Recorder) -> None:
    from starlette.testclient import TestClient, WebSocketTestSession

    original_init = TestClient.__init__

    @functools.wraps(original_init)
    def init(self: TestClient, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        app = self.app
        wrapper = ConformanceApp(app, recorder)
        self.app = wrapper
        if recorder.break_mode == "bypass":
            return
        transports = [self._transport, *self._mounts.values()]
        for transport in transports:
            if transport is not None and getattr(transport, "app", None) is app:
                transport.app = wrapper  # type: ignore[attr-defined]

    original_run = WebSocketTestSession._run

    @functools.wraps(original_run)
    async def run(self: WebSocketTestSession, *, task_status: Any) -> None:
        recorder.served(self.app)
        await original_run(self, task_status=task_status)

    TestClient.__init__ = init  # type: ignore[method-assign]
    WebSocketTestSession._run = run  # type: ignore[method-assign]


def _patch_uvicorn(recorder: Recorder) -> None:
    from uvicorn.config import Config
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

    original_load = Config.load

    @functools.wraps(original_load)
    def load(self: Config) -> None:
        original_load(self)
        if recorder.break_mode != "bypass":
            self.loaded_app = ConformanceApp(self.loaded_app, recorder)

    Config.load = load  # type: ignore[method-assign]

    # The legacy ``websockets_impl`` protocol is not patched: importing it warns (deprecated)
    # and none of the suites run here use it.
    for cls in (WSProtocol, WebSocketsSansIOProtocol):
        _observe_run_asgi(cls, recorder)


def _observe_run_asgi(cls: Any, recorder: Recorder) -> None:
    original = cls.run_asgi

    @functools.wraps(original)
    async def run_asgi(self: Any) -> None:
        recorder.served(self.app)
        await original(self)

    cls.run_asgi = run_asgi


# -- pytest hooks ----------------------------------------------------------------------------------


def _out_dir() -> Path:
    return Path(os.environ.get("WSESSION_CONFORMANCE_OUT", ".wsession-conformance"))


def _is_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.has_plugin("dsession")


def _worker_id(config: pytest.Config) -> str:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


def pytest_configure(config: pytest.Config) -> None:
    # Imported here, after the suite's conftest: the suite's own copy of the package is used.
    brk = RECORDER.break_mode
    if brk and brk not in BREAKS:
        raise pytest.UsageError(
            f"WSESSION_CONFORMANCE_BREAK={brk!r}: expected one of {', '.join(BREAKS)}"
        )
    if RECORDER.hooks not in ("sync", "async"):
        raise pytest.UsageError("WSESSION_CONFORMANCE_HOOKS: expected 'sync' or 'async'")
    if not hasattr(config, "workerinput"):  # the main process: start from a clean folder
        out = _out_dir()
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.json"):
            stale.unlink()
    _patch_starlette(RECORDER)
    _patch_uvicorn(RECORDER)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    RECORDER.current_test = item.nodeid
    try:
        return (yield)
    finally:
        RECORDER.current_test = "<between tests>"


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not _is_controller(config):
        (out / f"{_worker_id(config)}.json").write_text(json.dumps(RECORDER.result()))
        if hasattr(config, "workerinput"):
            return  # the controller aggregates and judges
    summary = aggregate(out)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    config.stash[_SUMMARY] = summary
    if summary["problems"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_SUMMARY = pytest.StashKey[dict[str, Any]]()


def aggregate(out: Path) -> dict[str, Any]:
    """Sum the per-process results in ``out`` and judge the run."""
    parts = [
        json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != SUMMARY_FILE
    ]
    total: dict[str, Any] = {"processes": len(parts)}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, list):
                total[key] = total.get(key, []) + value
            elif isinstance(value, dict):
                merged = Counter(total.get(key, {}))
                merged.update(value)
                total[key] = dict(merged)
            else:
                total[key] = value
    problems: list[str] = []
    if not parts:
        problems.append("no per-process results were written")
    if total.get("wrapped_scopes", 0) == 0:
        problems.append("no WebSocket scope went through the wrapper")
    if total.get("bypassed"):
        problems.append(f"{len(total['bypassed'])} WebSocket scope(s) bypassed the wrapper")
    for key, what in (
        ("missing_disconnect", "session(s) whose disconnect hooks never ran"),
        ("repeated_disconnect", "session(s) whose disconnect hooks ran more than once"),
        ("unknown_disconnect", "disconnect hook run(s) for a session never connected"),
        ("duplicate_ids", "connection id(s) given twice"),
        ("unfinished_at_disconnect", "disconnect hook run(s) on a session not yet closed"),
    ):
        if total.get(key):
            problems.append(f"{len(total[key])} {what}")
    if total.get("live_sessions", 0):
        problems.append(f"{total['live_sessions']} session(s) still registered at the end")
    if total.get("accepted", 0) != total.get("connected", 0):
        problems.append(
            f"stats.accepted={total.get('accepted', 0)} but {total.get('connected', 0)} "
            "connect hook completions were recorded"
        )
    if total.get("ended", 0) != total.get("accepted", 0):
        problems.append(f"stats.ended={total.get('ended', 0)} != accepted={total.get('accepted')}")
    total["problems"] = problems
    return total


def describe(summary: dict[str, Any]) -> list[str]:
    """Human-readable lines for a summary (used here and by ``run.py``)."""
    lines = [
        f"wsession-wrap: {summary.get('wrapped_scopes', 0)} WebSocket scopes wrapped "
        f"(servers handed out {summary.get('served_scopes', 0)}, "
        f"{len(summary.get('bypassed', []))} bypassed) in {summary.get('processes', 0)} "
        f"process(es), {summary.get('managers', 0)} managers, hooks={summary.get('hooks')}"
        + (f", BREAK={summary['break']}" if summary.get("break") else ""),
        f"wsession-wrap: contract: {summary.get('connected', 0)} sessions connected "
        f"(stats: {summary.get('accepted', 0)} accepted, {summary.get('refused', 0)} refused, "
        f"{summary.get('ended', 0)} ended), {summary.get('disconnected_once', 0)} disconnected "
        f"exactly once, {summary.get('live_sessions', 0)} still registered: "
        + ("OK" if not summary["problems"] else "FAILED"),
    ]
    lines.append(
        "wsession-wrap: sessions per event loop: "
        + _pairs(summary.get("libraries", {}))
        + "; stats.ended_by: "
        + _pairs(summary.get("ended_by", {}))
    )
    lines.append(
        "wsession-wrap: end reasons seen by disconnect hooks: " + _pairs(summary.get("endings", {}))
    )
    for problem in summary["problems"]:
        lines.append(f"wsession-wrap: PROBLEM: {problem}")
    for key in ("bypassed", "missing_disconnect", "repeated_disconnect", "unknown_disconnect"):
        tests = sorted(set(summary.get(key, [])))
        for test in tests[:10]:
            lines.append(f"wsession-wrap:   {key}: {test}")
        if len(tests) > 10:
            lines.append(f"wsession-wrap:   {key}: ... {len(tests) - 10} more tests")
    return lines


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY, None)
    if summary is None:
        return
    terminalreporter.section("wsession conformance wrapper")
    for line in describe(summary):
        terminalreporter.write_line(line)
