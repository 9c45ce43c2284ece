"""The per-connection Session object and the enums that describe its life."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import Headers, QueryParams

from ._exceptions import SessionClosed
from ._types import Message, Scope

# The middleware's send wrapper: an ``async def``, so delivery can step its coroutine.
SessionSend = Callable[[Message], Coroutine[Any, Any, None]]


class SessionState(StrEnum):
    """Where a session is in its life.

    ``connecting``: connect hooks done, the app has not accepted yet. ``open``: accepted.
    ``closing``: a close was sent or received, the app is still running. ``closed``: ended;
    disconnect hooks are running or have run.
    """

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class EndReason(StrEnum):
    """Why a session ended; given to disconnect hooks as ``session.end_reason``.

    The first cause observed wins: a client close followed by the app returning is
    ``client closed``.
    """

    CLIENT_CLOSED = "client closed"
    """The client sent a close frame (its code is ``session.close_code``)."""
    CONNECTION_LOST = "connection lost"
    """The transport dropped without a close status (code 1005/1006), or a send found it gone."""
    APP_CLOSED = "app closed"
    """The app sent ``websocket.close`` (or a denial response)."""
    APP_RETURNED = "app returned"
    """The app returned without closing; the server closes the connection."""
    APP_RAISED = "app raised"
    """The app raised; the exception is re-raised to the server unchanged."""
    CANCELLED = "cancelled"
    """The connection's task was cancelled (typically a server shutdown timeout)."""
    SERVER_SHUTDOWN = "server shutdown"
    """The server told the app it is restarting (code 1012), or wsession drained it on shutdown."""
    SERVER_CLOSED = "server closed"
    """wsession closed it on request (kick, limits, idle timeout, drain)."""
    REFUSED = "refused"
    """Refused after the connect hooks completed (the per-user limit, checked once hooks set
    ``user_key``): the app never ran, the session was never registered."""
    NODE_LOST = "node lost"
    """The worker that owned the session died (cluster registries only)."""


_LOST_CODES = frozenset({1005, 1006})
NO_GROUPS: frozenset[str] = frozenset()
_SERVER_RESTART = 1012


def _now() -> datetime:
    return datetime.now(UTC)


