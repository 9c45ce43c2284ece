"""Connections through Starlette's TestClient that know their server-side Session."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from .._exceptions import WSessionError
from .._manager import SessionManager
from .._session import Session
from ._capture import MARKER_HEADER, capture_session, wait_gone
from ._discover import find_manager

LOST = 1005
"""The disconnect code uvicorn reports when the TCP connection drops without a close frame."""
SHUTDOWN = 1012
"""The disconnect code uvicorn gives apps when the server shuts down (restart)."""


class Connection:
    """One WebSocket connection opened by :func:`connect`: the client side (``send_*``,
    ``receive_*``) and the server side (:attr:`session`), with the ways a client can leave.

    Use it as a context manager. Leaving the block without ending the connection closes it
    the way a well-behaved client does (close frame, code 1000); every ending waits until the
    server-side session ended (the app returned and its disconnect hooks ran), so a test can
    assert on the hooks right after.

    Like a real client, when the app (or wsession) sends a close frame the connection answers
    it, and the app's next ``receive`` reports the disconnect with that code.
    """

    def __init__(
        self,
        client: TestClient,
        path: str,
        manager: SessionManager,
        headers: dict[str, str] | None,
        subprotocols: Sequence[str] | None,
        end_timeout: float,
    ) -> None:
        self._client = client
        self._path = path
        self.manager = manager
        """The manager whose session this is."""
        self._headers = dict(headers or {})
        self._subprotocols = list(subprotocols) if subprotocols else None
        self.end_timeout = end_timeout
        """Seconds an ending waits for the server-side session to end."""
        self._ws: WebSocketTestSession | None = None
        self._session: Session | None = None
        self._left = False  # the client left (close, drop, shutdown), or answered a close
        self.close_frame: tuple[int, str] | None = None
        """``(code, reason)`` of the close frame the server sent, once received."""

    # -- opening --------------------------------------------------------------------------------

    def __enter__(self) -> Connection:
        with capture_session(self.manager) as (marker, found):
            headers = {**self._headers, MARKER_HEADER: marker}
            ws = self._client.websocket_connect(
                self._path, subprotocols=self._subprotocols, headers=headers
            )
            self._ws = ws.__enter__()  # raises WebSocketDenialResponse / WebSocketDisconnect
        self._session = found[0] if found else None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ws = self.ws
        try:
            if not self._left:
                self._leave(1000, "")
            else:
                self._wait_ended()
        finally:
            ws.__exit__(exc_type, exc, tb)  # re-raises what the app raised, as TestClient does

    # -- the two sides --------------------------------------------------------------------------

    @property
    def ws(self) -> WebSocketTestSession:
        """Starlette's ``WebSocketTestSession`` underneath (for anything not wrapped here)."""
        if self._ws is None:
            raise WSessionError("the connection is not open: use `with connect(...) as conn:`")
        return self._ws

    @property
    def session(self) -> Session:
        """The server-side :class:`~wsession.Session` (still readable after it ended:
        ``end_reason``, ``close_code``...).

        Raises:
            WSessionError: the connection was refused before its connect hooks completed.
        """
        if self._session is None:
            raise WSessionError(f"no session: the handshake to {self._path} was refused")
        return self._session

    @property
    def accepted_subprotocol(self) -> str | None:
        """The subprotocol the app accepted, if any."""
        return self.ws.accepted_subprotocol

    # -- messages -------------------------------------------------------------------------------

    def send_text(self, data: str) -> None:
        """The client sends a text frame."""
        self.ws.send_text(data)

    def send_bytes(self, data: bytes) -> None:
        """The client sends a binary frame."""
        self.ws.send_bytes(data)

    def send_json(self, data: Any) -> None:
        """The client sends ``data`` as JSON in a text frame."""
        self.ws.send_json(data)

    def receive(self) -> dict[str, Any]:
        """The next ASGI message the app sent (blocks until there is one). A close frame is
        answered, as a client does."""
        message = dict(self.ws.receive())
        if message["type"] == "websocket.close":
            code, reason = message.get("code", 1000), message.get("reason") or ""
            self.close_frame = (code, reason)
            if not self._left:
                self._left = True
                self.ws.send({"type": "websocket.disconnect", "code": code, "reason": reason})
        return message

    def _receive_data(self) -> dict[str, Any]:
        message = self.receive()
        if message["type"] == "websocket.close":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason") or "")
        return message

    def receive_text(self) -> str:
        """The next text frame.

        Raises:
            WebSocketDisconnect: the server sent a close frame instead.
        """
        return str(self._receive_data()["text"])

    def receive_bytes(self) -> bytes:
        """The next binary frame.

        Raises:
            WebSocketDisconnect: the server sent a close frame instead.
        """
        return bytes(self._receive_data()["bytes"])

    def receive_json(self) -> Any:
        """The next text frame, decoded as JSON.

        Raises:
            WebSocketDisconnect: the server sent a close frame instead.
        """
        import json

        return json.loads(self._receive_data()["text"])

    def receive_close(self) -> tuple[int, str]:
        """The server's close frame as ``(code, reason)``.

        Raises:
            AssertionError: the next message was not a close frame.
        """
        message = self.receive()
        if message["type"] != "websocket.close":
            raise AssertionError(f"expected a close frame, received {message!r}")
        assert self.close_frame is not None
        return self.close_frame

    # -- endings --------------------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "") -> None:
        """The client closes cleanly with ``code`` (end reason ``client closed``); returns once
        the session ended.

        Raises:
            TimeoutError: the session did not end within :attr:`end_timeout` (an app that
                never reads is not told: see ``detect_disconnect``).
        """
        self._leave(code, reason)

    def drop(self) -> None:
        """The TCP connection drops without a close frame: the app is told code 1005, as
        uvicorn does (end reason ``connection lost``); returns once the session ended.

        Raises:
            TimeoutError: as :meth:`close`.
        """
        self._leave(LOST, "")

    def server_shutdown(self) -> None:
        """The server shuts down: the app is told code 1012, as uvicorn does (end reason
        ``server shutdown``); returns once the session ended.

        Raises:
            TimeoutError: as :meth:`close`.
        """
        self._leave(SHUTDOWN, "")

    def _leave(self, code: int, reason: str) -> None:
        if self._left:
            raise WSessionError("the client already left this connection")
        self._left = True
        self.ws.send({"type": "websocket.disconnect", "code": code, "reason": reason})
        self._wait_ended()

    def _wait_ended(self) -> None:
        if self._session is None:
            return
        if not wait_gone(self.manager, self._session, self.end_timeout):
            raise TimeoutError(
                f"session {self._session.id} did not end within {self.end_timeout}s after the "
                "client left (an app that never calls receive() is not told; see "
                "detect_disconnect)"
            )


