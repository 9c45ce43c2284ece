"""The exceptions wsession raises, under one root.

Each class is one decision, documented where it is defined (the Channels habit).
"""

from __future__ import annotations

from collections.abc import Mapping

# Close codes an endpoint may send (RFC 6455 7.4; 1004-1006 and 1015 are reserved).
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class WSessionError(Exception):
    """Root of every exception wsession raises on purpose."""


class ConfigurationError(WSessionError, ValueError):
    """A setting given to wsession is invalid.

    Raised at construction time (never at the first connection). The message names the setting.
    """


class Refuse(WSessionError):
    """Raise from a connect hook to refuse the connection before the app sees it.

    Give an HTTP ``status`` to answer the handshake with a denial response (when the server
    offers the ``websocket.http.response`` extension; otherwise the handshake is rejected with a
    close, which servers turn into HTTP 403). Give a close ``code`` (and ``reason``) instead to
    accept the handshake and close at once, so browser clients can read why.

    Args:
        status: HTTP status of the denial response (for example 401, 403, 429, 503).
        code: WebSocket close code, used when no ``status`` is given or the server cannot send
            a denial response. Defaults to 1008 (policy violation).
        reason: close reason (or denial body when ``body`` is not given).
        headers: extra response headers for the denial response.
        body: denial response body; defaults to ``reason`` or the status phrase.
        label: why, for counters and metrics (``stats.refused_by``); default ``"refused"``.
    """

    def __init__(
        self,
        status: int | None = None,
        *,
        code: int | None = None,
        reason: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        label: str = "refused",
    ) -> None:
        if status is None and code is None:
            code = 1008
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"Refuse: status must be an HTTP status (100-599), got {status!r}")
        if code is not None and not (code in _SENDABLE_CODES or 3000 <= code <= 4999):
            raise ValueError(f"Refuse: code must be a valid WebSocket close code, got {code!r}")
        super().__init__(reason or (f"HTTP {status}" if status is not None else f"close {code}"))
        self.status = status
        self.code = code
        self.reason = reason
        self.headers = dict(headers or {})
        self.body = body
        self.label = label


class LimitExceeded(WSessionError, ValueError):
    """A request would exceed a configured cap, so it was not carried out.

    Raised by :meth:`~wsession.SessionManager.join` past ``max_group_name_length`` or
    ``max_groups_per_session``, and by presence (:class:`~wsession.Presence`) past
    ``max_presence_meta_bytes``, ``max_presence_topics_per_session`` or
    ``max_presence_members_per_topic``; the message names the setting. Also a ``ValueError``,
    so code that validated its input with ``except ValueError`` keeps working.
    """


class SessionClosed(WSessionError, OSError):
    """The session has ended (or is ending), so nothing can be sent on it.

    An ``OSError``, like a server's "client disconnected" error: when wsession has closed a
    session (kick, idle, slow consumer, drain), the app's own ``send`` raises it, and Starlette
    turns it into ``WebSocketDisconnect`` as for a client that left.

    Attributes:
        session_id: the connection id of the closed session.
    """

    def __init__(self, session_id: str, state: str) -> None:
        super().__init__(f"session {session_id} is {state}: cannot send")
        self.session_id = session_id


class SessionNotAvailable(WSessionError, LookupError):
    """No session is bound to this scope or context (the middleware is not mounted here,
    or the code runs outside a WebSocket connection)."""


class RegistryUnavailable(WSessionError):
    """A cluster registry cannot reach its store (Redis is down or not entered yet).

    Raised by cluster-wide operations (``get`` of a remote id, ``count``, ``sessions``,
    ``members``, ``user_sessions``, remote sends and kicks). Local sessions keep working.
    """


class InvalidMessage(WSessionError, ValueError):
    """Data that cannot be sent as a WebSocket message, refused before anything was sent.

    Raised for JSON that browsers cannot parse (``NaN``, ``Infinity``), text that is not valid
    UTF-8 (lone surrogates such as ``"\\ud800"``), and objects JSON cannot represent.
    """


class SessionStateError(WSessionError, RuntimeError):
    """An operation is not allowed in the session's current state (for example changing
    ``user_key`` once the session is registered)."""
