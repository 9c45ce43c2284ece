"""A guard in front of the example's demo HTTP API (``/api/...``): same-origin POSTs, JSON
bodies, bounded body size.

The demo API has no authentication (the admin API under ``/admin`` is the authenticated one),
so the least it needs is to refuse what a browser can be tricked into sending: a cross-site
``<form>`` or ``fetch(..., {mode: "no-cors"})`` POST carries a foreign ``Origin`` and a
``text/plain`` or form body, needs no CORS preflight, and would otherwise be obeyed.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an Origin header value or an allow-list entry, lower-cased
    with the scheme's default port filled in; None for ``null`` or anything unparsable."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class ApiGuard:
    """Pure ASGI middleware refusing requests under ``prefix`` that a foreign page could send,
    and bodies over ``max_body`` bytes.

    For every POST under ``prefix``: an ``Origin`` header (browsers send one on every POST)
    must be the request's own origin (when ``"same-origin"`` is in ``allowed_origins``) or
    one of ``allowed_origins``, else 403; requests without one (curl, scripts) pass. A request
    that has a body must say ``Content-Type: application/json``, else 415. Refusals answer
    ``{"error": TEXT}`` and close the connection without reading the body.

    Bodies of every request under ``prefix`` are capped at ``max_body`` bytes: a larger
    ``Content-Length`` is answered 413 before any of the body is read, and a streamed
    (chunked) body is read up to the cap and answered 413 as soon as it passes it. The body
    the app sees was read here, at most ``max_body`` bytes.

    Args:
        app: the ASGI app to guard.
        allowed_origins: ``"same-origin"`` and/or exact origins (``"https://admin.example"``).
        max_body: the largest request body accepted, in bytes.
        prefix: the path prefix guarded.

    Raises:
        ValueError: ``max_body`` is below 1.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: Iterable[str],
        max_body: int,
        prefix: str = "/api/",
    ) -> None:
        if max_body < 1:
            raise ValueError(f"max_body must be at least 1 byte, not {max_body}")
        self.app = app
        self.prefix = prefix
        self.max_body = max_body
        allowed = [o.strip() for o in allowed_origins]
        self.same_origin = "same-origin" in allowed
        self.origins = {parse_origin(o) for o in allowed if o != "same-origin"} - {None}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] == "POST":
            origins = headers.getlist("origin")
            if origins and (len(origins) > 1 or not self._allowed(origins[0], scope, headers)):
                await _refuse(403, "cross-origin requests are refused", scope, receive, send)
                return
        length = headers.get("content-length")
        has_body = (length is not None and length != "0") or "transfer-encoding" in headers
        if not has_body:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                await _refuse(415, "the body must be application/json", scope, receive, send)
                return
        if length is not None and not length.isdigit():
            await _refuse(400, "bad Content-Length", scope, receive, send)
            return
        if length is not None and int(length) > self.max_body:
            await _refuse(413, self._too_large(), scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await _refuse(413, self._too_large(), scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return f"request bodies are limited to {self.max_body} bytes"

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes ``max_body`` (the rest left unread)."""
        chunks: list[bytes] = []
        size = 0
        while True:  # ends at the last chunk, at the cap, or when the client leaves
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # http.disconnect: the app will see it next
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _allowed(self, origin: str, scope: Scope, headers: Headers) -> bool:
        parsed = parse_origin(origin)
        if parsed is None:
            return False  # "null" (sandboxed frames, file: pages) or garbage
        if parsed in self.origins:
            return True
        host = headers.get("host")
        # Same-origin trusts the Host header: a DNS-rebinding page passes (issue 12 item 7);
        # list explicit origins in WSESSION_ALLOWED_ORIGINS where that matters.
        return (
            self.same_origin
            and host is not None
            and parsed == parse_origin(f"{scope.get('scheme', 'http')}://{host}")
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the server says next."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(status: int, error: str, scope: Scope, receive: Receive, send: Send) -> None:
    # Connection: close, so an unread body never becomes the next request on this connection.
    response = JSONResponse({"error": error}, status_code=status, headers={"connection": "close"})
    await response(scope, receive, send)
