"""A deterministic in-process ASGI WebSocket server for race and fault tests.

It behaves like uvicorn where wsession depends on it, and adds the faults real servers show only
by chance:

- **back-pressure on demand**: ``client.pause()`` makes every ``send`` wait (as uvicorn's does
  while the transport is paused) until ``client.resume()``;
- **refused close codes**: ``FakeServer(refuse_close_codes={1001})`` raises from ``send`` like
  daphne/autobahn does for a server close with 1001;
- **task-bound send**: with ``task_bound=True`` every ``send`` runs inside a cancel scope
  (anyio) and records the task it ran in; a send whose coroutine is resumed from another task
  than the one that started it is detected (``client.foreign_resumes``) and its frame is lost,
  as it would be with a real task-bound scope;
- **ASGI state rules**: a ``websocket.send`` after ``websocket.close`` raises the same
  ``RuntimeError`` as uvicorn; a send after the client left raises ``ClientGone`` (an
  ``OSError``, like uvicorn's ``ClientDisconnected``).

Works under asyncio and trio (anyio primitives only). Nothing here sleeps: tests drive it step
by step and wait on its events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

Message = dict[str, Any]
App = Callable[[dict[str, Any], Any, Any], Awaitable[Any]]


class ClientGone(OSError):
    """Raised by ``send`` once the client has left (uvicorn: ``ClientDisconnected``)."""


class RefusedCloseCode(Exception):
    """Raised by ``send`` for a close code the server refuses (as autobahn does for 1001)."""


@dataclass
class FakeClient:
    """The client side of one fake connection, and what the server saw of it."""

    server: FakeServer
    scope: dict[str, Any]
    frames: list[Message] = field(default_factory=list)
    """Every message the app handed to the server, in order (accept, data, close, denial)."""
    lost: list[Message] = field(default_factory=list)
    """Frames a task-bound send lost because its coroutine was resumed from another task."""
    foreign_resumes: int = 0
    returned: Any = None
    raised: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    cancel_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    inbox: deque[Message] = field(default_factory=deque)
    """Messages the client sent that the app has not received yet."""
    _arrived: anyio.Event = field(default_factory=anyio.Event)
    _writable: anyio.Event = field(default_factory=anyio.Event)
    _gone: bool = False
    _closed_by_app: bool = False
    _pause_at: int | None = None
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self._writable.set()

    def _put(self, message: Message) -> None:
        self.inbox.append(message)
        self._arrived.set()

    # -- driving the client ------------------------------------------------------------------

    def say(self, text: str) -> None:
        """The client sends a text frame."""
        self._put({"type": "websocket.receive", "text": text})

    def close(self, code: int = 1000, reason: str = "") -> None:
        """The client sends a close frame."""
        self._put({"type": "websocket.disconnect", "code": code, "reason": reason})
        self._gone = True
        self._writable.set()

    def drop(self, code: int = 1005) -> None:
        """The TCP connection drops without a close frame (uvicorn reports 1005)."""
        self.close(code)

    def cancel(self) -> None:
        """Cancel the connection's task (as a server does on a shutdown timeout)."""
        self.cancel_scope.cancel()

    def pause(self) -> None:
        """Stop reading: every later ``send`` waits until :meth:`resume`."""
        self._writable = anyio.Event()

    def pause_after(self, frames: int) -> None:
        """Stop reading once ``frames`` more frames were written (back-pressure mid-burst)."""
        self._pause_at = len(self.frames) + frames

    def resume(self) -> None:
        """Read again: waiting sends complete, in the order they started."""
        self._writable.set()

    # -- what the app did ---------------------------------------------------------------------

    @property
    def data(self) -> list[str | bytes]:
        """Payloads of the data frames the client received, in order."""
        return [
            f.get("text") or f.get("bytes") or ""
            for f in self.frames
            if f["type"] == "websocket.send"
        ]

    @property
    def close_frame(self) -> Message | None:
        """The close frame the server wrote (``None`` if none yet)."""
        for frame in self.frames:
            if frame["type"] == "websocket.close":
                return frame
        return None

    @property
    def accepted(self) -> bool:
        return any(f["type"] == "websocket.accept" for f in self.frames)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``predicate()`` holds; re-checked after every frame."""
        with anyio.fail_after(timeout):
            while not predicate():
                self._changed = anyio.Event()
                await self._changed.wait()

    # -- the server's ASGI callables ---------------------------------------------------------

    async def receive(self) -> Message:
        while not self.inbox:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self.inbox.popleft()

    async def send(self, message: Message) -> None:
        if self.server.task_bound:
            await self._send_task_bound(message)
        else:
            await self._send(message)

    async def _send_task_bound(self, message: Message) -> None:
        # Like a send inside `asyncio.timeout` or an anyio cancel scope: bound to the task that
        # entered it. A coroutine resumed in another task loses its frame.
        started_in = _task_id()
        with anyio.CancelScope():
            await self._wait_writable()
            if _task_id() != started_in:
                self.foreign_resumes += 1
                self.lost.append(message)
                return
            self._write(message)

    async def _send(self, message: Message) -> None:
        await self._wait_writable()
        self._write(message)

    async def _wait_writable(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()

    def _write(self, message: Message) -> None:
        kind = message["type"]
        if self._gone:
            raise ClientGone("client disconnected")
        if self._closed_by_app:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}', after sending 'websocket.close' "
                "or response already completed."
            )
        if (
            kind == "websocket.close"
            and message.get("code", 1000) in self.server.refuse_close_codes
        ):
            raise RefusedCloseCode(f"invalid close code {message.get('code')}")
        if kind in ("websocket.close", "websocket.http.response.body"):
            self._closed_by_app = True
        self.frames.append(dict(message))
        self._changed.set()
        if self._pause_at is not None and len(self.frames) >= self._pause_at:
            self._pause_at = None
            self.pause()
        if kind == "websocket.close" and self.accepted and not self._gone:
            # A real client answers a close frame with its own; the server then tells the app.
            code = message.get("code", 1000)
            self._put({"type": "websocket.disconnect", "code": code})
            self._gone = True


@dataclass
class FakeServer:
    """Runs an ASGI app for fake WebSocket connections in the caller's task group."""

    app: App
    refuse_close_codes: set[int] = field(default_factory=set)
    task_bound: bool = False
    denial: bool = True
    """Offer the ``websocket.http.response`` extension."""

    async def connect(
        self,
        tg: anyio.abc.TaskGroup,
        path: str = "/ws",
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 50000),
        query_string: bytes = b"",
    ) -> FakeClient:
        """Start the app for one connection in ``tg``; the handshake is already delivered."""
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query_string,
            "headers": headers or [(b"host", b"testserver")],
            "client": client,
            "server": ("127.0.0.1", 8000),
            "subprotocols": [],
            "state": {},
            "extensions": {"websocket.http.response": {}} if self.denial else {},
        }
        conn = FakeClient(self, scope)
        conn._put({"type": "websocket.connect"})
        tg.start_soon(self._run, conn)
        return conn

    async def _run(self, conn: FakeClient) -> None:
        try:
            with conn.cancel_scope:
                conn.returned = await self.app(conn.scope, conn.receive, conn.send)
        except BaseException as exc:  # recorded for the test to assert on
            conn.raised = exc
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
        finally:
            conn.done.set()
            conn._changed.set()


def _task_id() -> int:
    return anyio.get_current_task().id
