"""Validated settings: a bad value fails at construction with a message naming the setting."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ._delivery import SlowConsumerPolicy
from ._exceptions import ConfigurationError

M = TypeVar("M", bound=BaseModel)


class Settings(BaseModel):
    """Tunable behaviour of a :class:`~wsession.SessionManager`.

    Every field can be passed to ``SessionManager(...)`` (or ``WSessionMiddleware(...)``) as a
    keyword argument.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_timeout: float | None = Field(
        default=10.0,
        gt=0,
        description="Seconds all connect hooks together may take; past it the connection is "
        "refused (label 'hook_timeout'). None: no limit.",
    )
    disconnect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds one async disconnect hook may take before it is abandoned and "
        "logged; the other hooks still run.",
    )
    max_backlog: int = Field(
        default=256,
        ge=1,
        description="Out-of-band messages (send by id, group, user, broadcast) one session may "
        "have waiting while its client does not read; past it, slow_consumer applies.",
    )
    max_backlog_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Payload bytes (characters for text) of manager messages one session may "
        "have waiting while its client does not read; past it, slow_consumer applies. A single "
        "message is always accepted into an empty backlog, so a session holds at most "
        "max(max_backlog_bytes, its largest message) waiting plus the frame being written.",
    )
    slow_consumer: SlowConsumerPolicy = Field(
        default=SlowConsumerPolicy.CLOSE,
        description="What happens when a backlog is full: close, drop or wait.",
    )
    slow_consumer_code: int = Field(
        default=1013,
        ge=1000,
        le=4999,
        description="Close code used for a slow consumer (1013 try again later, or 1008).",
    )
    send_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a sender waits for backlog room under the 'wait' policy.",
    )
    close_timeout: float = Field(
        default=5.0,
        ge=0,
        description="Seconds an app gets to end after wsession closed its session (kick); then "
        "its task is cancelled and the disconnect hooks run.",
    )
    # -- admission (checked before the app sees the connection) ------------------------------
    max_sessions: int | None = Field(
        default=None, ge=1, description="Open sessions allowed in this worker; refused with 503."
    )
    max_sessions_per_ip: int | None = Field(
        default=None, ge=1, description="Open sessions per client IP; refused with 429."
    )
    max_sessions_per_user: int | None = Field(
        default=None,
        ge=1,
        description="Open sessions per user_key (set by a connect hook); refused with 429.",
    )
    trusted_proxies: tuple[str, ...] = Field(
        default=(),
        description="IP addresses and CIDR networks of your own reverse proxies. Only when the "
        "peer is one of them is X-Forwarded-For read (every header line, in order): the client "
        "IP is the right-most entry that is not a trusted proxy. Empty: the peer's address.",
    )
    allowed_origins: tuple[str, ...] | None = Field(
        default=None,
        description="Browser Origins allowed to connect ('https://app.example', "
        "'http://localhost:8000', or 'same-origin' for the request's own Host, which the "
        "client writes: pair it with allowed_hosts against DNS rebinding). None: no check.",
    )
    allowed_hosts: tuple[str, ...] | None = Field(
        default=None,
        description="Host header values allowed ('app.example', 'app.example:8443', "
        "'[::1]:8000'; without a port any port matches); others are refused with 403 (label "
        "'host'). Guards 'same-origin' against DNS rebinding. None: no check.",
    )
    allow_missing_origin: bool = Field(
        default=True,
        description="Admit handshakes without an Origin header (non-browser clients).",
    )
    # -- caps ---------------------------------------------------------------------------------
    max_groups_per_session: int = Field(
        default=100,
        ge=1,
        description="Groups one session may be in; join() past it raises LimitExceeded (checked "
        "for this worker's sessions).",
    )
    max_group_name_length: int = Field(
        default=256,
        ge=1,
        description="Characters in a group name; join() with a longer one raises LimitExceeded.",
    )
    # -- presence (see wsession/_presence.py; nothing is allocated until it is used) ----------
    presence_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds over which presence changes are coalesced into one diff per topic "
        "(a join and a leave of one session inside it cancel out).",
    )
    max_presence_meta_bytes: int = Field(
        default=1024,
        ge=2,
        description="Bytes of one session's presence metadata (as JSON); track() past it raises "
        "LimitExceeded.",
    )
    max_presence_topics_per_session: int = Field(
        default=128,
        ge=1,
        description="Topics one session may be tracked in (and, separately, subscribed to); "
        "past it track()/subscribe() raise LimitExceeded.",
    )
    max_presence_members_per_topic: int = Field(
        default=100_000,
        ge=1,
        description="Sessions tracked in one topic (cluster-wide as this worker sees it); track() "
        "past it raises LimitExceeded (default 100,000).",
    )
    # -- liveness ---------------------------------------------------------------------------
    idle_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Close a session after this many seconds without a message either way.",
    )
    idle_close_code: int = Field(default=4408, ge=1000, le=4999)
    """Close code used when ``idle_timeout`` closes a session (4408 by default)."""
    detect_disconnect: bool = Field(
        default=False,
        description="Read the connection in a background task so a dropped client is noticed "
        "even when the app never calls receive() (costs one task per connection and one queue "
        "hop per received message).",
    )
    read_ahead: int = Field(
        default=16,
        ge=1,
        description="With detect_disconnect: received messages read ahead of the app at most; "
        "past it wsession stops reading, so the server's back-pressure on the client applies.",
    )
    # -- credentials on long-lived connections -------------------------------------------
    expiry_grace: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a session stays open past its expires_at (so a refresh already "
        "on its way can land) before it is closed with expiry_code.",
    )
    expiry_code: int = Field(
        default=4401,
        ge=1000,
        le=4999,
        description="Close code for a session whose credentials expired or whose refresh "
        "failed (the client should get a new credential, not retry blindly).",
    )
    expiry_reason: str = Field(
        default="expired",
        description="Close reason sent with expiry_code when a session expired (at most 123 "
        "bytes: the close frame's limit).",
    )
    revocation_ttl: float | None = Field(
        default=None,
        gt=0,
        description="Seconds revoke_user/revoke_session keep the user key or session id in a "
        "denylist (shared by every worker with a cluster registry) that connect hooks read "
        "with manager.is_revoked(). None: no denylist, revocation only closes.",
    )
    # -- resumption (see wsession/_resume.py; nothing is allocated while it is off) -----------
    resume_window: float = Field(
        default=0,
        ge=0,
        le=86400,
        description="Seconds a session whose connection was lost (dropped, server restart "
        "1001/1012, idle timeout, cancelled) stays detached, waiting for its client to resume "
        "it with its resume token; messages sent to it meanwhile are kept for the replay. "
        "0: off (every ending ends the session).",
    )
    resume_buffer: int = Field(
        default=1000,
        ge=1,
        description="Messages kept per session for a replay (the last ones numbered). A "
        "detached session whose missed messages would not fit ends (replay lost).",
    )
    resume_buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Payload bytes (characters for text) kept per session for a replay.",
    )
    resume_secret: SecretStr | None = Field(
        default=None,
        description="Key that signs resume tokens (HMAC-SHA256; at least 32 characters). None: "
        "a random key per process, which is enough while sessions resume on the worker that "
        "holds them.",
    )
    resume_seq_field: str | None = Field(
        default=None,
        description="Add each numbered message's sequence number to it as this JSON field "
        "(for text messages that are JSON objects, like every dict sent through wsession); "
        "None: the message is left as it is (read Session.seq instead).",
    )
    resume_token_param: str = Field(
        default="resume",
        min_length=1,
        description="Query parameter of the handshake that carries the resume token.",
    )
    resume_last_param: str = Field(
        default="last",
        min_length=1,
        description="Query parameter with the last sequence number the client processed.",
    )
    # -- shutdown -----------------------------------------------------------------------------
    drain_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Deadline (seconds) for a graceful drain: close sessions, run hooks, and cut "
        "whatever is left. Keep it below the server's graceful-shutdown timeout.",
    )
    drain_batch: int = Field(default=100, ge=1, description="Sessions closed per drain step.")
    drain_code: int = Field(default=1001, ge=1000, le=4999)
    drain_on_signal: bool = Field(
        default=True,
        description="Drain before the server's own shutdown on SIGTERM/SIGINT (main thread "
        "only; installed while the manager is entered in the app's lifespan).",
    )
    error_status: int = Field(
        default=500,
        ge=500,
        le=599,
        description="HTTP status of the denial response when a connect hook raises "
        "something other than Refuse (close code 1011 where denial is not supported).",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, values: Any) -> Any:
        if isinstance(values, dict) and "trust_forwarded_for" in values:
            raise ValueError(
                "trust_forwarded_for was removed (it trusted the header from any peer): set "
                "trusted_proxies to your proxies' addresses or networks instead, e.g. "
                "trusted_proxies=['127.0.0.1'] behind a proxy on the same host"
            )
        return values

    @model_validator(mode="after")
    def _resumption_fits(self) -> Settings:
        if self.resume_window > 0 and self.slow_consumer is SlowConsumerPolicy.WAIT:
            raise ValueError(
                "slow_consumer='wait' cannot keep numbered messages in order with "
                "resume_window: use 'close' (the client resumes) or 'drop'"
            )
        secret = self.resume_secret
        if secret is not None and len(secret.get_secret_value()) < 32:
            raise ValueError("resume_secret must be at least 32 characters")
        return self

    @field_validator("resume_seq_field")
    @classmethod
    def _plain_field(cls, value: str | None) -> str | None:
        if value is not None and not (
            value and value.isprintable() and '"' not in value and "\\" not in value
        ):
            raise ValueError("resume_seq_field must be a plain JSON field name")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_hosts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for host in value or ():
            if parse_host(host) is None:
                raise ValueError(f"not a host name with an optional port: {host!r}")
        return value

    @field_validator("expiry_reason")
    @classmethod
    def _fits_a_close_frame(cls, value: str) -> str:
        if len(value.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for origin in value:
            if origin != "same-origin":
                parse_origin(origin, strict=True)
        return value


def parse_origin(origin: str, *, strict: bool = False) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialised Origin, lower-cased and with default ports made
    explicit, or ``None`` when it is not a valid ``scheme://host[:port]`` (``"null"`` included).

    With ``strict`` an invalid value raises ``ValueError`` instead.
    """
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    valid = (
        scheme in DEFAULT_PORTS
        and bool(parts.hostname)
        and parts.path in ("", "/")
        and not parts.query
        and not parts.username
        and port != -1
    )
    if not valid:
        if strict:
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
        return None
    return scheme, str(parts.hostname).lower(), port or DEFAULT_PORTS[scheme]


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_IPV6_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a Host header value (``port`` None when absent), the host lower-cased
    without a trailing dot; None when it is not ``name[:port]``, ``a.b.c.d[:port]`` or
    ``[v6][:port]``. IPv6 literals are compared as written, not normalised."""
    host, colon, port = value.rpartition(":") if not value.endswith("]") else (value, "", "")
    if not colon:
        host = value
    elif not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return None
    host = host.lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not (_HOST_NAME.fullmatch(host) or _IPV6_LITERAL.fullmatch(host)):
        return None
    return host, int(port) if colon else None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Each IP address (as a one-address network) or CIDR network in ``values``.

    Raises:
        ValueError: a value is neither (a host name, ``*``, host bits set in a network).
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError:
            raise ValueError(
                f"not an IP address or network (like 10.0.0.1 or 10.0.0.0/8): {value!r}"
            ) from None
    return tuple(networks)


def validate_model(model: type[M], owner: str, values: dict[str, Any]) -> M:
    """Build ``model`` from ``values``; turn pydantic's error into a :class:`ConfigurationError`
    whose message names each bad setting."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or owner}: {err['msg']}"
            f" (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigurationError(f"invalid {owner} setting: {problems}") from None
