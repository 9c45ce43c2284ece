"""How the Redis registry names its keys and stores sessions and messages."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._exceptions import SessionClosed
from .._log import log_error
from .._session import Session, SessionState
from .._types import Message

if TYPE_CHECKING:
    from .._manager import SessionManager


class Keys:
    """Every key and channel the registry uses, under one prefix.

    On a Redis Cluster (``cluster=True``) the prefix is written as the hash tag ``{prefix}``:
    every key a script touches, and the registry's channels, then hash to one slot, so each
    script runs whole on one node. Denylist entries keep the plain prefix: each is read and
    written alone, so they spread over the cluster's shards."""

    def __init__(self, prefix: str, *, cluster: bool = False) -> None:
        self.plain_prefix = prefix
        self.prefix = f"{{{prefix}}}" if cluster else prefix
        prefix = self.prefix
        self.all = f"{prefix}:sessions"  # set of every live session id
        self.nodes = f"{prefix}:nodes"  # set of node ids that may own sessions
        self.broadcast = f"{prefix}:ch:all"

    def session(self, session_id: str) -> str:
        """Hash of one session's metadata and data."""
        return f"{self.prefix}:s:{session_id}"

    def session_groups(self, session_id: str) -> str:
        """Set of the groups one session joined (for cleanup)."""
        return f"{self.prefix}:sg:{session_id}"

    def group(self, group: str) -> str:
        """Set of the session ids in a group."""
        return f"{self.prefix}:g:{group}"

    def user(self, user_key: str) -> str:
        """Set of the session ids of one user."""
        return f"{self.prefix}:u:{user_key}"

    def node_sessions(self, node: str) -> str:
        """Set of the session ids a node owns (what survivors claim when it dies)."""
        return f"{self.prefix}:n:{node}:s"

    def presence(self, node: str) -> str:
        """Hash of a node's presence entries: ``[topic, session id]`` -> ``[person, meta]``
        (JSON), what a worker starting later loads."""
        return f"{self.prefix}:p:{node}"

    def lease(self, node: str) -> str:
        """A node's lease: exists while its heartbeat runs."""
        return f"{self.prefix}:lease:{node}"

    def dead(self, node: str) -> str:
        """A lost node's tombstone (expires): tells it, if it was only stalled, not to come back
        with its old sessions."""
        return f"{self.prefix}:dead:{node}"

    def denied(self, key: str) -> str:
        """A revocation denylist entry (expires after ``revocation_ttl``)."""
        return f"{self.plain_prefix}:deny:{key}"

    def taken(self, node: str) -> str:
        """Hash of the sessions a worker took from Redis to end (CLAIM, SWEEP), each id to what
        their hooks need, until that worker has read it (``RedisRegistry._collect_taken``)."""
        return f"{self.prefix}:taken:{node}"

    def channel(self, node: str) -> str:
        """The pub/sub channel a node listens on for its own sessions."""
        return f"{self.prefix}:ch:{node}"


NEVER_STORED_HEADERS = frozenset(
    {"authorization", "cookie", "proxy-authorization", "sec-websocket-key"}
)
"""Credentials no allow-list may name: keep what hooks need in ``session.data`` or ``user_key``."""

DEFAULT_STORED_HEADERS = ("user-agent", "origin", "host", "accept-language")
"""The handshake headers stored by default (an allow-list: anything else, ``X-Api-Key`` and
``Sec-WebSocket-Protocol`` included, stays in the worker that owns the connection)."""


@dataclass(frozen=True)
class StoragePolicy:
    """What of a handshake is copied into Redis, where every worker (and anyone who can read
    that Redis) sees it.

    Attributes:
        headers: lower-case names of the headers stored (others never leave the worker).
            ``sec-websocket-protocol`` here also stores the requested and accepted subprotocols.
        query_string: store the query string (``?token=...`` often carries a secret).
        max_header_bytes: the stored headers' names and values together stay within this many
            bytes: headers that do not fit are left out whole, in the order the client sent them.
    """

    headers: frozenset[str] = frozenset(DEFAULT_STORED_HEADERS)
    query_string: bool = False
    max_header_bytes: int = 4096

    @property
    def subprotocols(self) -> bool:
        """Whether subprotocol values are stored (browsers carry tokens in them)."""
        return "sec-websocket-protocol" in self.headers


class RemoteSession(Session):
    """A read-only snapshot of a session another worker owns, rebuilt from Redis.

    Sending through it raises :class:`~wsession.SessionClosed`: reach it through the manager
    (``manager.send(session.id, ...)``), which publishes to its worker.
    """

    __slots__ = ()

    async def send_message(self, message: Message) -> None:
        """Always raises :class:`~wsession.SessionClosed` (the connection is on another worker)."""
        raise SessionClosed(self.id, f"on worker {self.node} (send through the manager)")