class Session:
    """One WebSocket connection, from handshake to close.

    Created by :class:`~wsession.WSessionMiddleware` before the app runs; app code reaches it
    through :func:`~wsession.get_session`, :data:`~wsession.current_session` or
    ``scope["wsession"]``. Attributes are read-only for app code, except ``data``, which is
    yours (a pydantic model when the manager has a ``data_model``, else a ``dict``).

    Attributes:
        id: the connection id (URL-safe, 128 random bits, never reused).
        connected_at: when the handshake arrived (UTC).
        client: ``(host, port)`` of the peer as the server reports it, or ``None``.
        path: the request path.
        subprotocol: the subprotocol the app accepted with, once open.
        state: a :class:`SessionState`.
        close_code, close_reason: once known.
        end_reason: an :class:`EndReason` once the session ended.
        user_key: optional key grouping one user's connections (set it in a connect hook).
        node: the id of the worker that owns the session (``None`` for a local registry).
    """

    __slots__ = (
        "__weakref__",
        "_backlog",
        "_drainer",
        "_force_end",
        "_forced",
        "_idle_timer",
        "_ip",
        "_last_activity",
        "_query_string",
        "_raw_headers",
        "_raw_send",
        "_room",
        "_send",
        "_subprotocols",
        "_task",
        "client",
        "close_code",
        "close_reason",
        "connected_at",
        "data",
        "end_reason",
        "groups",
        "id",
        "node",
        "path",
        "state",
        "subprotocol",
        "user_key",
    )

    def __init__(self, session_id: str, scope: Scope, send: SessionSend | None, data: Any) -> None:
        self.id = session_id
        self.connected_at = _now()
        client = scope.get("client")
        self.client: tuple[str, int] | None = (client[0], client[1]) if client else None
        self.path: str = scope.get("path", "")
        self.subprotocol: str | None = None
        self.state = SessionState.CONNECTING
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.end_reason: EndReason | None = None
        self.user_key: str | None = None
        self.node: str | None = None
        self.groups: set[str] | frozenset[str] = NO_GROUPS  # a set once it joins one
        self.data: Any = data
        # What the read-only views need, not the scope itself: the scope holds the session
        # (scope["wsession"]), and a cycle would keep both until the garbage collector ran.
        self._raw_headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        self._query_string: bytes = scope.get("query_string", b"")
        self._subprotocols: tuple[str, ...] = tuple(scope.get("subprotocols", ()))
        self._send = send
        self._raw_send: SessionSend | None = None  # the server's send, for out-of-band frames
        # Out-of-band delivery state (see _delivery.py); None until first needed.
        self._backlog: deque[Message] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None
        self._task: asyncio.Task[Any] | None = None
        self._force_end: asyncio.TimerHandle | None = None
        self._forced = False
        # Admission and liveness bookkeeping (see _admission.py and _connection.py).
        self._ip: str | None = None
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- read-only views of the handshake ------------------------------------------------

    @property
    def headers(self) -> Headers:
        """The handshake's request headers (an immutable, case-insensitive mapping)."""
        return Headers(raw=self._raw_headers)

    @property
    def query_params(self) -> QueryParams:
        """The handshake's query parameters (an immutable multi-dict)."""
        return QueryParams(self._query_string)

    @property
    def requested_subprotocols(self) -> tuple[str, ...]:
        """The subprotocols the client offered, in its order."""
        return self._subprotocols

    @property
    def is_closed(self) -> bool:
        """True once the session has ended (disconnect hooks are running or have run)."""
        return self.state is SessionState.CLOSED

    # -- sending ---------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send a text frame. Raises :class:`~wsession.SessionClosed` if the session is not open."""
        await self.send_message({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame. Raises :class:`~wsession.SessionClosed` if not open."""
        await self.send_message({"type": "websocket.send", "bytes": data})

    async def send_json(self, obj: Any) -> None:
        """Send ``obj`` as JSON text (pydantic models are serialised with ``model_dump_json``).

        Raises :class:`~wsession.SessionClosed` if the session is not open.
        """
        await self.send_text(encode_json(obj))

    async def send_message(self, message: Message) -> None:
        """Send a raw ASGI ``websocket.*`` message on this connection.

        Raises:
            SessionClosed: the session is not open, or the client left while sending.
        """
        if self.state is not SessionState.OPEN or self._send is None:
            raise SessionClosed(self.id, self.state.value)
        try:
            await self._send(message)
        except (OSError, RuntimeError) as exc:
            # The server's own errors (ClientDisconnected, "send after close") become ours.
            raise SessionClosed(self.id, "gone") from exc

    # -- bookkeeping used by the middleware -------------------------------------------------

    def _end(self, reason: EndReason, code: int | None, close_reason: str | None) -> None:
        """Record the first cause of the ending; later ones are ignored."""
        if self.end_reason is None:
            self.end_reason = reason
            self.close_code = code
            self.close_reason = close_reason
            if self.state is not SessionState.CLOSED:
                self.state = SessionState.CLOSING

    def _client_disconnected(self, message: Message) -> None:
        code = message.get("code", 1005)
        if code in _LOST_CODES:
            reason = EndReason.CONNECTION_LOST
        elif code == _SERVER_RESTART:
            # uvicorn delivers 1012 to apps that read when it shuts down.
            reason = EndReason.SERVER_SHUTDOWN
        else:
            reason = EndReason.CLIENT_CLOSED
        # int() keeps our record plain even when a server hands us an IntEnum; the message
        # itself is passed to the app untouched.
        self._end(reason, int(code), message.get("reason") or None)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.state.value} {self.path!r}>"


def encode_json(obj: Any) -> str:
    """Serialise ``obj`` for a text frame: pydantic models via ``model_dump_json``."""
    if isinstance(obj, BaseModel):
        return obj.model_dump_json()
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
