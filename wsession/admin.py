"""An optional admin API for operators: list sessions, read counters, kick a connection.

Mount it under a path of your app, protected by a bearer token::

    from wsession.admin import admin_app

    app = Starlette(routes=[..., Mount("/admin", admin_app(manager, token=TOKEN))], ...)
    # FastAPI: app.mount("/admin", admin_app(manager, token=TOKEN))

Endpoints (every request needs ``Authorization: Bearer TOKEN``, else 401):

- ``GET /sessions``: ``{"total", "limit", "offset", "sessions": [...]}``. Query parameters:
  ``limit`` (1-1000, default 100), ``offset`` (default 0), and the filters ``path``, ``user``
  (``user_key``) and ``group``; 400 for a bad value. Oldest sessions first.
- ``GET /sessions/{id}``: one session, or 404.
- ``GET /stats``: ``manager.stats.as_dict()`` plus ``live`` (the registry's count: the whole
  cluster with a cluster registry) and ``local_live`` (this process's open connections).
- ``POST /sessions/{id}/kick``: close one session; optional JSON body ``{"code": 4000,
  "reason": "kicked by admin"}`` (those are the defaults); 200, 400 for a bad body, or 404 for
  an unknown or already ending id. Its disconnect hooks run once, as ``server closed``.

A session is described as ``{"id", "path", "client": {"host", "port"} | null, "connected_at"
(ISO 8601), "state", "user_key", "groups", "subprotocol", "node"}``, plus ``"data"`` only
with ``show_data=True`` (session data often holds personal details).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ._exceptions import ConfigurationError, Refuse
from ._session import Session
from ._types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from ._manager import SessionManager

__all__ = ["DEFAULT_KICK_CODE", "DEFAULT_KICK_REASON", "MAX_PAGE", "admin_app", "describe"]

DEFAULT_KICK_CODE = 4000
"""Close code of an admin kick when the request gives none."""
DEFAULT_KICK_REASON = "kicked by admin"
"""Close reason of an admin kick when the request gives none."""
DEFAULT_PAGE = 100
"""The ``limit`` of ``GET /sessions`` when the request gives none."""
MAX_PAGE = 1000
"""The largest ``limit`` ``GET /sessions`` accepts."""
_MAX_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, 2 for the code


def admin_app(manager: SessionManager, *, token: str, show_data: bool = False) -> Starlette:
    """Build the admin API for ``manager`` as an ASGI app to mount (see the module docstring).

    Args:
        manager: the :class:`~wsession.SessionManager` to administer.
        token: the bearer token every request must present; compared in constant time
            (surrounding whitespace, such as a newline read from a secrets file, is ignored).
        show_data: include ``session.data`` in session descriptions (off by default: it may
            hold personal details).

    Returns:
        A Starlette app; mount it, for example ``Mount("/admin", admin_app(...))``.

    Raises:
        ConfigurationError: ``token`` is empty or not a string, or ``manager`` is not a
            ``SessionManager``.
    """
    from ._manager import SessionManager

    if not isinstance(manager, SessionManager):
        raise ConfigurationError(f"manager: expected a SessionManager, got {manager!r}")
    if not isinstance(token, str) or not token.strip():
        raise ConfigurationError("token: the admin API needs a non-empty bearer token")

    async def list_sessions(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            limit = _int_param(params.get("limit"), DEFAULT_PAGE, 1, MAX_PAGE, "limit")
            offset = _int_param(params.get("offset"), 0, 0, None, "offset")
        except ValueError as exc:
            return _error(400, str(exc))
        path, user, group = params.get("path"), params.get("user"), params.get("group")
        members = set(await manager.members(group)) if group is not None else None

        def where(session: Session) -> bool:
            return (
                (path is None or session.path == path)
                and (user is None or session.user_key == user)
                and (members is None or session.id in members)
            )

        found = sorted(await manager.sessions(where), key=lambda s: (s.connected_at, s.id))
        page = found[offset : offset + limit]
        return JSONResponse(
            {
                "total": len(found),
                "limit": limit,
                "offset": offset,
                "sessions": [describe(s, show_data=show_data) for s in page],
            }
        )

    async def get_one(request: Request) -> JSONResponse:
        session = await manager.get(request.path_params["id"])
        if session is None:
            return _error(404, "unknown or closed id")
        return JSONResponse(describe(session, show_data=show_data))

    async def stats(request: Request) -> JSONResponse:
        counters = manager.stats
        return JSONResponse(
            {
                **counters.as_dict(),
                "live": await manager.count(),
                # This process's connections; not accepted - ended, which node-lost endings
                # of another worker's sessions (healed here) would skew.
                "local_live": len(manager.local),
            }
        )

    async def kick(request: Request) -> JSONResponse:
        session_id = request.path_params["id"]
        try:
            code, reason = _kick_body(await request.body())
        except ValueError as exc:
            return _error(400, str(exc))
        if not await manager.close(session_id, code, reason):
            return _error(404, "unknown or closed id")
        return JSONResponse({"result": "closed", "id": session_id, "code": code, "reason": reason})

    app = Starlette(
        routes=[
            Route("/sessions", list_sessions, methods=["GET"]),
            Route("/sessions/{id}", get_one, methods=["GET"]),
            Route("/sessions/{id}/kick", kick, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
        ],
        middleware=[Middleware(_RequireBearer, token=token)],
    )
    app.state.manager = manager
    return app


def describe(session: Session, *, show_data: bool = False) -> dict[str, Any]:
    """A JSON-ready description of ``session``, as the admin API lists it.

    Args:
        session: the session to describe.
        show_data: include ``session.data`` (pydantic models are dumped in JSON mode; values
            JSON cannot hold become strings).
    """
    client = session.client
    entry: dict[str, Any] = {
        "id": session.id,
        "path": session.path,
        "client": {"host": client[0], "port": client[1]} if client else None,
        "connected_at": session.connected_at.isoformat(),
        "state": str(session.state),
        "user_key": session.user_key,
        "groups": sorted(session.groups),
        "subprotocol": session.subprotocol,
        "node": session.node,
    }
    if show_data:
        data = session.data
        if isinstance(data, BaseModel):
            entry["data"] = data.model_dump(mode="json")
        else:
            entry["data"] = to_jsonable_python(data, fallback=str)
    return entry


class _RequireBearer:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.strip().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self._check(Headers(scope=scope).get("authorization"))
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
        else:
            challenge = 'Bearer realm="wsession-admin"'
            if problem == "invalid_token":
                challenge += ', error="invalid_token"'
            response = JSONResponse(
                {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": challenge}
            )
            await response(scope, receive, send)

    def _check(self, header: str | None) -> str | None:
        """``None`` when authorised, else ``"missing"`` or ``"invalid_token"``."""
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            # Still compare, so a missing header costs the same as a wrong one.
            hmac.compare_digest(self._token, self._token)
            return "missing"
        if hmac.compare_digest(given.strip().encode("latin-1", "replace"), self._token):
            return None
        return "invalid_token"


def _int_param(raw: str | None, default: int, low: int, high: int | None, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}-{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _kick_body(raw: bytes) -> tuple[int, str]:
    """``(code, reason)`` from an optional JSON body; ``ValueError`` with a message if bad."""
    if not raw.strip():
        return DEFAULT_KICK_CODE, DEFAULT_KICK_REASON
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError('body must be JSON: {"code": int, "reason": str}') from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    code = body.get("code", DEFAULT_KICK_CODE)
    reason = body.get("reason", DEFAULT_KICK_REASON)
    if not isinstance(code, int) or isinstance(code, bool):
        raise ValueError(f"code must be an integer close code, got {code!r}")
    try:
        Refuse(code=code)  # the library's own check: a code a server may send
    except ValueError:
        raise ValueError(
            f"code must be a sendable close code (1000-1003, 1007-1014, 3000-4999), got {code}"
        ) from None
    if not isinstance(reason, str):
        raise ValueError(f"reason must be a string, got {reason!r}")
    if len(reason.encode()) > _MAX_REASON_BYTES:
        raise ValueError(f"reason must be at most {_MAX_REASON_BYTES} bytes in UTF-8")
    return code, reason


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
