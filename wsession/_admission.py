"""Admission: the Origin allow-list and connection limits, checked before the app runs."""

from __future__ import annotations

from collections import Counter

from ._config import Settings, parse_origin
from ._exceptions import Refuse
from ._session import Session
from ._types import Scope

LIMIT_STATUS_TOTAL = 503
LIMIT_STATUS_PER_CLIENT = 429
LIMIT_CLOSE_CODE = 1013  # "try again later", when the server cannot send a denial response


class Admission:
    """Decides whether a handshake may proceed, and counts what the limits count.

    Per-IP and per-user counts are this worker's; ``max_sessions`` counts this worker's open
    sessions.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        allowed = settings.allowed_origins
        self._check_origin = allowed is not None
        self._same_origin = allowed is not None and "same-origin" in allowed
        self._origins = frozenset(
            parse_origin(o, strict=True) for o in (allowed or ()) if o != "same-origin"
        )
        self._limit_ip = settings.max_sessions_per_ip is not None
        self._limit_user = settings.max_sessions_per_user is not None
        self.per_ip: Counter[str] = Counter()
        self.per_user: Counter[str] = Counter()
        self.draining = False
        self.active = (
            self._check_origin
            or self._limit_ip
            or self._limit_user
            or settings.max_sessions is not None
        )

    def before_hooks(self, session: Session, scope: Scope, live: int) -> Refuse | None:
        """Origin, drain and total/per-IP limits: refusals that need no connect hook."""
        if self.draining:
            return Refuse(503, code=1001, reason="server is shutting down", label="draining")
        if not self.active:
            return None
        if self._check_origin and not self._origin_allowed(scope):
            return Refuse(403, code=1008, reason="origin not allowed", label="origin")
        limit = self.settings.max_sessions
        if limit is not None and live >= limit:
            return Refuse(
                LIMIT_STATUS_TOTAL, code=LIMIT_CLOSE_CODE, reason="server full", label="limit_total"
            )
        if self._limit_ip:
            ip = self.client_ip(scope)
            session._ip = ip
            if ip is not None and self.per_ip[ip] >= (self.settings.max_sessions_per_ip or 0):
                return Refuse(
                    LIMIT_STATUS_PER_CLIENT,
                    code=LIMIT_CLOSE_CODE,
                    reason="too many connections from this address",
                    label="limit_ip",
                )
        return None

    def after_hooks(self, session: Session) -> Refuse | None:
        """The per-user limit (the user key is set by connect hooks)."""
        key = session.user_key
        if (
            self._limit_user
            and key is not None
            and self.per_user[key] >= (self.settings.max_sessions_per_user or 0)
        ):
            return Refuse(
                LIMIT_STATUS_PER_CLIENT,
                code=LIMIT_CLOSE_CODE,
                reason="too many connections for this user",
                label="limit_user",
            )
        return None

    def acquire(self, session: Session) -> None:
        """Count an admitted session against its IP and user."""
        if session._ip is not None:
            self.per_ip[session._ip] += 1
        if self._limit_user and session.user_key is not None:
            self.per_user[session.user_key] += 1

    def release(self, session: Session) -> None:
        """Give back what :meth:`acquire` counted."""
        if session._ip is not None:
            _decrement(self.per_ip, session._ip)
        if self._limit_user and session.user_key is not None:
            _decrement(self.per_user, session.user_key)

    def client_ip(self, scope: Scope) -> str | None:
        """The client's IP: the server's peer address, or with ``trust_forwarded_for`` the
        right-most X-Forwarded-For entry (the one your proxy appended)."""
        if self.settings.trust_forwarded_for:
            for name, value in scope.get("headers", ()):
                if name == b"x-forwarded-for":
                    last: str = value.decode("latin-1").split(",")[-1].strip()
                    if last:
                        return last
        client = scope.get("client")
        return str(client[0]) if client else None

    def _origin_allowed(self, scope: Scope) -> bool:
        origin = host = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        if origin is None:
            return self.settings.allow_missing_origin
        parsed = parse_origin(origin)
        if parsed is None:  # "null" (sandboxed frames, file://) and garbage
            return False
        if parsed in self._origins:
            return True
        if self._same_origin and host is not None:
            return _same_host(parsed, host)
        return False


def _same_host(origin: tuple[str, str, int], host_header: str) -> bool:
    scheme, host, port = origin
    request = parse_origin(f"{scheme}://{host_header}")
    return request is not None and request[1:] == (host, port)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
