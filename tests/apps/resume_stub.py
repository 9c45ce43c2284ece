"""A stub of the resumption wire contract (issue 14), for testing the JavaScript client alone.

Only the contract, none of wsession: ``WS /ws?name=N[&resume=TOKEN&last=N]`` answers a welcome
``{"type": "welcome", "id", "resume": TOKEN, "resumed": bool, "replay": K}``, then numbered
messages ``{"type": "msg", "seq": N, "text": ...}``. A resume is accepted when TOKEN is the
session's current one (tokens rotate on every resume) and every message after ``last`` is still
in the session's small buffer (``BUFFER`` messages); otherwise the client gets a new session and
``"resumed": false``. A client message ``{"type": "echo", "text": T}`` is answered with a
numbered ``{"type": "echo", "seq": N, "text": T}``.

The test drives it over HTTP (``/ctl/...``, see the routes) and cuts connections with
:class:`DropProxy`, which sits between the browser and the server: ``cut()`` ends every
connection without a close frame, the way a lost network does (the browser sees 1006).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import client_script_route

BUFFER = 5

TEST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>wsession client test</title>
<script src="/wsession-client.js"></script></head>
<body><script>
// Every event of the client, in order, as plain JSON (what the test reads back).
window.log = [];
window.start = (url, options, fixedRandom) => {
  const opts = { ...options };
  if (fixedRandom !== null && fixedRandom !== undefined) opts.random = () => fixedRandom;
  const client = new WSessionClient(url, opts);
  for (const name of WSessionClient.events) {
    client.on(name, (detail) => {
      window.log.push({ event: name, detail: JSON.parse(JSON.stringify(detail ?? null)) });
    });
  }
  window.client = client;
};
</script></body></html>
"""

BLANK_PAGE = "<!doctype html><html><head><title>blank</title></head><body></body></html>"


@dataclass
class StubSession:
    """One session of the stub: its numbering, its buffer and its current connection."""

    id: str
    token: str
    seq: int = 0
    buffer: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=BUFFER))
    socket: WebSocket | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: dict[str, Any]) -> int:
        """Number ``message``, buffer it, and write it if a connection is attached."""
        async with self.lock:
            self.seq += 1
            text = json.dumps({**message, "seq": self.seq})
            self.buffer.append((self.seq, text))
            await self._write(text)
            return self.seq

    async def _write(self, text: str) -> None:
        if self.socket is None:
            return
        try:
            await self.socket.send_text(text)
        except (OSError, RuntimeError, WebSocketDisconnect):  # gone: the buffer keeps it
            self.socket = None


@dataclass
class StubState:
    """What the stub knows; the test reads it through ``GET /ctl/state``."""

    sessions: dict[str, StubSession] = field(default_factory=dict)
    latest: StubSession | None = None
    connects: list[dict[str, str]] = field(default_factory=list)
    connect_times: list[float] = field(default_factory=list)  # time.monotonic() of each
    received: list[Any] = field(default_factory=list)
    refuse: int = 0
    announce_replay: bool = True
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def resume(self, query: dict[str, str]) -> tuple[StubSession, list[str]] | None:
        """The session to take over and the messages to replay, or None for a new session."""
        token, last_text = query.get("resume"), query.get("last", "")
        session = next((s for s in self.sessions.values() if s.token == token), None)
        if session is None or not last_text.isdigit():
            return None
        last = int(last_text)
        if not session.seq - len(session.buffer) <= last <= session.seq:
            return None  # the buffer no longer holds everything after `last`: never partial
        return session, [text for seq, text in session.buffer if seq > last]


