"""Admission: the Origin allow-list and connection limits, checked before the app runs.

Limits are reserved, then awaited: a handshake takes its total and per-IP slots before its
connect hooks run (so rivals arriving meanwhile see them taken) and its per-user slot right after
the hooks, with no ``await`` in between. What it holds is recorded on a :class:`Ticket`, given
back exactly once by :meth:`Admission.release`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from ._config import DEFAULT_PORTS, Settings, parse_host, parse_networks, parse_origin
from ._exceptions import Refuse
from ._session import Session
from ._types import Scope

LIMIT_STATUS_TOTAL = 503
LIMIT_STATUS_PER_CLIENT = 429
LIMIT_CLOSE_CODE = 1013  # "try again later", when the server cannot send a denial response


class Ticket:
    """The limit slots one connection holds; give it back with :meth:`Admission.release`.

    Concurrency: used by the connection's own task only.
    """

    __slots__ = ("ip", "total", "user")

    def __init__(self) -> None:
        self.total = False
        self.ip: str | None = None
        self.user: str | None = None


# Handed out when no limit is configured: it holds nothing, so nothing is allocated per
# connection and releasing it is a no-op.
_NO_LIMITS = Ticket()


class Admission:
    """Decides whether a handshake may proceed, and counts what the limits count.

    All counts are this worker's: ``max_sessions`` counts reserved slots (handshakes in their
    connect hooks plus open sessions), per-IP and per-user counts likewise.

    Concurrency: every method is synchronous and runs on the event loop, so a check and the
    reservation that follows it cannot be interleaved with another connection's.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        allowed = settings.allowed_origins
        self._check_origin = allowed is not None
        self._same_origin = allowed is not None and "same-origin" in allowed
        self._origins = frozenset(
            parse_origin(o, strict=True) for o in (allowed or ()) if o != "same-origin"
        )
        self._proxies = parse_networks(settings.trusted_proxies)
        # Host -> the ports allowed with it (None: any port).
        self._hosts: dict[str, set[int] | None] | None = None
        if settings.allowed_hosts is not None:
            self._hosts = {}
            for entry in settings.allowed_hosts:
                host, port = parse_host(entry) or ("", None)
                ports = self._hosts.setdefault(host, set())
                if port is None or ports is None:
                    self._hosts[host] = None
                else:
                    ports.add(port)
        self._max_total = settings.max_sessions
        self._max_ip = settings.max_sessions_per_ip
        self._max_user = settings.max_sessions_per_user
        self._limited = (
            self._max_total is not None or self._max_ip is not None or self._max_user is not None
        )
        self.reserved = 0
        """Slots held against ``max_sessions`` (0 when it is not set)."""
        self.per_ip: Counter[str] = Counter()
        self.per_user: Counter[str] = Counter()
        self.draining = False
        self.active = self._check_origin or self._limited or self._hosts is not None

    def admit(self, scope: Scope) -> Refuse | Ticket:
        """Drain, Host, Origin, total and per-IP checks, before any connect hook runs.

        Returns the refusal, or a :class:`Ticket` holding the total and per-IP slots it
        reserved; the caller must :meth:`release` the ticket however the connection ends.
        """
        if self.draining:
            return _draining()
        if not self.active:
            return _NO_LIMITS
        if self._hosts is not None and not self._host_allowed(self._hosts, scope):
            return Refuse(403, code=1008, reason="host not allowed", label="host")
        if self._check_origin and not self._origin_allowed(scope):
            return Refuse(403, code=1008, reason="origin not allowed", label="origin")
        if not self._limited:
            return _NO_LIMITS
        if self._max_total is not None and self.reserved >= self._max_total:
            return Refuse(
                LIMIT_STATUS_TOTAL, code=LIMIT_CLOSE_CODE, reason="server full", label="limit_total"
            )
        ip = None
        if self._max_ip is not None:
            ip = self.client_ip(scope)
            if ip is not None and self.per_ip[ip] >= self._max_ip:
                return Refuse(
                    LIMIT_STATUS_PER_CLIENT,
                    code=LIMIT_CLOSE_CODE,
                    reason="too many connections from this address",
                    label="limit_ip",
                )
        ticket = Ticket()
        if self._max_total is not None:
            self.reserved += 1
            ticket.total = True
        if ip is not None:
            self.per_ip[ip] += 1
            ticket.ip = ip
        return ticket

    def after_hooks(self, ticket: Ticket, session: Session) -> Refuse | None:
        """Checks that need the connect hooks' results; call it right after they completed,
        with no ``await`` in between.

        Refuses a handshake whose hooks were still running when a drain started, and reserves
        the per-user slot for the ``user_key`` the hooks set (recorded on ``ticket``).
        """
        if self.draining:
            return _draining()
        key = session.user_key
        if self._max_user is None or key is None:
            return None
        if self.per_user[key] >= self._max_user:
            return Refuse(
                LIMIT_STATUS_PER_CLIENT,
                code=LIMIT_CLOSE_CODE,
                reason="too many connections for this user",
                label="limit_user",
            )
        self.per_user[key] += 1
        ticket.user = key
        return None

    def release(self, ticket: Ticket) -> None:
        """Give back every slot ``ticket`` holds. Idempotent: a second call does nothing."""
        if ticket.total:
            ticket.total = False
            self.reserved -= 1
        if ticket.ip is not None:
            _decrement(self.per_ip, ticket.ip)
            ticket.ip = None
        if ticket.user is not None:
            _decrement(self.per_user, ticket.user)
            ticket.user = None

    def client_ip(self, scope: Scope) -> str | None:
        """The client's IP address, as the per-IP limit counts it.

        The server's peer address, unless that peer is one of ``trusted_proxies``: then the
        X-Forwarded-For header lines, read in order as one list, are walked from the right and
        the first address that is not a trusted proxy is the client. An entry that is not an IP
        address stops the walk (nothing trusted vouches for what lies left of it): the nearest
        trusted hop then stands for the client, so a client cannot pick its own bucket.
        Forwarded addresses are normalised (``ip:port`` and ``[v6]:port`` tolerated).
        """
        client = scope.get("client")
        if not client:
            return None
        peer = str(client[0])
        if not self._proxies:
            return peer
        nearest = _ip(peer)
        if nearest is None or not self._trusted(nearest):
            return peer
        lines = [v for k, v in scope.get("headers", ()) if k == b"x-forwarded-for"]
        for line in reversed(lines):
            for entry in reversed(line.decode("latin-1").split(",")):
                entry = entry.strip()
                if not entry:
                    continue
                address = _ip(entry, with_port=True)
                if address is None:
                    return str(nearest)
                if not self._trusted(address):
                    return str(address)
                nearest = address
        return str(nearest)

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._proxies)

    @staticmethod
    def _host_allowed(allowed: dict[str, set[int] | None], scope: Scope) -> bool:
        values = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if len(values) != 1:  # none, or several to choose from: refuse rather than guess
            return False
        parsed = parse_host(values[0].decode("latin-1"))
        if parsed is None or parsed[0] not in allowed:
            return False
        ports = allowed[parsed[0]]
        if ports is None:
            return True
        port = parsed[1]
        if port is None:
            port = DEFAULT_PORTS.get(scope.get("scheme", "ws"), 80)
        return port in ports

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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str, *, with_port: bool = False) -> IPAddress | None:
    """``text`` as an IP address (IPv4-mapped IPv6 as IPv4), or None. With ``with_port`` an
    ``a.b.c.d:port`` or ``[v6]:port`` form is accepted too."""
    if with_port:
        if text.startswith("["):
            text, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
                return None
        elif text.count(":") == 1:
            text, _, port = text.partition(":")
            if not port.isdigit():
                return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _draining() -> Refuse:
    return Refuse(503, code=1001, reason="server is shutting down", label="draining")


def _same_host(origin: tuple[str, str, int], host_header: str) -> bool:
    scheme, host, port = origin
    request = parse_origin(f"{scheme}://{host_header}")
    return request is not None and request[1:] == (host, port)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