def connect(
    client: TestClient,
    path: str,
    *,
    manager: SessionManager | None = None,
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] | None = None,
    end_timeout: float = 5.0,
) -> Connection:
    """Open a WebSocket connection to ``client``'s app and know its server-side session::

        with TestClient(app) as client, connect(client, "/ws") as conn:
            conn.send_text("hi")
            assert conn.session.user_key == "user-42"
            conn.drop()

    The handshake is made on entering the ``with`` block (refusals raise there, as with
    ``TestClient.websocket_connect``: ``WebSocketDenialResponse`` for a denial response).

    Args:
        client: a Starlette ``TestClient`` (enter it with ``with`` to run the app's lifespan).
        path: the path and query string (``"/ws?token=t"``).
        manager: the app's :class:`~wsession.SessionManager` (found in the app when omitted).
        headers: extra handshake headers.
        subprotocols: subprotocols the client offers.
        end_timeout: seconds an ending waits for the server-side session to end.

    Raises:
        WSessionError: ``manager`` omitted and the app has none or several.
    """
    return Connection(
        client,
        path,
        manager if manager is not None else find_manager(client.app),
        headers,
        subprotocols,
        end_timeout,
    )


class SessionClient(TestClient):
    """Starlette's ``TestClient`` with :meth:`connect` (a :class:`Connection` that knows its
    session) and :attr:`manager`.

    Args:
        app: the ASGI app.
        manager: its :class:`~wsession.SessionManager` (found in the app when omitted).
        **kwargs: passed to ``TestClient``.
    """

    def __init__(self, app: Any, *, manager: SessionManager | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._manager = manager

    @property
    def manager(self) -> SessionManager:
        """The app's session manager.

        Raises:
            WSessionError: none was given and the app has none or several.
        """
        if self._manager is None:
            self._manager = find_manager(self.app)
        return self._manager

    def connect(
        self,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        subprotocols: Sequence[str] | None = None,
        end_timeout: float = 5.0,
    ) -> Connection:
        """:func:`connect` on this client (see there)."""
        return connect(
            self,
            path,
            manager=self.manager,
            headers=headers,
            subprotocols=subprotocols,
            end_timeout=end_timeout,
        )
