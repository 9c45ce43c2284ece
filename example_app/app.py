"""The example app: hooks that name each connection, an echo socket, and a JSON view.

Contract (outside checks rely on it; extend it, never rename it):

- ``WS /ws?name=NAME``: NAME must be 1-32 printable characters, else HTTP 403 before accept.
  The first message after accept is ``{"type": "welcome", "id": ID, "name": NAME, "online":
  [{"id", "name"}, ...]}`` (the others online, as of the last lobby ``presence_diff``: the
  same people as ``presence`` below, one entry per connection). Then, client message -> what
  arrives:

  - ``{"type": "echo", "text": T}`` -> ``{"type": "echo", "text": T}`` to the sender;
  - ``{"type": "dm", "to": ID, "text": T}`` -> ``{"type": "dm", "from": SENDER_ID, "name":
    SENDER_NAME, "text": T}`` to ID (the sender gets ``{"type": "error", ...}`` if ID is gone);
  - ``{"type": "dm_user", "user": NAME, "text": T}`` -> the same ``dm`` to every connection of
    the user NAME (all of that person's tabs, on every worker);
  - ``{"type": "broadcast", "text": T}`` -> ``{"type": "broadcast", "from": SENDER_ID, "name":
    SENDER_NAME, "text": T}`` to every open connection, the sender included;
  - ``{"type": "join", "group": G}`` -> ``{"type": "joined", "group": G}``; ``leave`` -> ``left``;
  - ``{"type": "group", "group": G, "text": T}`` -> ``{"type": "group", "group": G, "from":
    SENDER_ID, "name": SENDER_NAME, "text": T}`` to every member of G.

  Input the example cannot use never drops the connection without a close frame:

  - a text message that is not a JSON object, nests deeper than 32 levels, contains
    ``NaN``/``Infinity`` or a string that is not valid Unicode (a lone surrogate such as
    ``"\\ud800"``), or has an unknown ``type`` -> ``{"type": "error", "error": TEXT}`` to the
    sender; the connection stays open;
  - a binary frame -> close 1003 (unsupported data, RFC 6455 7.4.1);
  - a message over ``WSESSION_MAX_MESSAGE`` bytes (default 65536) -> close 1009 (message too
    big; ``python -m example_app`` also sets uvicorn's ``ws_max_size`` to it, so the protocol
    layer stops reading such a frame early);
  - a text frame that is not UTF-8 -> close 1007 (invalid payload; uvicorn's protocol layer
    does it before the app sees the frame).

  Session expiry (``WSESSION_SESSION_TTL``, seconds; default off): the welcome then also
  carries ``"expires_at"`` (ISO 8601, UTC); a client message ``{"type": "refresh"}`` extends the
  session by the TTL and answers ``{"type": "refreshed", "expires_at": ...}``; a session not
  refreshed by ``expires_at`` plus ``WSESSION_EXPIRY_GRACE`` seconds (default 5) is closed with
  code 4401, reason "expired". Without the TTL, ``refresh`` answers ``{"type": "error", ...}``.

  Presence (``manager.presence``): every connection is tracked in the topic ``lobby`` and
  subscribed to it; connections with the same NAME share a user key (one person, several tabs),
  so ``send_user`` reaches all of one person's tabs. The welcome also carries ``"presence":
  [{"name": NAME, "ids": [ID, ...]}, ...]``: the lobby grouped by person, as of the last diff
  (the diffs that follow apply to it exactly; this connection's own join is in the next one).
  Changes arrive as one message per topic per ``WSESSION_PRESENCE_INTERVAL`` seconds (default
  0.5): ``{"type": "presence_diff", "topic": T, "joins": [{"name", "ids"}, ...], "leaves":
  [{"name", "ids"}, ...]}`` (the connections of each person that joined or left; a connection
  that came and went inside one interval is in neither). A person is online while they have at
  least one id. Each room (group) is a topic too: ``join`` also tracks and subscribes the
  connection there, and ``joined`` is followed by a ``presence_diff`` of that topic whose
  ``joins`` are the room's people so far; ``leave`` untracks it. (This replaces the
  per-connection ``{"type": "presence", "event": "online" | "offline", "id", "name"}`` message
  sent to everyone on every arrival and departure, which cost O(N) frames per arrival.)
  Resumption (``WSESSION_RESUME_WINDOW``, seconds, default 120; 0 turns it off): the welcome
  carries ``"resume": TOKEN`` (``null`` when off) and ``"resumed": false``. With resumption
  on, every other message the server sends to a client carries ``"seq": N``: 1 for the
  session's first, then increasing by exactly 1, never reset by a resume. A connection lost
  without a clean close (dropped TCP, idle timeout) leaves the session detached for the window.
  With ``WSESSION_REDIS_URL`` the detached session and its numbered messages are kept in Redis:
  the client may resume on any worker, also after its worker was killed (``kill -9``) or
  restarted (a drain on SIGTERM detaches its sessions instead of ending them); give every
  worker the same ``WSESSION_RESUME_SECRET``. Without Redis it waits on the worker that held it
  (a restarted or another worker answers a resume with a new session).
  Reconnecting with ``WS /ws?name=NAME&resume=TOKEN&last=N`` (N: the last ``seq`` the client
  processed): if recovered, the welcome has the same ``id``, a new ``resume`` token (each token
  works once), ``"resumed": true`` and ``"replay": K`` (how many missed messages follow), and is
  followed by every message with ``seq > N``, in order, then live traffic; a resumed welcome
  has no ``presence`` (the client keeps its list; the replayed diffs bring it up to date), and
  the replay is followed by ``{"type": "presence_sync", "topic": T, "presence": [{"name",
  "ids"}, ...]}`` for the lobby and each room the session is in: the topic as of its last diff
  (the diffs that follow apply to it), since diffs sent while the session waited in Redis with
  no worker holding it are in no replay.
  Otherwise (token forged, used, expired or from a session that ended, or N older than the
  replay buffer holds) the client gets a new ``id`` and ``"resumed": false``, as for a first
  connection: never a partial replay.
  ``WSESSION_RESUME_SECRET`` (32+ characters) signs the tokens; by default a random key per
  process.
- ``GET /``: the single-page demo (static/index.html), which uses the package's JavaScript
  client, served at ``GET /wsession-client.js``: it resumes its session after a drop and
  logs "Reconnected: same session, N missed message(s) recovered".
- ``GET /api/sessions``: ``{"sessions": [{"id", "name", "connected_at", "state"}, ...]}``;
  ``state`` is ``"open"`` or ``"detached"``.
- ``GET /api/stats``: ``live``, ``connected_total``, ``disconnected_total``, ``rejected_total``,
  ``detached`` (sessions waiting to be resumed) and ``resumed_total``. At rest:
  ``connected_total == disconnected_total + live + detached`` (a resume is not a new
  connection). With Redis, ``live`` and ``detached`` count every worker's sessions and the
  totals this worker's.
  (With Redis, ``/api/sessions`` and ``/api/stats`` answer 503 ``{"error": "registry
  unavailable", "detail": "temporarily unavailable"}`` while Redis is unreachable; WebSocket
  actions that need the cluster answer ``{"type": "error", "error": "temporarily
  unavailable"}``. The cause is logged by the server, never sent to clients.)
- ``POST /api/send/{id}`` with ``{"text": T}``: delivers ``{"type": "dm", "from": "server",
  "text": T}``; 200, or 404 for an unknown or closed id; 400 with ``{"error": TEXT}`` for a body
  that is not UTF-8 JSON of that shape (the same rules as WebSocket messages above).
- ``POST /api/kick/{id}``: closes that connection (code 4000, reason "kicked"); 200, or 404.
- ``POST /api/revoke/{name}``: closes every connection of the user NAME on every worker (code
  4403, reason "revoked") and answers 200 ``{"closed": N}`` (N may be 0). With
  ``WSESSION_REVOCATION_TTL`` (seconds; default off) NAME is also refused (HTTP 403 before
  accept) for that long, on every worker.
- ``/api/*`` is a demo surface without authentication (the authenticated one is the admin API
  below). So that a foreign page cannot drive it from a visitor's browser, every ``POST`` under
  ``/api/`` is refused with 403 ``{"error": TEXT}`` when it carries an ``Origin`` header that is
  neither the page's own origin nor in ``WSESSION_ALLOWED_ORIGINS`` (requests without
  ``Origin``, from scripts and curl, pass), and with 415 when it has a body whose
  ``Content-Type`` is not ``application/json``. Request bodies under ``/api/`` are capped at
  ``WSESSION_MAX_BODY`` bytes (default 65536): a larger one is answered 413 ``{"error": TEXT}``
  without being read (the connection is then closed).
- ``GET /metrics``: Prometheus metrics of this app's manager (``wsession_*``, see
  ``wsession.metrics``) from a registry of its own; absent when ``prometheus-client`` is not
  installed.
- ``/admin/...``: the admin API (``wsession.admin``: ``GET /admin/sessions``, ``GET
  /admin/stats``, ``POST /admin/sessions/{id}/kick``) when ``WSESSION_ADMIN_TOKEN`` is set,
  with that bearer token; otherwise 404.

Browser handshakes from another origin are refused with 403 (``WSESSION_ALLOWED_ORIGINS``,
default the page's own origin); limits, idle timeout and drain deadline come from
``WSESSION_*`` environment variables (see ``settings_from_env``). Refused handshakes get their
HTTP status and are not logged as errors (see ``example_app/log_noise.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsession import (
    Presence,
    PresenceDiff,
    Refuse,
    RegistryUnavailable,
    SendResult,
    Session,
    SessionClosed,
    SessionManager,
    SessionRegistry,
    SessionState,
    WSessionMiddleware,
    client_script_route,
    get_session,
)

from .api_guard import ApiGuard
from .limits import Limits
from .log_noise import DenialMarker, quiet_refused_handshakes
from .messages import UnusableMessage, parse_json_object


class Member(BaseModel):
    """What the example keeps per connection."""

    name: str = ""


STATIC = Path(__file__).parent / "static"
UNAVAILABLE = "temporarily unavailable"
logger = logging.getLogger("example_app")
LOBBY = "lobby"
KICK_CODE = 4000
REVOKE_CODE = 4403


def _check_name(session: Session) -> None:
    name = session.query_params.get("name", "")
    if not (1 <= len(name) <= 32 and name.isprintable()):
        raise Refuse(403, reason="name must be 1-32 printable characters", label="bad_name")
    session.data.name = name
    session.user_key = name


# Environment variable -> SessionManager setting, for operators of the example.
_ENV_SETTINGS: dict[str, tuple[str, Any]] = {
    "WSESSION_MAX_SESSIONS": ("max_sessions", int),
    "WSESSION_MAX_PER_IP": ("max_sessions_per_ip", int),
    "WSESSION_MAX_PER_USER": ("max_sessions_per_user", int),
    "WSESSION_DRAIN_TIMEOUT": ("drain_timeout", float),
    "WSESSION_IDLE_TIMEOUT": ("idle_timeout", float),
    "WSESSION_EXPIRY_GRACE": ("expiry_grace", float),
    "WSESSION_REVOCATION_TTL": ("revocation_ttl", float),
    "WSESSION_PRESENCE_INTERVAL": ("presence_interval", float),
    "WSESSION_RESUME_WINDOW": ("resume_window", float),
    "WSESSION_RESUME_SECRET": ("resume_secret", str),
}
RESUME_WINDOW = 120.0  # the example's default; WSESSION_RESUME_WINDOW=0 turns resumption off


def settings_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Settings for the example's manager from the environment.

    ``WSESSION_ALLOWED_ORIGINS`` (comma-separated; default ``same-origin``: the page's own
    origin) sets the Origin allow-list; handshakes without an Origin header (non-browser
    clients) are allowed. The others are in ``_ENV_SETTINGS``.
    """
    origins = environ.get("WSESSION_ALLOWED_ORIGINS", "same-origin")
    settings: dict[str, Any] = {
        "allowed_origins": [o.strip() for o in origins.split(",") if o.strip()],
        "allow_missing_origin": True,
        "resume_window": RESUME_WINDOW,
        "resume_seq_field": "seq",  # every message but the welcome carries "seq"
    }
    for variable, (name, convert) in _ENV_SETTINGS.items():
        if environ.get(variable):
            settings[name] = convert(environ[variable])
    return settings


