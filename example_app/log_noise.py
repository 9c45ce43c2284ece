"""Keep refused handshakes out of the error log.

uvicorn 0.54's default WebSocket protocol (``websockets-sansio``, chosen whenever the
``websockets`` package is installed) never marks the handshake complete after a denial
response (``websocket.http.response.*``), so every refused handshake (403 Origin, 429 limit,
503 draining) is followed by ``ERROR: ASGI callable returned without completing handshake.``
after the client got its answer. An unauthenticated client could fill the error log with it.
The ``wsproto`` and legacy ``websockets`` protocols do not log it, and neither does a refusal
by ``websocket.close`` before accept (but that can only say 403). Upstream:
https://github.com/Kludex/uvicorn/pull/3138.

``DenialMarker`` notes, in the connection task's context, that a complete denial response went
out; ``HandshakeNoiseFilter`` drops that one line only for such connections. An app that really
returns without answering a handshake is still reported.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOISE = "ASGI callable returned without completing handshake."

# A one-element list per connection, so a denial sent from any task is seen by the
# connection's own task, where uvicorn logs the line after the app returned.
_denied: ContextVar[list[bool] | None] = ContextVar("example_app_denied", default=None)


class DenialMarker:
    """Pure ASGI middleware: remembers that a WebSocket handshake was answered with a complete
    denial response. Put it outside the middleware that refuses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        denied = [False]
        # Deliberately never reset: uvicorn reads it after this call returned, in this task.
        _denied.set(denied)

        async def marking_send(message: Message) -> None:
            await send(message)
            if message["type"] == "websocket.http.response.body" and not message.get(
                "more_body", False
            ):
                denied[0] = True

        await self.app(scope, receive, marking_send)


class HandshakeNoiseFilter(logging.Filter):
    """Drops uvicorn's "returned without completing handshake" line when the connection was
    answered with a denial response (see the module docstring); passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != NOISE:
            return True
        denied = _denied.get()
        return not (denied and denied[0])


_FILTER = HandshakeNoiseFilter()


def quiet_refused_handshakes() -> None:
    """Install the filter on uvicorn's ``uvicorn.error`` logger (idempotent)."""
    logging.getLogger("uvicorn.error").addFilter(_FILTER)
