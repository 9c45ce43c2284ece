"""The per-connection Session object and the enums that describe its life."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from enum import StrEnum
from time import time
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, QueryParams

from . import _timers
from ._exceptions import SessionClosed, SessionStateError
from ._json import check_text, encode_json
from ._types import Message, Receive, Scope

if TYPE_CHECKING:
    from ._outbound import Outbound
    from ._resume import Journal
    from ._timers import Timer


class SessionState(StrEnum):
    """Where a session is in its life.

    ``connecting``: connect hooks done, the app has not accepted yet. ``open``: accepted.
    ``closing``: a close was sent or received, the app is still running. ``detached``: its
    connection was lost and it waits ``resume_window`` seconds for its client to resume it
    (messages sent to it are kept for the replay). ``closed``: ended; disconnect hooks are
    running or have run.
    """

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    DETACHED = "detached"
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
    RESUME_EXPIRED = "resume window expired"
    """It was detached and its client did not resume it within ``resume_window``."""
    REPLAY_LOST = "replay lost"
    """It was detached and can no longer be resumed in full: its replay buffer overflowed, or
    its client came back from a point the buffer no longer holds (the client got a new
    session)."""


# Members read on every connection, bound once: ``SessionState.OPEN`` goes through the enum
# class's attribute lookup (about 60 ns on 3.11, against 5 ns for a global).
_CONNECTING = SessionState.CONNECTING
_OPEN = SessionState.OPEN
_CLOSING = SessionState.CLOSING
_CLOSED = SessionState.CLOSED
_CLIENT_CLOSED = EndReason.CLIENT_CLOSED
_CONNECTION_LOST = EndReason.CONNECTION_LOST
_SERVER_SHUTDOWN = EndReason.SERVER_SHUTDOWN
_APP_CLOSED = EndReason.APP_CLOSED
_LOST_CODES = frozenset({1005, 1006})
RESUMABLE_ENDINGS = frozenset(
    {EndReason.CONNECTION_LOST, EndReason.SERVER_SHUTDOWN, EndReason.CANCELLED}
)
"""How a connection ended when, with ``resume_window``, its session waits for its client
instead of ending (wsession's idle close is one too: ``Session._may_detach``)."""
NO_GROUPS: frozenset[str] = frozenset()
_SERVER_RESTART = 1012


def check_expiry(at: datetime) -> datetime:
    """``at`` in UTC. Raises ``TypeError`` for a non-datetime, ``ValueError`` for a naive one
    (whose zone nobody knows)."""
    if not isinstance(at, datetime):
        raise TypeError(f"expires_at must be a datetime, got {type(at).__name__}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("expires_at must be timezone-aware (datetime.now(UTC) + ..., not naive)")
    return at.astimezone(UTC)


class Expiry:
    """When a session's credentials expire, and the timer that closes it then (armed and
    re-armed by ``_expiry.py``). Created only when a session gets an ``expires_at``: sessions
    without one pay one empty slot."""

    __slots__ = ("at", "timer")

    def __init__(self, at: datetime) -> None:
        self.at = at
        self.timer: Timer | None = None

    def set_timer(self, timer: Timer | None) -> None:
        """Replace the timer, cancelling the previous one."""
        self.cancel()
        self.timer = timer

    def cancel(self) -> None:
        """Cancel the timer. A cancelled asyncio handle drops its arguments (the session), so
        nothing is left that would keep a closed session alive."""
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()


class Session:
    """One WebSocket connection, from handshake to close.

    Created by :class:`~wsession.WSessionMiddleware` before the app runs; app code reaches it
    through :func:`~wsession.get_session`, :data:`~wsession.current_session` or
    ``scope["wsession"]``. Attributes are read-only for app code, except ``data``, which is
    yours (a pydantic model when the manager has a ``data_model``, else a ``dict``).

    Attributes:
        id: the connection id (URL-safe, 132 random bits, never reused).
        connected_at: when the handshake arrived (UTC).
        client: ``(host, port)`` of the peer as the server reports it, or ``None``.
        path: the request path.
        subprotocol: the subprotocol the app accepted with, once open.
        state: a :class:`SessionState`.
        close_code, close_reason: once known.
        end_reason: an :class:`EndReason` once the session ended.
        user_key: optional key grouping one user's connections. Set it in a connect hook; once
            the session is registered it cannot change (limits and indexes count it), and
            assigning raises :class:`~wsession.SessionStateError`.
        expires_at: when the credential that admitted the session expires (UTC), or ``None``
            (never). Set it in a connect hook; the session is closed with ``expiry_code``
            ``expiry_grace`` seconds after it unless :meth:`SessionManager.refresh
            <wsession.SessionManager.refresh>` moved it first.
        node: the id of the worker that owns the session (``None`` for a local registry).
        groups: the names of the groups the session is in (change them through
            ``manager.join``/``manager.leave``; left automatically when the session ends).
        data: the app's per-session data (see above).
        resumed: True when this connection resumed a detached session (``resume_window``):
            same id, data, groups and user key; the messages its client missed are written
            right after the app's first frame (its welcome).
    """

    __slots__ = (
        "__weakref__",
        "_connected_at",
        "_expiry",
        "_first",
        "_force_end",
        "_forced",
        "_idle_timer",
        "_last_activity",
        "_may_detach",
        "_outbound",
        "_receive",
        "_registered",
        "_resume",
        "_scope",
        "_task",
        "_user_key",
        "close_code",
        "close_reason",
        "data",
        "end_reason",
        "groups",
        "id",
        "node",
        "resumed",
        "state",
        "subprotocol",
    )

    def __init__(self, session_id: str, scope: Scope, outbound: Outbound | None, data: Any) -> None:
        self.id = session_id
        self._connected_at = time()  # seconds since the epoch; connected_at makes the datetime
        # The server's scope, read by the handshake views (path, client, headers, ...). Never
        # the copy the app gets: that one holds the session (scope["wsession"]), and a cycle
        # would keep both until the garbage collector ran.
        self._scope = scope
        self.subprotocol: str | None = None
        self.state = _CONNECTING
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.end_reason: EndReason | None = None
        self._user_key: str | None = None
        self._registered = False
        self.node: str | None = None
        self.groups: set[str] | frozenset[str] = NO_GROUPS  # a set once it joins one
        self.data: Any = data
        # The app's receive (see _app_receive): the server's receive and the connect message
        # it already returned, which the app reads first.
        self._receive: Receive | None = None
        self._first: Message | None = None
        # Every frame to the client goes through this (see _outbound.py); None once ended.
        self._outbound = outbound
        self._task: asyncio.Task[Any] | None = None
        self._force_end: Timer | None = None
        self._forced = False
        # Liveness bookkeeping (see _connection.py).
        self._last_activity = 0.0
        self._idle_timer: Timer | None = None
        self._expiry: Expiry | None = None  # see expires_at
        # Resumption (see _resume.py): the journal when resume_window is set.
        self._resume: Journal | None = None
        self._may_detach = False  # wsession closed it in a way its client may resume from
        self.resumed = False

    # -- read-only views of the handshake ------------------------------------------------

    @property
    def connected_at(self) -> datetime:
        """When the handshake arrived (UTC)."""
        return datetime.fromtimestamp(self._connected_at, UTC)

    @connected_at.setter
    def connected_at(self, at: datetime) -> None:
        # A cluster registry rebuilding another worker's session gives it its real start.
        self._connected_at = at.timestamp()

    @property
    def client(self) -> tuple[str, int] | None:
        """``(host, port)`` of the peer as the server reports it, or ``None``."""
        client = self._scope.get("client")
        if not client:
            return None
        return (client[0], client[1])

    @property
    def path(self) -> str:
        """The request path."""
        path: str = self._scope.get("path", "")
        return path

    @property
    def headers(self) -> Headers:
        """The handshake's request headers (an immutable, case-insensitive mapping)."""
        return Headers(raw=self._scope.get("headers", []))

    @property
    def query_params(self) -> QueryParams:
        """The handshake's query parameters (an immutable multi-dict)."""
        return QueryParams(self._scope.get("query_string", b""))

    @property
    def requested_subprotocols(self) -> tuple[str, ...]:
        """The subprotocols the client offered, in its order."""
        return tuple(self._scope.get("subprotocols", ()))

    @property
    def user_key(self) -> str | None:
        """The key grouping one user's connections (see the class docstring)."""
        return self._user_key

    @user_key.setter
    def user_key(self, key: str | None) -> None:
        if self._registered and key != self._user_key:
            raise SessionStateError(
                f"session {self.id}: user_key cannot change once the session is registered "
                "(set it in a connect hook; limits and the user index count it)"
            )
        self._user_key = key

    @property
    def expires_at(self) -> datetime | None:
        """When the session's credential expires (UTC), or ``None`` (see the class docstring).

        Assign it in a connect hook (a timezone-aware ``datetime``; it is stored in UTC). Once
        the session is registered it moves only through ``manager.refresh()``, whose hooks
        validate the new credential; assigning then raises
        :class:`~wsession.SessionStateError`. A naive datetime raises ``ValueError``.
        """
        expiry = self._expiry
        return expiry.at if expiry is not None else None

    @expires_at.setter
    def expires_at(self, at: datetime | None) -> None:
        if self._registered:
            raise SessionStateError(
                f"session {self.id}: expires_at cannot be assigned once the session is "
                "registered (set it in a connect hook; later, manager.refresh() moves it)"
            )
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = None if at is None else Expiry(check_expiry(at))

    def _extend(self, at: datetime) -> Expiry:
        """Move ``expires_at`` (a refresh that passed its hooks); the caller re-arms."""
        expiry = self._expiry
        if expiry is None:
            expiry = self._expiry = Expiry(at)
        else:
            expiry.at = at
        return expiry

    @property
    def backlog(self) -> int:
        """Frames waiting to be written behind the one in progress (0 when the client reads)."""
        out = self._outbound
        return out.backlog if out is not None else 0

    @property
    def backlog_bytes(self) -> int:
        """Payload bytes of the manager frames waiting in the backlog."""
        out = self._outbound
        return out.queued_bytes if out is not None else 0

    @property
    def is_closed(self) -> bool:
        """True once the session has ended (disconnect hooks are running or have run)."""
        return self.state is _CLOSED

    @property
    def seq(self) -> int:
        """The sequence number of the last message wsession numbered for this session (every
        message sent through wsession's APIs, with ``resume_window``; never reset by a resume),
        0 before the first one or without resumption."""
        journal = self._resume
        return journal.seq if journal is not None else 0

    @property
    def pending_replay(self) -> int:
        """On a resumed connection, before the replay: how many missed messages will follow the
        app's first frame (tell the client in the welcome); 0 otherwise. Messages sent to the
        session meanwhile come after them, numbered on."""
        journal = self._resume
        if journal is None or not journal.held:
            return 0
        return journal.seq - journal.client_last

    @property
    def resume_token(self) -> str | None:
        """The token a client presents to resume this session (``resume_window``; ``None``
        without). Give it to the client (in a welcome message); it changes on every resume and
        works once."""
        journal = self._resume
        return journal.token if journal is not None else None

    # -- sending ---------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send a text frame. Raises :class:`~wsession.SessionClosed` if the session is not open,
        :class:`~wsession.InvalidMessage` if ``text`` is not valid UTF-8."""
        await self.send_message({"type": "websocket.send", "text": check_text(text)})

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary frame. Raises :class:`~wsession.SessionClosed` if not open."""
        await self.send_message({"type": "websocket.send", "bytes": data})

    async def send_json(self, obj: Any) -> None:
        """Send ``obj`` as JSON text, encoded as every wsession send encodes JSON (compact,
        UTF-8, pydantic models at any depth).

        Raises :class:`~wsession.SessionClosed` if the session is not open,
        :class:`~wsession.InvalidMessage` for ``NaN``/``Infinity`` or text that is not UTF-8.
        """
        await self.send_text(encode_json(obj))

    async def send_message(self, message: Message) -> None:
        """Send a raw ASGI ``websocket.*`` message on this connection, in order with every other
        frame for it (it waits for its turn behind frames already queued). May be called from
        any task.

        Raises:
            SessionClosed: the session is not open, or the client left while sending.
        """
        out = self._outbound
        journal = self._resume
        if (
            journal is not None
            and journal.durable is not None
            and message.get("type") == "websocket.send"
        ):
            # Numbered and recorded by the durable store first (see ResumeStore), then written.
            state = self.state
            if state is not _OPEN and not (journal.held and state is not _CLOSED):
                raise SessionClosed(self.id, state.value)
            (result,) = await journal.durable.record([self], message)
            if result == "gone":
                raise SessionClosed(self.id, "gone")
            return
        if (
            journal is not None
            and journal.held
            and self.state is not _CLOSED
            and message.get("type") == "websocket.send"
        ):
            journal.stamp(message)  # resuming: written with the replay, in its order
            return
        if self.state is not _OPEN or out is None:
            raise SessionClosed(self.id, self.state.value)
        if journal is not None:
            message = journal.stamp(message)  # kept: a resumed client gets it if it was lost
        try:
            await out.send(message)
        except SessionClosed:
            raise SessionClosed(self.id, "closed") from None
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
            if self.state is not _CLOSED:
                self.state = _CLOSING

    def _end_detached(self, reason: EndReason, code: int | None, close_reason: str | None) -> None:
        """A detached session ends (window over, replay lost, closed): this is the reason its
        disconnect hooks see (with the code and reason of the close, if one closed it)."""
        self.end_reason = reason
        if code is not None:
            self.close_code, self.close_reason = code, close_reason
        self.state = SessionState.CLOSED

    def _reattach(self, scope: Scope) -> None:
        """A new connection resumed this detached session: its handshake (the server's scope)
        is the session's now (resume hooks read it), and it starts again as ``connecting``."""
        self._scope = scope
        self.subprotocol = None
        self.state = _CONNECTING
        self.end_reason = None
        self.close_code = self.close_reason = None
        self._forced = self._may_detach = False
        self._force_end = None
        self.resumed = True

    def _app_sends(self, message: Message) -> None:
        """The app sends a control message (called before it is written)."""
        kind = message["type"]
        if kind == "websocket.close":
            self._end(_APP_CLOSED, int(message.get("code", 1000)), message.get("reason"))
        elif kind == "websocket.http.response.start":
            self._end(_APP_CLOSED, None, f"HTTP {message.get('status')}")

    def _accepted(self, message: Message) -> None:
        """An accept was written: the session is open (unless it is already ending)."""
        if self.state is _CONNECTING:
            self.subprotocol = message.get("subprotocol")
            self.state = _OPEN

    def _connection_lost(self) -> None:
        """A write found the client gone."""
        self._end(_CONNECTION_LOST, 1006, None)

    def _client_disconnected(self, message: Message) -> None:
        code = message.get("code", 1005)
        if code in _LOST_CODES:
            reason = _CONNECTION_LOST
        elif code == _SERVER_RESTART:
            # uvicorn delivers 1012 to apps that read when it shuts down.
            reason = _SERVER_SHUTDOWN
        else:
            reason = _CLIENT_CLOSED
        # int() keeps our record plain even when a server hands us an IntEnum; the message
        # itself is passed to the app untouched.
        self._end(reason, int(code), message.get("reason") or None)

    # -- the app's receive ------------------------------------------------------------------

    def _bind_receive(self, receive: Receive, first: Message, track: bool) -> Receive:
        """The ``receive`` the app gets: it returns ``first`` (the connect message the middleware
        already read), then what ``receive`` returns, and notes a disconnect (and, with
        ``track``, the time of each message, for the idle timeout). A bound method, not a
        closure: one small object and two slots per connection, no function and cells."""
        self._receive = receive
        self._first = first
        return self._app_receive_tracked if track else self._app_receive

    async def _app_receive(self) -> Message:
        # One local, not two: this coroutine waits in every idle connection, and each local
        # is a slot of its frame for as long as it waits.
        if self._first is not None:
            message, self._first = self._first, None
            return message
        message = await self._receive()  # type: ignore[misc]
        if message["type"] == "websocket.disconnect":
            self._client_disconnected(message)
        return message

    async def _app_receive_tracked(self) -> Message:
        message = await self._app_receive()
        if message["type"] == "websocket.receive":  # the client's activity (not the connect)
            self._last_activity = _timers.clock.now()
        return message

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.state.value} {self.path!r}>"