def session_fields(
    session: Session, node: str, policy: StoragePolicy
) -> tuple[dict[str, str], bool]:
    """The hash fields stored for ``session`` (what another worker needs to rebuild it, within
    ``policy``), and whether headers were left out because of ``policy.max_header_bytes``."""
    client = session.client
    headers: list[list[str]] = []
    budget = policy.max_header_bytes
    truncated = False
    for raw_name, raw_value in session.headers.raw:
        name = raw_name.decode("latin-1").lower()
        if name not in policy.headers:
            continue
        size = len(raw_name) + len(raw_value)
        if size > budget:
            truncated = True
            continue
        budget -= size
        headers.append([name, raw_value.decode("latin-1")])
    fields = {
        "node": node,
        "path": session.path,
        "client": json.dumps(list(client) if client else None),
        "connected_at": session.connected_at.isoformat(),
        "subprotocol": (session.subprotocol or "") if policy.subprotocols else "",
        "user_key": session.user_key or "",
        "headers": json.dumps(headers),
        "query": str(session.query_params) if policy.query_string else "",
        "subprotocols": json.dumps(
            list(session.requested_subprotocols) if policy.subprotocols else []
        ),
        "data": encode_data(session),
    }
    token = session.resume_token
    if token is not None:
        fields["rt"] = token  # resumable: see _redis_resume_scripts.py
        fields["st"] = "open"
        # The last number this worker knows of: numbering goes on from it if Redis lost its
        # data (REGISTER keeps a larger one already stored).
        fields["rseq"] = str(session.seq)
    return fields, truncated


def encode_data(session: Session) -> str:
    """``session.data`` as JSON: ``model_dump_json`` for a model; a dict with ``json.dumps``, values
    JSON cannot hold as their ``str()``. Never raises (a failure is logged and stored as null)."""
    data = session.data
    try:
        if hasattr(data, "model_dump_json"):
            return str(data.model_dump_json())
        return json.dumps(data, separators=(",", ":"), default=str)
    except Exception:
        log_error(
            session.id, "cannot store the data of %s in Redis: stored as null", session.id, exc=True
        )
        return "null"


def rebuild_session(
    manager: SessionManager,
    session_id: str,
    fields: dict[str, str],
    groups: set[str],
    *,
    live: bool = False,
) -> Session:
    """A :class:`RemoteSession` for a session another worker owns (or owned: node-lost hooks get
    one). Data that no longer validates (say, a new ``data_model`` in a rolling deploy) is
    logged and replaced by fresh default data."""
    client = json.loads(fields.get("client") or "null")
    scope: dict[str, Any] = {
        "client": client,
        "path": fields.get("path", ""),
        "headers": [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in json.loads(fields.get("headers") or "[]")
        ],
        "query_string": fields.get("query", "").encode("latin-1"),
        "subprotocols": json.loads(fields.get("subprotocols") or "[]"),
    }
    # ``live``: a session resumed on this worker (a plain Session, given a connection next).
    cls = Session if live else RemoteSession
    session = cls(session_id, scope, None, _decode_data(manager, session_id, fields))
    if fields.get("connected_at"):
        session.connected_at = datetime.fromisoformat(fields["connected_at"])
    session.subprotocol = fields.get("subprotocol") or None
    session.user_key = fields.get("user_key") or None
    session.node = fields.get("node") or None
    session.groups = set(groups)
    session.state = SessionState.DETACHED if fields.get("st") == "detached" else SessionState.OPEN
    return session


def _decode_data(manager: SessionManager, session_id: str, fields: dict[str, str]) -> Any:
    raw = fields.get("data") or "null"
    model = manager.data_model
    try:
        if model is not None:
            return model.model_validate_json(raw)
        data = json.loads(raw)
    except ValueError:  # pydantic's ValidationError included
        log_error(
            session_id, "stored data of %s is unreadable: using defaults", session_id, exc=True
        )
        return manager.new_data()
    return data if isinstance(data, dict) else manager.new_data()


def encode_envelope(op: str, **fields: Any) -> str:
    """A pub/sub envelope: ``{"op": ..., ...}`` with an ASGI send message made JSON-safe."""
    message = fields.pop("message", None)
    if message is not None:
        if message.get("bytes") is not None:
            fields["b"] = base64.b64encode(message["bytes"]).decode("ascii")
        else:
            fields["t"] = message.get("text")
    return json.dumps({"op": op, **fields}, separators=(",", ":"))


def decode_envelope(raw: str | bytes) -> tuple[str, dict[str, Any], Message | None]:
    """``(op, fields, message)`` from :func:`encode_envelope`'s output."""
    fields: dict[str, Any] = json.loads(raw)
    op = fields.pop("op")
    message: Message | None = None
    if "b" in fields:
        message = {"type": "websocket.send", "bytes": base64.b64decode(fields.pop("b"))}
    elif "t" in fields:
        message = {"type": "websocket.send", "text": fields.pop("t")}
    return op, fields, message