def _session_ttl(environ: Mapping[str, str]) -> timedelta | None:
    """``WSESSION_SESSION_TTL`` as a duration, or None (sessions do not expire)."""
    raw = environ.get("WSESSION_SESSION_TTL")
    if not raw:
        return None
    seconds = float(raw)
    if not seconds > 0:
        raise ValueError(f"WSESSION_SESSION_TTL must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def registry_from_env(environ: Mapping[str, str] = os.environ) -> SessionRegistry | None:
    """The Redis registry when ``WSESSION_REDIS_URL`` is set (``WSESSION_HEARTBEAT`` and
    ``WSESSION_LEASE_TTL`` tune its lease, ``WSESSION_REDIS_PREFIX`` its keys,
    ``WSESSION_REDIS_COMMAND_TIMEOUT`` its ``command_timeout`` in seconds); else None (the
    in-memory default)."""
    url = environ.get("WSESSION_REDIS_URL")
    if not url:
        return None
    from wsession.backends.redis import RedisRegistry

    heartbeat = float(environ.get("WSESSION_HEARTBEAT", "1.0"))
    ttl = environ.get("WSESSION_LEASE_TTL")
    command_timeout = float(environ.get("WSESSION_REDIS_COMMAND_TIMEOUT", "1.0"))
    return RedisRegistry(
        url,
        prefix=environ.get("WSESSION_REDIS_PREFIX", "wsession-example"),
        heartbeat=heartbeat,
        lease_ttl=float(ttl) if ttl else None,
        command_timeout=command_timeout,
    )


def create_app(
    manager: SessionManager | None = None, *, environ: Mapping[str, str] | None = None
) -> Starlette:
    """Build the example app around ``manager`` (by default a new one configured from
    ``environ``, which defaults to ``os.environ``)."""
    env = os.environ if environ is None else environ
    limits = Limits.from_env(env)
    sessions = manager or SessionManager(
        data_model=Member, registry=registry_from_env(env), **settings_from_env(env)
    )
    sessions.on_connect(_check_name)
    ttl = _session_ttl(env)

    async def check_credentials(session: Session) -> None:
        # The example's "credential" is the name; a real app checks a token here and takes
        # expires_at from it (its exp claim).
        if await sessions.is_revoked(user_key=session.user_key):
            raise Refuse(403, reason="revoked", label="revoked")
        if ttl is not None:
            session.expires_at = datetime.now(UTC) + ttl

    if ttl is not None or sessions.settings.revocation_ttl is not None:
        sessions.on_connect(check_credentials)  # only when asked for: no cost otherwise
        sessions.on_resume(check_credentials)  # a resume never skips authentication

    @sessions.on_refresh
    def extend(session: Session, credential: Any) -> datetime | None:
        # A real app validates the new token here (its subject must be session.user_key).
        return None if ttl is None else datetime.now(UTC) + ttl

    quiet_refused_handshakes()
    sessions.presence.render = _render_diff  # sessions leave their topics when they end

    lobby_fields = _LobbyFields()

    async def ws_endpoint(websocket: WebSocket) -> None:
        session = get_session(websocket)
        await websocket.accept()
        presence = sessions.presence
        # A resumed session is usually still tracked and subscribed (tracking again changes
        # nothing); not after its worker was killed, when its presence left with the worker.
        await presence.track(session, LOBBY)
        lobby = await presence.subscribe(session, LOBBY) or {}
        welcome: dict[str, Any] = {
            "type": "welcome",
            "id": session.id,
            "name": session.data.name,
            "resume": session.resume_token,
            "resumed": session.resumed,
        }
        if session.resumed:
            welcome["replay"] = session.pending_replay  # the missed messages that follow
        if session.expires_at is not None:
            welcome["expires_at"] = session.expires_at.isoformat()
        # Sent as it is (not through the session): the welcome is the one unnumbered message.
        await websocket.send_text(lobby_fields.welcome(welcome, lobby, session))
        if session.resumed:
            await _sync_presence(presence, session)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:  # RFC 6455 1003: a type of data this endpoint cannot accept
                    await websocket.close(1003, "binary frames are not supported: send JSON text")
                    break
                if limits.message_too_big(text):  # whatever the server's own frame limit
                    await websocket.close(1009, f"messages are limited to {limits.max_message} B")
                    break
                try:
                    await _handle(sessions, session, text)
                except RegistryUnavailable as exc:
                    # The details (host:port, redis-py's text) are for operators, not clients.
                    logger.warning("cluster registry unavailable: %s", exc)
                    await session.send_json({"type": "error", "error": UNAVAILABLE})
        except (WebSocketDisconnect, SessionClosed):
            pass  # the client left (a reply through the session found it gone)

    async def list_sessions(request: Request) -> JSONResponse:
        return JSONResponse({"sessions": [_describe(s) for s in await sessions.sessions()]})

    async def stats(request: Request) -> JSONResponse:
        counters = sessions.stats
        detached = await sessions.count_detached()
        return JSONResponse(
            {
                "live": await sessions.count() - detached,
                "detached": detached,
                "resumed_total": counters.resumed,
                "connected_total": counters.accepted,
                "disconnected_total": counters.ended,
                "rejected_total": counters.refused,
                **counters.as_dict(),
            }
        )

    async def send_to(request: Request) -> JSONResponse:
        try:
            body = parse_json_object((await request.body()).decode("utf-8"))
        except UnicodeDecodeError:
            return JSONResponse({"error": "the body must be UTF-8"}, status_code=400)
        except UnusableMessage as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not isinstance(body.get("text"), str):
            return JSONResponse({"error": 'body must be {"text": "..."}'}, status_code=400)
        message = {"type": "dm", "from": "server", "text": body["text"]}
        result = await sessions.send(request.path_params["id"], message)
        if result is SendResult.GONE:
            return JSONResponse({"error": "unknown or closed id"}, status_code=404)
        return JSONResponse({"result": result.value})

    async def kick(request: Request) -> JSONResponse:
        if not await sessions.close(request.path_params["id"], KICK_CODE, "kicked"):
            return JSONResponse({"error": "unknown or closed id"}, status_code=404)
        return JSONResponse({"result": "closed"})

    async def revoke(request: Request) -> JSONResponse:
        closed = await sessions.revoke_user(request.path_params["name"], REVOKE_CODE, "revoked")
        return JSONResponse({"closed": closed})

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions:
            yield

    app = Starlette(
        exception_handlers={RegistryUnavailable: _registry_unavailable},
        routes=[
            Route("/", index),
            client_script_route("/wsession-client.js"),
            WebSocketRoute("/ws", ws_endpoint),
            Route("/api/sessions", list_sessions),
            Route("/api/stats", stats),
            Route("/api/send/{id}", send_to, methods=["POST"]),
            Route("/api/kick/{id}", kick, methods=["POST"]),
            Route("/api/revoke/{name}", revoke, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            *_operator_routes(sessions, env),
        ],
        middleware=[
            Middleware(DenialMarker),
            Middleware(
                ApiGuard,
                allowed_origins=settings_from_env(env)["allowed_origins"],
                max_body=limits.max_body,
            ),
            Middleware(WSessionMiddleware, manager=sessions),
        ],
        lifespan=lifespan,
    )
    app.state.sessions = sessions
    return app


def _operator_routes(sessions: SessionManager, environ: Mapping[str, str]) -> list[BaseRoute]:
    """``/metrics`` (when prometheus-client is installed) and, when ``WSESSION_ADMIN_TOKEN`` is
    set, the admin API under ``/admin``."""
    routes: list[BaseRoute] = []
    try:
        from prometheus_client import CollectorRegistry

        from wsession.metrics import metrics_route, register_metrics
    except ImportError:
        pass
    else:
        registry = CollectorRegistry()  # one per app: several apps in one process never clash
        register_metrics(sessions, registry)
        routes.append(metrics_route("/metrics", registry=registry))
    token = environ.get("WSESSION_ADMIN_TOKEN")
    if token:
        from wsession.admin import admin_app

        routes.append(Mount("/admin", admin_app(sessions, token=token)))
    return routes


async def _registry_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # A cluster registry lost its store (Redis down): say so, instead of a bare 500, and keep
    # the details (host:port, redis-py's text) in the server log.
    logger.warning("cluster registry unavailable: %s", exc)
    return JSONResponse({"error": "registry unavailable", "detail": UNAVAILABLE}, status_code=503)


class _LobbyFields:
    """The welcome's ``online`` and ``presence`` fields as JSON text, encoded once per presence
    interval: every welcome of one interval gets the same base (the lobby as of the last
    diff), so a join storm costs one encoding per interval instead of one O(N) list per
    arrival."""

    def __init__(self) -> None:
        self._base: object = None  # the shared snapshot the texts were made from
        self._online = self._people = "[]"

    def welcome(self, head: dict[str, Any], lobby: dict[str, Any], session: Session) -> str:
        """The welcome's text: ``head`` plus ``online`` and, unless the session was resumed
        (its client keeps its list; the replay brings it up to date), ``presence``."""
        if lobby is not self._base:
            self._base = lobby
            self._online = encode_json(_online(lobby))
            self._people = encode_json(_people(lobby))
        online = self._online
        if session.resumed:  # the base may hold this very session: leave it out (rare path)
            online = encode_json([o for o in _online(lobby) if o["id"] != session.id])
            return f'{encode_json(head)[:-1]},"online":{online}}}'
        return f'{encode_json(head)[:-1]},"online":{online},"presence":{self._people}}}'


def encode_json(value: Any) -> str:
    """Compact JSON text, as Starlette's ``send_json`` writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _RoomBases:
    """Each room's base, as the diff-from-nothing a joining connection gets, encoded once per
    room and presence interval (keyed on the shared snapshot ``subscribe`` returns)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[object, str]] = {}

    def text(self, room: str, base: dict[str, Any]) -> str:
        cached = self._texts.get(room)
        if cached is not None and cached[0] is base:
            return cached[1]
        text = encode_json(_render_diff(PresenceDiff(room, base, {}, frozenset(), frozenset())))
        if len(self._texts) >= 10_000:  # bounded: rooms come and go
            self._texts.clear()
        self._texts[room] = (base, text)
        return text


_ROOM_BASES = _RoomBases()


async def _sync_presence(presence: Presence, session: Session) -> None:
    """After a resume, a ``presence_sync`` per topic (the lobby, each room): the topic's people
    as of its last diff, numbered after the replay. Diffs sent while the session was detached
    in Redis with no worker holding it (its worker drained or died) are in no replay; this
    brings the client up to date, and the diffs that follow apply to it."""
    for topic in (LOBBY, *sorted(session.groups)):
        if topic != LOBBY:
            await presence.track(session, topic)  # unchanged unless its worker died
        base = await presence.subscribe(session, topic) or {}
        # No await between reading the base and numbering the sync: a later diff follows it.
        await session.send_json(
            {"type": "presence_sync", "topic": topic, "presence": _people(base)}
        )


def _online(people: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The others online, as the welcome lists them (``{"id", "name"}`` per connection)."""
    return [{"id": sid, "name": name} for name, ids in people.items() for sid in ids]


def _people(people: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Presence grouped by person, as the example sends it (the user key is the name)."""
    return [{"name": name, "ids": list(ids)} for name, ids in people.items()]


def _render_diff(diff: PresenceDiff) -> dict[str, Any]:
    return {
        "type": "presence_diff",
        "topic": diff.topic,
        "joins": _people(diff.joins),
        "leaves": _people(diff.leaves),
    }


async def _handle(sessions: SessionManager, session: Session, raw: str) -> None:
    try:
        message = parse_json_object(raw)
    except UnusableMessage as exc:
        await session.send_json({"type": "error", "error": str(exc)})
        return
    kind, text, group = message.get("type"), message.get("text"), message.get("group")
    sender = {"from": session.id, "name": session.data.name}
    if kind == "echo":
        await session.send_json({"type": "echo", "text": text})
    elif kind == "dm":
        to = message.get("to")
        result = await sessions.send(str(to), {"type": "dm", **sender, "text": text})
        if result is SendResult.GONE:
            await session.send_json({"type": "error", "error": "unknown or closed id", "to": to})
    elif kind == "dm_user":
        to_user = message.get("user")
        await sessions.send_user(str(to_user), {"type": "dm", **sender, "text": text})
    elif kind == "refresh":
        if session.expires_at is None:
            await session.send_json({"type": "error", "error": "sessions do not expire here"})
            return
        expires_at = await sessions.refresh(session)
        if expires_at is not None:  # else the session is being closed with 4401
            await session.send_json({"type": "refreshed", "expires_at": expires_at.isoformat()})
    elif kind == "broadcast":
        await sessions.broadcast({"type": "broadcast", **sender, "text": text})
    elif kind in ("join", "leave") and isinstance(group, str) and group:
        presence = sessions.presence
        if kind == "join":
            await sessions.join(session.id, group)
            await presence.track(session, group)
            base = await presence.subscribe(session, group) or {}
            await session.send_json({"type": "joined", "group": group})
            # The room's people so far, as a diff from nothing (the later diffs apply to it),
            # encoded once per room and interval (the joins of one interval share the base).
            await session.send_text(_ROOM_BASES.text(group, base))
        else:
            await sessions.leave(session.id, group)
            await presence.untrack(session, group)
            await presence.unsubscribe(session, group)
            await session.send_json({"type": "left", "group": group})
    elif kind == "group" and isinstance(group, str) and group:
        await sessions.send_group(group, {"type": "group", "group": group, **sender, "text": text})
    else:
        await session.send_json({"type": "error", "error": f"bad message of type {kind!r}"})


def _describe(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "name": session.data.name,
        "connected_at": session.connected_at.isoformat(),
        "state": "detached" if session.state is SessionState.DETACHED else "open",
    }


app = create_app()
