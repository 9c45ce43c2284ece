"""Connections driven in process from async tests (anyio: asyncio or trio), no TestClient.

httpx's ``ASGITransport`` cannot open WebSockets, so this drives the ASGI app directly: the
test's own event loop runs the app, like a server would, with uvicorn's behaviour where wsession
depends on it (disconnect codes, a send after the client left raises an ``OSError``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from starlette.websockets import WebSocketDisconnect

from .._exceptions import WSessionError
from .._manager import SessionManager
from .._session import Session
from ._capture import MARKER_HEADER, capture_session
from ._discover import find_manager
from ._sync import LOST, SHUTDOWN

Message = dict[str, Any]


class ClientDisconnected(OSError):
    """What the app's ``send`` raises once the client left (uvicorn raises its own
    ``ClientDisconnected``, also an ``OSError``)."""


class HandshakeDenied(WebSocketDisconnect):
    """The app (or a connect hook) answered the handshake with an HTTP response.

    Attributes:
        status_code: the HTTP status.
        headers: the response headers (lower-case names).
        body: the response body.
    """

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(1008, body.decode("utf-8", "replace"))
        self.status_code = status_code
        self.headers = headers
        self.body = body


class AsyncConnection:
    """One connection opened by :meth:`AsyncSessionClient.connect`: the async twin of
    :class:`~wsession.testing.Connection` (same endings; every receive takes a ``timeout``)."""

    def __init__(
        self,
        client: AsyncSessionClient,
        path: str,
        headers: dict[str, str] | None,
        subprotocols: Sequence[str] | None,
        end_timeout: float,
    ) -> None:
        self._client = client
        self._path = path
        self._headers = dict(headers or {})
        self._subprotocols = list(subprotocols or ())
        self.end_timeout = end_timeout
        """Seconds an ending waits for the app to end."""
        self.manager = client.manager
        """The manager whose session this is."""
        self._to_app_tx, self._to_app_rx = anyio.create_memory_object_stream[Message](math.inf)
        self._to_client_tx, self._to_client_rx = anyio.create_memory_object_stream[Message](
            math.inf
        )
        self._session: Session | None = None
        self._accepted = False
        self._app_closed = False  # the app sent its close frame or a denial
        self._left = False  # the client is gone: further sends raise ClientDisconnected
        self._done = anyio.Event()
        self.raised: BaseException | None = None
        """What the app raised, if it did (re-raised when the ``async with`` block ends)."""
        self.close_frame: tuple[int, str] | None = None
        """``(code, reason)`` of the close frame the server sent, once received."""
        self.accepted_subprotocol: str | None = None

    # -- the server side --------------------------------------------------------------------

    def _scope(self, marker: str) -> dict[str, Any]:
        url = urlsplit(self._path)
        headers = [(b"host", b"testserver")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        headers.append((MARKER_HEADER.encode(), marker.encode()))
        if self._subprotocols:
            headers.append((b"sec-websocket-protocol", ", ".join(self._subprotocols).encode()))
        return {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": url.path,
            "raw_path": url.path.encode(),
            "root_path": "",
            "query_string": url.query.encode(),
            "headers": headers,
            "client": ("testclient", 50000),
            "server": ("testserver", 80),
            "subprotocols": self._subprotocols,
            "state": dict(self._client.state),
            "extensions": {"websocket.http.response": {}},
        }

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self._client.app(scope, self._to_app_rx.receive, self._app_send)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # the test sees it when the block ends
            self.raised = exc
        finally:
            if not self._app_closed:
                # As uvicorn: a handshake never answered gets 500/403, an open one a close.
                if not self._accepted:
                    status = 500 if self.raised is not None else 403
                    self._to_client_tx.send_nowait(
                        {"type": "websocket.http.response.start", "status": status}
                    )
                    self._to_client_tx.send_nowait(
                        {"type": "websocket.http.response.body", "body": b""}
                    )
                else:
                    code = 1011 if self.raised is not None else 1000
                    self._to_client_tx.send_nowait(
                        {"type": "websocket.close", "code": code, "reason": ""}
                    )
            self._to_client_tx.close()
            self._to_app_tx.close()
            self._to_app_rx.close()
            self._done.set()

    async def _app_send(self, message: Message) -> None:
        kind = message["type"]
        if self._app_closed:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' after sending 'websocket.close'")
        if self._left:
            raise ClientDisconnected("client disconnected")
        if kind == "websocket.accept":
            self._accepted = True
            self.accepted_subprotocol = message.get("subprotocol")
        elif kind == "websocket.close" or (
            kind == "websocket.http.response.body" and not message.get("more_body", False)
        ):
            self._app_closed = True
        await self._to_client_tx.send(dict(message))
        if kind == "websocket.close" and self._accepted:
            # A client answers a close frame with its own; the server then tells the app.
            self._left = True
            code = message.get("code", 1000)
            await self._to_app_tx.send({"type": "websocket.disconnect", "code": code})

    # -- opening --------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncConnection:
        with capture_session(self.manager) as (marker, found):
            self._to_app_tx.send_nowait({"type": "websocket.connect"})
            self._client._task_group.start_soon(self._run, self._scope(marker))
            first = await self.receive()
            if first["type"] != "websocket.accept":
                await self._refused(first)
        self._session = found[0] if found else None
        return self

    async def _refused(self, first: Message) -> None:
        with anyio.fail_after(self.end_timeout):
            await self._done.wait()
        if self.raised is not None:
            self._to_client_rx.close()
            raise self.raised
        if first["type"] == "websocket.close":
            self._to_client_rx.close()
            raise WebSocketDisconnect(first.get("code", 1000), first.get("reason") or "")
        headers = {k.decode().lower(): v.decode() for k, v in first.get("headers", [])}
        body = b""
        with self._to_client_rx:
            async for message in self._to_client_rx:
                body += message.get("body", b"")
        raise HandshakeDenied(first.get("status", 500), headers, body)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._left:
                await self._leave(1000, "")
            else:
                await self._wait_ended()
        finally:
            self._to_client_rx.close()
        if self.raised is not None and exc is None:
            raise self.raised

    # -- the two sides --------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The server-side :class:`~wsession.Session` (readable after it ended).

        Raises:
            WSessionError: the handshake was refused before its connect hooks completed.
        """
        if self._session is None:
            raise WSessionError(f"no session: the handshake to {self._path} was refused")
        return self._session

    async def send_text(self, data: str) -> None:
        """The client sends a text frame."""
        await self._to_app_tx.send({"type": "websocket.receive", "text": data})

    async def send_bytes(self, data: bytes) -> None:
        """The client sends a binary frame."""
        await self._to_app_tx.send({"type": "websocket.receive", "bytes": data})

    async def send_json(self, data: Any) -> None:
        """The client sends ``data`` as JSON in a text frame."""
        await self.send_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False))

    async def receive(self, timeout: float = 5.0) -> Message:
        """The next ASGI message the app sent.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
            WebSocketDisconnect: the app ended and nothing is left to read (code 1006).
        """
        with anyio.fail_after(timeout):
            try:
                message = await self._to_client_rx.receive()
            except anyio.EndOfStream:
                raise WebSocketDisconnect(1006, "the app ended") from self.raised
        if message["type"] == "websocket.close":
            self.close_frame = (message.get("code", 1000), message.get("reason") or "")
        return message

    async def _receive_data(self, timeout: float) -> Message:
        message = await self.receive(timeout)
        if message["type"] == "websocket.close":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason") or "")
        return message

    async def receive_text(self, timeout: float = 5.0) -> str:
        """The next text frame (``WebSocketDisconnect`` if a close frame came instead)."""
        return str((await self._receive_data(timeout))["text"])

    async def receive_bytes(self, timeout: float = 5.0) -> bytes:
        """The next binary frame (``WebSocketDisconnect`` if a close frame came instead)."""
        return bytes((await self._receive_data(timeout))["bytes"])

    async def receive_json(self, timeout: float = 5.0) -> Any:
        """The next text frame as JSON (``WebSocketDisconnect`` if a close came instead)."""
        return json.loads((await self._receive_data(timeout))["text"])

    async def receive_close(self, timeout: float = 5.0) -> tuple[int, str]:
        """The server's close frame as ``(code, reason)``.

        Raises:
            AssertionError: the next message was not a close frame.
        """
        message = await self.receive(timeout)
        if message["type"] != "websocket.close" or self.close_frame is None:
            raise AssertionError(f"expected a close frame, received {message!r}")
        return self.close_frame

    # -- endings --------------------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """The client closes cleanly (``client closed``); returns once the app ended.

        Raises:
            TimeoutError: the app did not end within :attr:`end_timeout`.
        """
        await self._leave(code, reason)

    async def drop(self) -> None:
        """The connection drops without a close frame: the app is told 1005 and its later
        sends raise :class:`ClientDisconnected` (``connection lost``); returns once it ended.

        Raises:
            TimeoutError: as :meth:`close`.
        """
        await self._leave(LOST, "")

    async def server_shutdown(self) -> None:
        """The server shuts down: the app is told 1012 (``server shutdown``); returns once
        it ended.

        Raises:
            TimeoutError: as :meth:`close`.
        """
        await self._leave(SHUTDOWN, "")

    async def _leave(self, code: int, reason: str) -> None:
        if self._left:
            raise WSessionError("the client already left this connection")
        self._left = True
        if not self._done.is_set():
            await self._to_app_tx.send(
                {"type": "websocket.disconnect", "code": code, "reason": reason}
            )
        await self._wait_ended()

    async def _wait_ended(self) -> None:
        try:
            with anyio.fail_after(self.end_timeout):
                await self._done.wait()
        except TimeoutError:
            raise TimeoutError(
                f"the app did not end within {self.end_timeout}s after the client left (an app "
                "that never calls receive() is not told; see detect_disconnect)"
            ) from None


class AsyncSessionClient:
    """Runs an ASGI app in the test's event loop (its lifespan included) and opens
    :class:`AsyncConnection` objects to it::

        async with AsyncSessionClient(app) as client:
            async with client.connect("/ws") as conn:
                assert (await conn.receive_json())["id"] == conn.session.id
                await conn.drop()

    Args:
        app: the ASGI app.
        manager: its :class:`~wsession.SessionManager` (found in the app when omitted).
        lifespan: run the app's lifespan (startup on enter, shutdown on exit). An app that
            does not support lifespan is run without it.

    Raises:
        WSessionError: ``manager`` omitted and the app has none or several.
    """

    def __init__(self, app: Any, *, manager: SessionManager | None = None, lifespan: bool = True):
        self.app = app
        self.manager = manager if manager is not None else find_manager(app)
        self.state: dict[str, Any] = {}
        """The lifespan state (copied into each connection's scope)."""
        self._lifespan = lifespan
        self._task_group: anyio.abc.TaskGroup
        self._started = anyio.Event()
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self._lifespan_error: str | None = None
        self._connections: list[AsyncConnection] = []

    def connect(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        subprotocols: Sequence[str] | None = None,
        end_timeout: float = 5.0,
    ) -> AsyncConnection:
        """A connection to ``path``, made on entering ``async with`` (refusals raise there:
        :class:`HandshakeDenied`, or ``WebSocketDisconnect`` for a close before accept)."""
        conn = AsyncConnection(self, path, headers, subprotocols, end_timeout)
        self._connections.append(conn)
        return conn

    async def __aenter__(self) -> AsyncSessionClient:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        if self._lifespan:
            self._task_group.start_soon(self._run_lifespan)
            with anyio.fail_after(10):
                await self._started.wait()
            if self._lifespan_error is not None:
                await self.__aexit__(None, None, None)
                raise RuntimeError(f"lifespan startup failed: {self._lifespan_error}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._lifespan and not self._stopped.is_set():
                self._stop.set()
                with anyio.fail_after(30):
                    await self._stopped.wait()
            self._task_group.cancel_scope.cancel()  # connections the test left open
        finally:
            try:
                await self._task_group.__aexit__(exc_type, exc, tb)
            finally:
                for conn in self._connections:
                    conn._to_client_rx.close()

    async def _run_lifespan(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        startup_sent = False

        async def receive() -> Message:
            nonlocal startup_sent
            if not startup_sent:
                startup_sent = True
                return {"type": "lifespan.startup"}
            await self._stop.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind.endswith(".failed"):
                self._lifespan_error = message.get("message", "")
            if kind.startswith("lifespan.startup"):
                self._started.set()
            elif kind.startswith("lifespan.shutdown"):
                self._stopped.set()

        try:
            await self.app(scope, receive, send)
        except Exception:
            if startup_sent and self._started.is_set() and self._lifespan_error is None:
                raise
            # As uvicorn's lifespan "auto": an app without lifespan support runs without it.
        finally:
            self._started.set()
            self._stopped.set()