def create_app() -> Starlette:
    """A fresh stub (its state lives in this app only)."""
    state = StubState()
    state.gate.set()

    async def ws_endpoint(ws: WebSocket) -> None:
        async with state.changed:
            state.connects.append(dict(ws.query_params))
            state.connect_times.append(time.monotonic())
            state.changed.notify_all()
        await state.gate.wait()  # /ctl/hold keeps a handshake waiting here
        if state.refuse > 0:
            state.refuse -= 1
            await ws.close(1013)  # before accept: an HTTP 403, the browser sees 1006
            return
        await ws.accept()
        found = state.resume(dict(ws.query_params))
        if found is None:
            session = StubSession(secrets.token_urlsafe(8), secrets.token_urlsafe(16))
            state.sessions[session.id] = session
            replay: list[str] = []
        else:
            session, replay = found
            session.token = secrets.token_urlsafe(16)  # single use: rotated on every resume
        state.latest = session
        welcome: dict[str, Any] = {
            "type": "welcome",
            "id": session.id,
            "name": ws.query_params.get("name"),
            "resume": session.token,
            "resumed": found is not None,
        }
        if state.announce_replay:
            welcome["replay"] = len(replay)
        async with session.lock:  # nothing live overtakes the welcome and the replay
            await ws.send_text(json.dumps(welcome))
            for text in replay:
                await ws.send_text(text)
            session.socket = ws
        try:
            while True:
                message = json.loads(await ws.receive_text())
                state.received.append(message)
                if message.get("type") == "echo":
                    await session.send({"type": "echo", "text": message.get("text")})
        except WebSocketDisconnect:
            pass
        finally:
            if session.socket is ws:
                session.socket = None

    def target(request: Request) -> StubSession:
        if state.latest is None:
            raise LookupError("no session yet")
        return state.latest

    async def send(request: Request) -> Response:
        session = target(request)
        for _ in range(int(request.query_params.get("n", "1"))):
            seq = session.seq + 1
            await session.send({"type": "msg", "text": f"m{seq}"})
        return JSONResponse({"id": session.id, "seq": session.seq})

    async def resend(request: Request) -> Response:
        """Write an already sent (buffered) message again: a duplicate the client must drop."""
        session, seq = target(request), int(request.query_params["seq"])
        text = next(text for number, text in session.buffer if number == seq)
        async with session.lock:
            await session._write(text)
        return JSONResponse({"seq": seq})

    async def close(request: Request) -> Response:
        session = target(request)
        code = int(request.query_params["code"])
        async with session.lock:
            socket, session.socket = session.socket, None
            if socket is not None:
                await socket.close(code, request.query_params.get("reason", ""))
        return JSONResponse({"closed": socket is not None})

    async def control(request: Request) -> Response:
        """hold / release the handshakes, refuse the next N, configure the welcome."""
        params = request.query_params
        if "hold" in params:
            state.gate.clear()
        if "release" in params:
            state.gate.set()
        if "refuse" in params:
            state.refuse = int(params["refuse"])
        if "announce_replay" in params:
            state.announce_replay = params["announce_replay"] == "1"
        return JSONResponse({"ok": True})

    async def wait_connects(request: Request) -> Response:
        """Answer once the server has seen ``n`` WebSocket handshakes (or 408 after 5 s)."""
        wanted = int(request.query_params["n"])
        try:
            async with asyncio.timeout(5), state.changed:
                await state.changed.wait_for(lambda: len(state.connects) >= wanted)
        except TimeoutError:
            return JSONResponse({"connects": state.connects}, status_code=408)
        return JSONResponse({"connects": state.connects})

    async def show(request: Request) -> Response:
        return JSONResponse(
            {
                "connects": state.connects,
                "connect_times": state.connect_times,
                "received": state.received,
                "sessions": {
                    s.id: {"seq": s.seq, "attached": s.socket is not None}
                    for s in state.sessions.values()
                },
            }
        )

    async def page(request: Request) -> Response:
        return HTMLResponse(TEST_PAGE)

    async def blank(request: Request) -> Response:
        return HTMLResponse(BLANK_PAGE)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/blank", blank),
            client_script_route(),
            WebSocketRoute("/ws", ws_endpoint),
            Route("/ctl/send", send, methods=["POST"]),
            Route("/ctl/resend", resend, methods=["POST"]),
            Route("/ctl/close", close, methods=["POST"]),
            Route("/ctl/set", control, methods=["POST"]),
            Route("/ctl/wait", wait_connects),
            Route("/ctl/state", show),
        ]
    )


class DropProxy:
    """A TCP forwarder to ``127.0.0.1:target_port`` whose ``cut()`` drops every connection.

    It runs its own event loop in a thread (the browser tests' thread belongs to Playwright).
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Event()  # cleared by hold(): new connections wait to be forwarded
        self._gate.set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="drop-proxy")
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await self._gate.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            finally:  # either side ending ends both
                writer.transport.abort()
                up_writer.transport.abort()

        try:
            await asyncio.gather(
                pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._writers.difference_update((writer, up_writer))

    def cut(self) -> int:
        """Abort every open connection (no close frame, no FIN handshake); return how many."""

        async def abort_all() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.transport.abort()
            return len(writers) // 2

        count: int = self._call(abort_all())
        return count

    def hold(self) -> None:
        """New connections are accepted but wait, unforwarded, until :meth:`release`."""
        self._loop.call_soon_threadsafe(self._gate.clear)

    def release(self) -> None:
        """Forward the waiting connections and every new one."""
        self._loop.call_soon_threadsafe(self._gate.set)

    def close(self) -> None:
        """Stop listening, drop what is open, stop the loop and join its thread."""

        async def shutdown() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            self._gate.set()
            if self._tasks:  # the handlers end at once when their transports are gone
                await asyncio.wait(list(self._tasks), timeout=3)

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
