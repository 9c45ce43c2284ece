"""A registry in Redis, so sessions, groups, user keys and sends work across workers and hosts.

Needs the ``redis`` extra (``pip install 'wsession[redis]'``); imported only when used.

How it works: every worker keeps its own sessions in a local index (the fast path: a send to a
local session never touches Redis) and mirrors them in Redis (a hash per session, sets for all
sessions, groups, user keys and each worker's sessions; see ``_redis_scripts.py``). Each worker
listens on its own pub/sub channel plus a broadcast channel; a send to a session on another
worker is published to that worker's channel, in order.

Each worker holds a lease: a key with a TTL whose value (a token) changes at every heartbeat. A
worker is lost when its lease expired, or, faster, when its pub/sub subscription is gone (its
process died and the kernel closed its sockets) and its token has not changed for a heartbeat.
Survivors declare it lost (a tombstone, atomic with its heartbeat), claim its sessions with an
atomic script (a batch per call, each claim atomic), so each lost session's disconnect hooks run
once in the cluster, with ``end_reason`` ``node lost`` and the data stored at registration.

On a Redis Cluster (see ``_redis_link.py``) the same scripts run on the node holding the
prefix's slot (every key is hash-tagged ``{prefix}``), and the channels use sharded pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
from collections import defaultdict, deque
from collections.abc import Iterable
from enum import StrEnum
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._config import validate_model
from .._delivery import (
    SendResult,
    close_session,
    close_slow_consumer,
    deliver,
    deliver_numbered,
    try_deliver,
)
from .._exceptions import ConfigurationError, RegistryUnavailable
from .._lifecycle import end_without_connection, run_hooks
from .._log import log_error, log_warning
from .._resume import TAKEN_OVER
from .._session import EndReason, Session, SessionState
from .._shield import run_shielded
from .._types import Message
from . import _redis_resume_scripts as resume_scripts
from . import _redis_scripts as scripts
from ._base import SessionFilter
from ._redis_codec import (
    DEFAULT_STORED_HEADERS,
    NEVER_STORED_HEADERS,
    Keys,
    StoragePolicy,
    decode_envelope,
    encode_envelope,
    rebuild_session,
    session_fields,
)
from ._redis_endings import Endings
from ._redis_journal import DETACHED_NODE, RedisJournal
from ._redis_link import (
    CallGate,
    Deadline,
    PubSubMode,
    check_cluster_prefix,
    is_cluster_client,
    is_cluster_node,
    make_cluster_client,
    supports_sharded_pubsub,
)
from .memory import MemoryRegistry

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from .._manager import SessionManager
    from .._presence import PresenceChange

_URL_SCHEMES = ("redis://", "rediss://", "unix://")
_LOST_CLOSE_CODE = 1012  # "service restart": the client may reconnect at once
_CLAIM_BATCH = 200
_RESYNC_BATCH = 100  # sessions written back (or removals replayed) per pipeline
_ENDING_TASKS = 8  # endings of swept or claimed sessions run at once (their hooks)
_SWEPT = 2  # the kind of a taken entry the sweep wrote (CLAIM writes 0 or 1: detached)
_CLOSED = 3  # END_DETACHED's (with how it ended: reason, code, close reason)
_SWEEP_BACKLOG = 100  # the heartbeat sweeps only while fewer endings than this are pending
_OWN_CONNECTIONS = 2  # beyond max_connections: the heartbeat's and the pub/sub listener's
_NO_SPACE = r"^\S+$"


class RedisSettings(BaseModel):
    """The validated settings of a :class:`RedisRegistry` (its keyword arguments but
    ``client``); see the registry for what each one does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    prefix: str = Field(default="wsession", min_length=1, pattern=_NO_SPACE)
    heartbeat: float = Field(default=1.0, gt=0)
    lease_ttl: float | None = Field(default=None, gt=0)
    node_id: str | None = Field(default=None, min_length=1, pattern=_NO_SPACE)
    max_connections: int = Field(default=64, ge=2)
    command_timeout: float = Field(default=1.0, gt=0)
    stored_headers: tuple[str, ...] = DEFAULT_STORED_HEADERS
    store_query_string: bool = False
    max_stored_header_bytes: int = Field(default=4096, ge=0)
    index_ttl: float = Field(default=3600.0, ge=1)
    cluster: bool | None = None
    sharded_pubsub: bool | None = None

    @field_validator("url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_URL_SCHEMES):
            raise ValueError("expected redis://, rediss:// or unix:// (a Redis URL)")
        return value

    @field_validator("stored_headers")
    @classmethod
    def _storable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(name.strip().lower() for name in value)
        secret = sorted(set(names) & NEVER_STORED_HEADERS)
        if secret:
            raise ValueError(f"credentials are never stored in Redis: {', '.join(secret)}")
        if not all(names):
            raise ValueError("header names must be non-empty")
        return names

    @model_validator(mode="after")
    def _sharded_needs_cluster(self) -> Self:
        if self.sharded_pubsub and self.cluster is False:
            raise ValueError("sharded_pubsub=True needs a Redis Cluster (cluster is False)")
        if self.cluster and self.url is not None and self.url.startswith("unix://"):
            raise ValueError(
                "a Redis Cluster is reached over TCP: give a redis:// or rediss:// URL"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Self:
        if self.lease_ttl is not None and not self.lease_ttl > self.heartbeat:
            raise ValueError(
                f"lease_ttl must be longer than heartbeat ({self.heartbeat}s), "
                f"got {self.lease_ttl!r}"
            )
        return self


class LinkState(StrEnum):
    """Where the registry stands with Redis (``registry.state``).

    Transitions (anything else is a bug and raises ``RuntimeError``)::

        stopped   -> starting                      (entered)
        starting  -> available | resyncing | outage | stopped
        available -> resyncing                     (Redis missed writes: lease lapsed, a
                                                    write skipped, declared lost)
        available -> outage                        (a Redis call failed or timed out)
        resyncing -> available                     (every local session written again)
        resyncing -> outage
        outage    -> resyncing                     (the heartbeat reached Redis again)
        any       -> stopped                       (exited)
    """

    STOPPED = "stopped"
    """Not entered (or exited): nothing of this worker is in Redis."""
    STARTING = "starting"
    """Entered; the first heartbeat (lease, take-over of a previous incarnation) is under way."""
    AVAILABLE = "available"
    """Redis answers and holds every local session: cluster queries work."""
    RESYNCING = "resyncing"
    """Redis answers but missed writes; the heartbeat writes them. Cluster queries raise
    :class:`~wsession.RegistryUnavailable` (their answer would be incomplete)."""
    OUTAGE = "outage"
    """A Redis call failed or took longer than ``command_timeout`` once it held a connection
    (waiting for one, in a burst, does not count): local work goes on, cluster queries raise
    :class:`~wsession.RegistryUnavailable`, the heartbeat keeps trying."""


_TRANSITIONS: dict[LinkState, frozenset[LinkState]] = {
    LinkState.STOPPED: frozenset({LinkState.STARTING}),
    LinkState.STARTING: frozenset(
        {LinkState.AVAILABLE, LinkState.RESYNCING, LinkState.OUTAGE, LinkState.STOPPED}
    ),
    LinkState.AVAILABLE: frozenset({LinkState.RESYNCING, LinkState.OUTAGE, LinkState.STOPPED}),
    LinkState.RESYNCING: frozenset({LinkState.AVAILABLE, LinkState.OUTAGE, LinkState.STOPPED}),
    LinkState.OUTAGE: frozenset({LinkState.RESYNCING, LinkState.STOPPED}),
}


class RedisRegistry:
    """Live sessions of every worker, in one Redis (standalone, or a primary behind Sentinel)
    or in a Redis Cluster.

    Args:
        url: a Redis URL (``redis://127.0.0.1:6379/0``, ``rediss://``, ``unix://``); or give
            ``client``.
        client: a ready ``redis.asyncio.Redis`` (or ``redis.asyncio.cluster.RedisCluster``) made
            with ``decode_responses=True`` (not closed by the registry).
        prefix: namespace of every key and channel, so several apps can share one Redis (no
            prefix may be another's prefix followed by ``:``).
        heartbeat: seconds between lease renewals (the registry renews twice per heartbeat). A
            worker that dies (kill -9, crash, OOM kill) is noticed within two heartbeats.
        lease_ttl: seconds a lease lives without renewal (default 5 heartbeats; longer than
            ``heartbeat``). A worker whose host vanishes, or that is cut off from Redis (or whose
            event loop is blocked) for longer than this, is declared lost.
        node_id: this worker's id (default: random). A fixed one (a pod name) may be reused by
            the next start: that start ends the sessions its crashed predecessor left as node
            lost. Two live workers may not share one: the second raises ConfigurationError.
        max_connections: how many of the registry's Redis calls may be in flight at once (one
            connection each; default 64). Calls beyond it (a reconnect burst of a thousand
            handshakes) wait their turn, first come first served, untimed: a burst is load, not
            an outage, and the wait is bounded by the calls ahead (each ends within
            ``command_timeout``); if one of them fails, Redis is down and every waiting call
            fails at once, as in an outage. The heartbeat and the pub/sub listener have a
            connection of their own beyond these, so the lease is renewed whatever the load (a
            pool made from ``url`` holds ``max_connections + 2``; give a ``client`` whose pool
            has room for as many).
        command_timeout: seconds any one Redis operation may take once it holds a connection
            (default 1; the wait for a connection is not counted). Past it the registry behaves
            as in an outage: a Redis that hangs never holds handshakes, sends or stats for
            longer.
        stored_headers: the handshake headers copied into Redis (an allow-list, lower case;
            default user-agent, origin, host, accept-language). Credentials (Authorization,
            Cookie, Proxy-Authorization, Sec-WebSocket-Key) cannot be listed. Subprotocols
            (``Sec-WebSocket-Protocol``, where browsers carry tokens) are stored only when
            ``"sec-websocket-protocol"`` is listed.
        store_query_string: copy the query string into Redis (default False: ``?token=`` is
            common).
        max_stored_header_bytes: cap on the stored headers' names and values (default 4096):
            headers that do not fit are left out whole, logged once per worker.
        index_ttl: seconds group and user sets live without a write or a heartbeat refresh
            (default 3600): a safety net for sets nobody writes any more.
        cluster: whether ``url`` names a node of a Redis Cluster. ``None`` (default): ask the
            server (``INFO cluster``) when the registry is entered. ``True`` or ``False``: insist,
            and raise ConfigurationError on entering when the server says otherwise. On a
            cluster every key of ``prefix`` carries the hash tag ``{prefix}`` (one slot, so each
            script runs on one node) and ``max_connections`` caps the calls in flight as on one
            Redis (redis-py's cluster client has no waiting pool: it fails at its cap). With
            ``client``, a ``redis.asyncio.cluster.RedisCluster`` means a cluster.
        sharded_pubsub: on a cluster, use sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``: a
            message goes to the one node holding the channel's slot, not to every node).
            ``None`` (default): when every node runs Redis 7 or later; ``False``: plain pub/sub.

    Raises:
        ConfigurationError: bad arguments (named in the message).

    Consistency notes:

    - A session's data is stored when it is registered (after its connect hooks); call
      :meth:`update_data` after changing it if other workers, or node-lost hooks, must see the
      change. Remote sessions are read-only snapshots (:class:`~wsession.backends._redis_codec.
      RemoteSession`) holding only what was stored (see ``stored_headers``,
      ``store_query_string``): reach them through the manager.
    - A send to a session on another worker returns ``queued`` once published to its worker, or
      ``gone`` when the id is unknown or its worker is not listening. Messages published while a
      worker reconnects to Redis are lost (Redis pub/sub keeps nothing). The listener never
      waits for one slow client: under the ``wait`` policy a full backlog is waited for off the
      listener, in order per target, for ``send_timeout`` at most.
    - During a Redis outage (or a Redis that does not answer within ``command_timeout``, or
      answers with an error such as OOM or READONLY) local sessions keep working and local sends
      deliver; cluster-wide queries (``get`` of a remote id, ``count``, ``sessions``,
      ``members``, ``user_sessions``), sends and kicks aimed at another worker's session, and
      ``close_user`` (after closing the local ones) raise :class:`~wsession.RegistryUnavailable`;
      group, user and broadcast sends reach the local targets and return how many they reached.
      ``add`` and ``remove`` never raise for an outage: the worker writes its live sessions
      again, and replays the removals it missed, when Redis is back, and answers cluster queries
      only once that is done.
    - The node-lost hooks of a lost worker's sessions run on the worker that claimed them; if
      that worker dies too before running them, they do not run (at most once). They run in
      tasks of their own (up to 8 sessions at once), as do the hooks of detached sessions the
      heartbeat's sweep ends, never in the heartbeat (a slow hook would let the lease lapse);
      exiting the registry waits for them (see ``_redis_endings.py``). A worker that
      was alive but declared lost (cut off from Redis or blocked past ``lease_ttl``) finds its
      tombstone when it comes back: it closes those sessions with 1012, whose hooks then run a
      second time there, and carries on under a new node id. With resumption (a manager with
      ``resume_window``) the cluster makes those sessions detached instead, and the worker that
      comes back runs no hook for them: their clients resume them on any worker.

    Concurrency: every method is called from the event loop's tasks; ``remove`` does its local
    bookkeeping before its first ``await`` and shields its Redis I/O, so it may be called
    unshielded from a teardown that is being cancelled.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | RedisCluster | None = None,
        prefix: str = "wsession",
        heartbeat: float = 1.0,
        lease_ttl: float | None = None,
        node_id: str | None = None,
        max_connections: int = 64,
        command_timeout: float = 1.0,
        stored_headers: Iterable[str] = DEFAULT_STORED_HEADERS,
        store_query_string: bool = False,
        max_stored_header_bytes: int = 4096,
        index_ttl: float = 3600.0,
        cluster: bool | None = None,
        sharded_pubsub: bool | None = None,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisRegistry: give exactly one of url and client")
        if client is not None and not _decodes(client):
            raise ConfigurationError("client: RedisRegistry needs decode_responses=True")
        if isinstance(stored_headers, str):
            raise ConfigurationError("stored_headers: give a list of header names, not a str")
        settings = validate_model(
            RedisSettings,
            "RedisRegistry",
            {
                "url": url,
                "prefix": prefix,
                "heartbeat": heartbeat,
                "lease_ttl": lease_ttl,
                "node_id": node_id,
                "max_connections": max_connections,
                "command_timeout": command_timeout,
                "stored_headers": tuple(stored_headers),
                "store_query_string": store_query_string,
                "max_stored_header_bytes": max_stored_header_bytes,
                "index_ttl": index_ttl,
                "cluster": cluster,
                "sharded_pubsub": sharded_pubsub,
            },
        )
        if client is not None and cluster is not None and cluster != is_cluster_client(client):
            kind = "a RedisCluster" if cluster else "a single-Redis client, not a RedisCluster"
            raise ConfigurationError(f"cluster={cluster} but client is not {kind}")
        self.settings = settings
        """The validated settings (:class:`RedisSettings`)."""
        self.url = settings.url
        self.prefix = settings.prefix
        self.heartbeat = settings.heartbeat
        self.lease_ttl = settings.lease_ttl or 5 * settings.heartbeat
        self.command_timeout = settings.command_timeout
        self.node_id = settings.node_id or secrets.token_hex(8)
        """This worker's id in the cluster (``session.node`` of its sessions). It changes if the
        cluster declared this worker lost while it was alive."""
        self.max_connections = settings.max_connections
        self.policy = StoragePolicy(
            headers=frozenset(settings.stored_headers),
            query_string=settings.store_query_string,
            max_header_bytes=settings.max_stored_header_bytes,
        )
        """What of a handshake is copied into Redis."""
        self._incarnation = secrets.token_hex(6)  # this start, told apart from a restart's
        self._pool: Any = None
        self._keys = Keys(self.prefix)  # tagged for a cluster once entered
        self._route: list[str] = [self._keys.nodes]  # the key scripts are routed by
        self._mode = PubSubMode()
        # The registry's calls in flight, one connection each (the heartbeat's are not
        # counted: it has a connection of its own); see CallGate.
        self._gate = CallGate(self.max_connections)
        # The journal's steps (resumes, parks, endings: bursts when a worker dies) queue here
        # first, a quarter of the connections at most (see RedisJournal._io); refused with
        # the one above in an outage.
        self._journal_gate = CallGate(max(1, self.max_connections // 4))
        self._external_client = client
        self._client: Any = client
        self._scripts: dict[str, Any] = {}
        self._local = MemoryRegistry()
        self._manager: SessionManager | None = None
        self._listener: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._healing: dict[str, asyncio.Task[None]] = {}
        # Hooks of sessions ended here without a connection (swept, claimed): off the heartbeat.
        self._endings = Endings(_ENDING_TASKS)
        # Sessions CLAIM or SWEEP took for this worker wait in Redis (Keys.taken) until read
        # here, so a lost reply loses no hooks. Unread: a script may have written there since
        # the last read (also at start: a crashed start under this node id may have left some).
        self._taken_unread = True
        self._taken_lock = asyncio.Lock()  # one read at a time: each ending is queued once
        self._taken_queued: set[str] = set()  # queued here, not yet known to be deleted there
        self._taken_asked: set[str] = set()  # END_DETACHED in flight: its caller ends them
        self._renewed_at = float("-inf")  # when the last lease renewal was sent (monotonic)
        self._state = LinkState.STOPPED
        self._recovered_at = float("-inf")  # when this worker was last cut off (monotonic)
        self._unwritten: set[str] = set()  # local ids Redis may lack or hold stale
        self._pending_removals: set[str] = set()  # ids removed here, maybe not yet in Redis
        # Ids registered in Redis under the current node id: counted from the moment the
        # registration is sent until a reply says the script wrote nothing. A call that timed
        # out may have been written all the same, and if the cluster then declares this worker
        # lost it ends that session too (hooks there): _declared_lost must close it here like
        # the others, not write it back as a live session whose hooks already ran. (One that
        # in fact failed is then closed needlessly: its hooks run once, here.)
        self._written: set[str] = set()
        self._token = 0
        self._suspects: dict[str, tuple[str, float]] = {}  # node -> (lease token, first seen)
        self._waiting: dict[str, deque[Message]] = {}  # listener sends waiting for room
        self._waiters: set[asyncio.Task[None]] = set()
        self._truncation_logged = False
        self._ttl_refreshed_at = float("-inf")
        self._journal: RedisJournal | None = None  # resumption across workers, when used

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        """Where the registry stands with Redis (see :class:`LinkState`)."""
        return self._state

    def _enter(self, state: LinkState) -> None:
        """Move to ``state`` (see :class:`LinkState` for the legal transitions)."""
        old = self._state
        if state is old:
            return
        if state not in _TRANSITIONS[old]:
            raise RuntimeError(f"RedisRegistry: illegal transition {old} -> {state}")
        self._state = state
        for gate in (self._gate, self._journal_gate):
            if state is LinkState.OUTAGE:
                gate.refuse_waiting(_no_connection)  # a call ahead will fail: don't wait
            else:
                gate.allow_waiting()
        if state is LinkState.RESYNCING and old is LinkState.OUTAGE:
            self._recovered_at = monotonic()
            self._unwritten.update(s.id for s in self._local.snapshot())
            log_warning(None, "Redis reachable again; writing this worker's sessions back")

    def _mark_all_unwritten(self) -> None:
        """Redis lost (or must not keep) what this worker wrote: write everything again."""
        self._unwritten.update(s.id for s in self._local.snapshot())
        if self._state is LinkState.AVAILABLE:
            self._enter(LinkState.RESYNCING)

    def _fail(self, exc: BaseException) -> None:
        """A Redis call failed or timed out: local-only until the heartbeat gets through."""
        if self._state in (LinkState.AVAILABLE, LinkState.RESYNCING):
            log_warning(
                None,
                "Redis unavailable (%s): working locally; cluster queries raise "
                "RegistryUnavailable until it is back",
                _describe(exc),
            )
        if self._state is not LinkState.STOPPED:
            self._enter(LinkState.OUTAGE)

    def _bounded(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """One Redis operation: wait for one of ``max_connections`` slots (see
        :class:`CallGate`: a burst queues there, untimed), then a deadline of
        ``command_timeout`` (its TimeoutError counts as a Redis failure). The heartbeat task
        never waits for a slot: it has a connection of its own, so its lease renewal never
        queues behind a burst (else the other workers would declare this one lost). Either way
        a reply that arrived while the loop was stalled is read (see :class:`Deadline`)."""
        if self._priority():
            return Deadline(self.command_timeout)
        return self._gate.slot(self.command_timeout)

    def _priority(self) -> bool:
        """Whether the caller is the heartbeat (which never queues behind other calls)."""
        beater = self._beater
        return beater is not None and asyncio.current_task() is beater

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self, manager: SessionManager) -> None:
        """Attach the owning manager (its settings drive delivery; its hooks run on node loss)."""
        self._local.bind(manager)
        self._manager = manager

    def resume_store(self) -> RedisJournal:
        """The durable journal for resumption across workers (called by a manager with
        ``resume_window``; see ``_redis_journal.py``)."""
        if self._journal is None:
            self._journal = RedisJournal(self)
        return self._journal

    def _forget_parked(self, session: Session) -> None:
        """A detached session leaves this worker's index (Redis holds it, owned by no worker)."""
        self._local.discard(session)
        self._written.discard(session.id)
        self._unwritten.discard(session.id)

    def _adopt(self, session: Session) -> None:
        """A session resumed here (Redis moved it to this worker already)."""
        self._local.insert(session)
        session.node = self.node_id
        self._written.add(session.id)

    @property
    def redis(self) -> Any:
        """The Redis client (raises RegistryUnavailable before the registry is entered).

        Typed ``Any`` on purpose: redis-py's command stubs mix sync and async return types."""
        if self._client is None:
            raise RegistryUnavailable("RedisRegistry is not open: enter it (async with) first")
        return self._client

    @property
    def available(self) -> bool:
        """True while Redis answers and this worker's sessions are all written there: cluster
        queries work. False during an outage (see :class:`~wsession.RegistryUnavailable`)."""
        return self._state is LinkState.AVAILABLE

    async def __aenter__(self) -> Self:
        """Connect, take this worker's lease (ending what a crashed previous start under the
        same ``node_id`` left), heal sessions of dead workers, start listening.

        Raises:
            RegistryUnavailable: Redis cannot be reached at start-up.
            ConfigurationError: another live worker uses this ``node_id``.
        """
        try:
            await self._connect()
        except BaseException as exc:
            await self._close_own_client()
            if isinstance(exc, _redis_errors()):
                raise RegistryUnavailable(f"cannot reach Redis: {_describe(exc)}") from exc
            raise
        client = self._client
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in (
                "REGISTER",
                "REMOVE",
                "CLAIM",
                "ADOPT_TAKEN",
                "HEARTBEAT",
                "DECLARE_LOST",
                "SEND",
                "FORGET_NODE",
                "TAKE_OVER",
                "JOIN",
                "LEAVE",
                "LIVE_MEMBERS",
            )
        }
        for name in resume_scripts.ALL:
            self._scripts[name] = client.register_script(getattr(resume_scripts, name))
        self._enter(LinkState.STARTING)
        try:
            await self._take_over_previous_incarnation()
            await self._tick()
        except BaseException as exc:
            self._enter(LinkState.STOPPED)
            # What the take-over (or a first sweep) took is this worker's to end, and the
            # start-up fails: its hooks run now, as at exit, not cut off when the process ends.
            await self._endings.close(self._drain_limit())
            await self._close_own_client()
            if isinstance(exc, _redis_errors()):
                raise RegistryUnavailable(f"cannot reach Redis: {_describe(exc)}") from exc
            raise
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen())
        self._beater = loop.create_task(self._beat())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # sends to our sessions need the subscription
                await self._subscribed.wait()
        return self

    async def _connect(self) -> None:
        """Make the client (unless one was given), find out whether it is a cluster and which
        pub/sub it has, and name the keys accordingly."""
        cluster = self.settings.cluster
        if self._client is None:
            if self.url is None:
                raise RegistryUnavailable("RedisRegistry has neither a url nor a client")
            async with asyncio.timeout(self.command_timeout):
                on_cluster = await is_cluster_node(self.url, self.command_timeout)
            if cluster is not None and cluster != on_cluster:
                raise ConfigurationError(
                    f"cluster={cluster}, but the Redis at the url is "
                    + ("a Redis Cluster node (cluster_enabled:1)" if on_cluster else "no cluster")
                    + ": leave cluster unset to follow the server"
                )
            cluster = on_cluster
            if cluster:
                self._client = make_cluster_client(
                    self.url, max_connections=self.max_connections, timeout=self.command_timeout
                )
            else:
                self._client = self._single_client(self.url)
        elif cluster is None:
            cluster = is_cluster_client(self._client)
        if not cluster:
            return
        check_cluster_prefix(self.prefix)
        self._keys = Keys(self.prefix, cluster=True)
        self._route = [self._keys.nodes]
        sharded = self.settings.sharded_pubsub
        async with self._bounded():
            await self._client.initialize()
            if sharded is not False:
                has_it = await supports_sharded_pubsub(self._client)
                if sharded and not has_it:
                    raise ConfigurationError(
                        "sharded_pubsub=True, but a node of the cluster runs Redis older than 7.0"
                    )
                sharded = has_it
        self._mode = PubSubMode(cluster=True, sharded=bool(sharded))

    def _single_client(self, url: str) -> Any:
        """A client of one Redis, on a pool the registry owns."""
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        # Calls queue in the registry's CallGate (max_connections in flight); the pool has a
        # connection more for the heartbeat and one for pub/sub, so they never wait for one.
        # A blocking pool all the same (redis-py's default pool raises "Too many connections"
        # at its limit), its wait bounded. Few, quick retries: an outage must be noticed fast
        # (local work goes on meanwhile).
        self._pool = BlockingConnectionPool.from_url(
            url,
            decode_responses=True,
            max_connections=self.max_connections + _OWN_CONNECTIONS,
            timeout=self.command_timeout,
            socket_connect_timeout=self.command_timeout,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
        )
        return Redis(connection_pool=self._pool)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, finish node-lost hooks under way, give up the lease, close the
        client the registry opened."""
        if self._journal is not None:
            await self._journal.close()  # the messages being recorded now
        for task in (self._beater, self._listener, *self._waiters):
            if task is not None:
                await _stop(task)
        self._beater = self._listener = None
        limit = self._drain_limit()
        deadline = monotonic() + limit
        if self._healing:
            # Claiming a lost worker's sessions: what is claimed by then is queued for ending.
            _, late = await asyncio.wait(list(self._healing.values()), timeout=limit)
            for task in late:
                await _stop(task)
        if self._taken_unread and self._client is not None and self._state is not LinkState.OUTAGE:
            await self._collect_taken()  # a claim or sweep whose reply was late: hooks here
        # Hooks of sessions ended here without a connection: each runs once (see Endings).
        await self._endings.close(max(0.0, deadline - monotonic()))
        client = self._client
        if client is None:
            return
        # Bounded: shutdown must not hang on an unreachable or busy Redis.
        with contextlib.suppress(*_redis_errors(), TimeoutError):
            async with asyncio.timeout(5):
                for session_id in [s.id for s in self._local.snapshot()] + list(
                    self._pending_removals
                ):
                    await self._remove_in_redis(session_id)
                await self._presence_gone()
                await client.delete(self._keys.lease(self.node_id))
                await client.srem(self._keys.nodes, self.node_id)
        self._enter(LinkState.STOPPED)
        await self._close_own_client()

    def _drain_limit(self) -> float:
        """How long closing waits for the endings under way (the manager's drain_timeout)."""
        return self._manager.settings.drain_timeout if self._manager is not None else 10.0

    async def _presence_gone(self) -> None:
        """At shutdown: this worker's presence leaves everywhere at once (the sessions it
        drained left their topics, but their leaves would be published one interval later,
        after the registry closed)."""
        later: list[tuple[str, str]] = []
        pipe = self.redis.pipeline(transaction=False)
        parked = self._parked_presence()
        if parked:
            # Sessions detached in Redis (this worker parked them) keep their presence: it
            # moves to DETACHED_NODE first, so no worker sees them leave (see _redis_journal).
            _write_presence(pipe, self._keys.presence(DETACHED_NODE), parked)
            envelope = encode_envelope("presence", origin=DETACHED_NODE, changes=parked)
            self._queue_publish(pipe, self._keys.broadcast, envelope, later)
        pipe.delete(self._keys.presence(self.node_id))
        envelope = encode_envelope("presence_lost", node=self.node_id)
        self._queue_publish(pipe, self._keys.broadcast, envelope, later)
        await pipe.execute()
        await self._publish_later(later)

    def _parked_presence(self) -> list[PresenceChange]:
        """The presence entries of this worker's parked sessions (tracked here, no longer in
        the local index), with a durable journal; else none."""
        presence = self._bound().presence_if_used if self._manager is not None else None
        if self._journal is None or presence is None:
            return []
        return [c for c in presence.tracked_here() if self._local.local_session(c[1]) is None]

    async def _close_own_client(self) -> None:
        """Close the client and pool the registry made (never one given to it); bounded."""
        if self._external_client is not None or self._client is None:
            return
        with contextlib.suppress(*_redis_errors(), TimeoutError):
            async with asyncio.timeout(5):
                await self._client.aclose()
                if self._pool is not None:
                    await self._pool.aclose()
        self._client = self._pool = None

    # -- membership -----------------------------------------------------------------------

    async def add(self, session: Session) -> None:
        """Register a local session here and in Redis. Never raises because Redis is down,
        hangs or refuses writes (OOM, READONLY): the failure is logged, the connection works,
        and the worker writes the session when Redis is back. Raises ``ValueError`` for an id
        already live here or on another worker."""
        await self._local.add(session)
        session.node = self.node_id
        if self._state is not LinkState.AVAILABLE:
            self._unwritten.add(session.id)
            return
        try:
            async with self._bounded():
                await self._register(session)
        except ValueError:
            self._local.discard(session)
            raise
        except _outage_errors() as exc:
            self._unwritten.add(session.id)
            self._fail(exc)
            log_warning(
                session.id,
                "Redis unavailable, %s registered locally only: %s",
                session.id,
                _describe(exc),
            )

    async def remove(self, session: Session) -> None:
        """Forget a local session here and in Redis. The local bookkeeping is done before the
        first ``await``; the Redis removal is shielded from cancellation of the caller and, if
        Redis fails or hangs, replayed by the heartbeat once it is back (never raises for that)."""
        if not self._local.discard(session):
            return
        self._written.discard(session.id)
        self._unwritten.discard(session.id)
        self._pending_removals.add(session.id)  # until Redis confirms: a replay is never lost
        if self._state is LinkState.AVAILABLE:
            await run_shielded(self._flush_removal(session.id))

    async def _flush_removal(self, session_id: str) -> None:
        try:
            async with self._bounded():
                await self._remove_in_redis(session_id)
        except _redis_errors() as exc:
            self._fail(exc)
            log_warning(
                session_id,
                "Redis unavailable, %s removed locally only (replayed later): %s",
                session_id,
                _describe(exc),
            )
        else:
            self._pending_removals.discard(session_id)

    async def update_data(self, session: Session) -> None:
        """Store this worker's ``session`` again (its ``data``, ``user_key``, ``subprotocol``
        and groups), for other workers and node-lost hooks to read.

        Raises:
            ValueError: ``session`` is not a live session of this worker.
            RegistryUnavailable: Redis is unreachable.
        """
        if self._local.local_session(session.id) is not session:
            raise ValueError(f"update_data: {session.id} is not a live session of this worker")
        async with self._cluster("update_data"):
            await self._register(session)

    async def get(self, session_id: str) -> Session | None:
        """The session with this id on any worker (remote ones are read-only snapshots)."""
        local = self._local.local_session(session_id)
        if local is not None:
            return local
        async with self._cluster("get"):
            found = await self._read_sessions([session_id])
        return found[0] if found else None

    async def count(self) -> int:
        """Live sessions in the whole cluster."""
        async with self._cluster("count"):
            return int(await self.redis.scard(self._keys.all))

    async def sessions(self, where: SessionFilter | None = None) -> list[Session]:
        """Live sessions of every worker, oldest first (local ones live, remote ones as
        snapshots), filtered by ``where`` when given."""
        async with self._cluster("sessions"):
            ids = list(await self.redis.smembers(self._keys.all))
            found = await self._read_sessions(ids)
        found.sort(key=lambda s: (s.connected_at, s.id))
        return [s for s in found if where is None or where(s)]

    async def join(self, session_id: str, group: str) -> bool:
        """Add a session of any worker to ``group`` (atomically with the session's existence
        in Redis: a join racing its removal leaves nothing behind)."""
        if self._local.local_session(session_id) is not None:
            if not await self._local.join(session_id, group):
                return False
            await self._mirror_membership(session_id, group, join=True)
            return True
        async with self._cluster("join"):
            owner = await self._scripts["JOIN"](
                keys=self._route,
                args=[self._keys.prefix, session_id, group, int(self.settings.index_ttl)],
            )
            if not owner:
                return False
            await self._publish(owner, "join", ids=[session_id], group=group)
        return True

    async def leave(self, session_id: str, group: str) -> bool:
        """Remove a session of any worker from ``group``."""
        if self._local.local_session(session_id) is not None:
            left = await self._local.leave(session_id, group)
            if left:
                await self._mirror_membership(session_id, group, join=False)
            return left
        async with self._cluster("leave"):
            owner, removed = await self._scripts["LEAVE"](
                keys=self._route, args=[self._keys.prefix, session_id, group]
            )
            if owner:
                await self._publish(owner, "leave", ids=[session_id], group=group)
        return bool(int(removed))

    async def members(self, group: str) -> list[str]:
        """Ids of the live members of ``group`` on every worker."""
        async with self._cluster("members"):
            return sorted(await self._live_members(self._keys.group(group)))

    async def user_sessions(self, user_key: str) -> list[str]:
        """Ids of one user's live sessions on every worker."""
        async with self._cluster("user_sessions"):
            return sorted(await self._live_members(self._keys.user(user_key)))

    # -- delivery ---------------------------------------------------------------------------

    async def send(self, session_id: str, message: Message) -> SendResult:
        """Local sessions: delivered at once, no Redis round trip. Another worker's session:
        published to its worker in one round trip (``queued``). ``gone`` for an unknown id or
        a worker that is not listening. Raises RegistryUnavailable for a non-local id during a
        Redis outage."""
        if self._local.local_session(session_id) is not None:
            return await self._local.send(session_id, message)
        if self._journal is not None:
            async with self._cluster("send"):
                recorded = await self._journal.record_for(message, ids=[session_id])
            result = SendResult.QUEUED if recorded else SendResult.GONE
            self._stats_send(result)
            return result
        envelope = encode_envelope("send", ids=[session_id], message=message)
        async with self._cluster("send"):
            reply = await self._scripts["SEND"](
                keys=self._route,
                args=[self._keys.prefix, session_id, envelope, self._mode.publish_command],
            )
        result = SendResult.GONE
        if reply and reply[0] != self.node_id and int(reply[1]) > 0:
            result = SendResult.QUEUED
        self._stats_send(result)
        return result

    async def send_group(self, group: str, message: Message, exclude: str | None = None) -> int:
        """Send to the members of ``group`` wherever they are (local ones first, at once)."""
        key = self._keys.group(group)
        recorded = await self._record_for_all(key, message, exclude)
        if recorded is not None:
            return recorded
        return await self._fan_out(self._local.group_snapshot(group), key, message, exclude)

    async def send_user(self, user_key: str, message: Message) -> int:
        """Send to every session of ``user_key`` wherever it is (local ones first, at once)."""
        key = self._keys.user(user_key)
        recorded = await self._record_for_all(key, message, None)
        if recorded is not None:
            return recorded
        return await self._fan_out(self._local.user_snapshot(user_key), key, message, None)

    async def broadcast(self, message: Message, exclude: str | None = None) -> int:
        """Send to every open session of the cluster; local ones first, at once. Returns how
        many it reached (remote sessions counted as reached once published)."""
        recorded = await self._record_for_all(self._keys.all, message, exclude)
        if recorded is not None:
            return recorded
        reached = await self._local.broadcast(message, exclude)
        if self._state is not LinkState.AVAILABLE:
            return reached
        keys = self._keys
        try:
            async with self._bounded():
                later: list[tuple[str, str]] = []
                pipe = self.redis.pipeline(transaction=False)
                pipe.scard(keys.all)
                pipe.scard(keys.node_sessions(self.node_id))
                if exclude is not None and self._local.local_session(exclude) is None:
                    pipe.sismember(keys.all, exclude)
                envelope = encode_envelope(
                    "broadcast", origin=self.node_id, exclude=exclude, message=message
                )
                self._queue_publish(pipe, keys.broadcast, envelope, later)
                total, mine, *excluded = await pipe.execute()
                await self._publish_later(later)
        except _redis_errors() as exc:
            self._fail(exc)
            return reached
        remote = int(total) - int(mine) - (1 if excluded and excluded[0] else 0)
        self._stats_send(SendResult.QUEUED, max(0, remote))
        return reached + max(0, remote)

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close a session wherever it is; its disconnect hooks run once, on its worker. For
        another worker's session: True once its worker was told."""
        if self._local.local_session(session_id) is not None:
            return await self._local.close(session_id, code, reason)
        if self._journal is not None and await self._close_detached([session_id], code, reason):
            return True
        envelope = encode_envelope("close", ids=[session_id], code=code, reason=reason)
        async with self._cluster("close"):
            reply = await self._scripts["SEND"](
                keys=self._route,
                args=[self._keys.prefix, session_id, envelope, self._mode.publish_command],
            )
        return bool(reply) and reply[0] != self.node_id and int(reply[1]) > 0

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of ``user_key`` wherever it is. The local ones are closed even
        when Redis is unreachable; then RegistryUnavailable tells that the others were not."""
        closed = await self._local.close_user(user_key, code, reason)
        async with self._cluster("close_user"):
            ids = list(await self.redis.smembers(self._keys.user(user_key)))
        if self._journal is not None:
            # Not inside the call above: detached sessions end here, disconnect hooks included,
            # and a hook is neither a Redis call (no command_timeout) nor may it hold a slot.
            closed += await self._close_detached(ids, code, reason)
        async with self._cluster("close_user"):
            for owner, owned in (await self._remote_owners(ids)).items():
                await self._publish(owner, "close", ids=owned, code=code, reason=reason)
                closed += len(owned)
        return closed

    # -- revocation denylist -------------------------------------------------------------------

    async def deny(self, key: str, ttl: float) -> None:
        """Put ``key`` on the cluster's denylist for ``ttl`` seconds (one key in Redis that
        expires by itself). Raises RegistryUnavailable when Redis cannot take it."""
        async with self._cluster("deny"):
            await self.redis.set(self._keys.denied(key), "1", px=max(1, round(ttl * 1000)))

    async def is_denied(self, key: str) -> bool:
        """Whether ``key`` is on the cluster's denylist. Raises RegistryUnavailable when Redis
        cannot answer (a connect hook then refuses: fail closed)."""
        async with self._cluster("is_denied"):
            return bool(await self.redis.exists(self._keys.denied(key)))

    # -- internals: writes ------------------------------------------------------------------

    def _register_args(self, session: Session, node: str) -> list[Any]:
        """The arguments of the REGISTER script writing ``session`` under ``node``."""
        fields, truncated = session_fields(session, node, self.policy)
        if truncated and not self._truncation_logged:
            self._truncation_logged = True
            log_warning(
                session.id,
                "headers of %s exceed max_stored_header_bytes=%d: those that do not fit are "
                "not stored in Redis (logged once per worker)",
                session.id,
                self.policy.max_header_bytes,
            )
        groups = sorted(session.groups)
        args: list[Any] = [
            self._keys.prefix,
            node,
            self._incarnation,
            int(self.settings.index_ttl),
            session.id,
            session.user_key or "",
            len(groups),
            *groups,
        ]
        for name, value in fields.items():
            args += [name, value]
        return args

    async def _register(self, session: Session) -> None:
        """Write ``session`` under this worker's id (a full rewrite: data, user key, groups).
        The caller bounds it in time."""
        for _ in range(3):
            node = self.node_id
            args = self._register_args(session, node)
            known = session.id in self._written
            self._written.add(session.id)  # before the reply: see _written
            result = int(await self._scripts["REGISTER"](keys=self._route, args=args))
            if result == 1:
                session.node = node
                return
            if not known:
                self._written.discard(session.id)  # the script wrote nothing
            if result == -2:
                raise ValueError(
                    f"connection id {session.id!r} is already in use on another worker"
                )
            if result == 0:
                await self._renew()  # no lease (Redis restarted): take it, then write
            else:
                self._declared_lost(node)  # -1: write it under the new id
        raise RegistryUnavailable(
            f"could not register {session.id}: this worker keeps being declared lost"
        )

    async def _write_back(self, ids: list[str]) -> None:
        """Write these local sessions again (a resync), in one Redis step; those the batch
        could not write (no lease, declared lost meanwhile) are written one by one."""
        sessions = [
            s
            for i in ids
            if (s := self._local.local_session(i)) is not None
            and s.end_reason is None  # ending: its removal follows
            and s.state is not SessionState.CLOSED
        ]
        if not sessions:
            return
        node = self.node_id
        known = {s.id for s in sessions if s.id in self._written}
        self._written.update(s.id for s in sessions)  # before the reply: see _written
        async with self._bounded():
            results = await self._script_batch(
                "REGISTER", [self._register_args(s, node) for s in sessions]
            )
        for session, result in zip(sessions, results, strict=True):
            try:
                if int(result) == 1:
                    session.node = node
                    continue
                if session.id not in known:
                    self._written.discard(session.id)  # the script wrote nothing
                async with self._bounded():
                    await self._register(session)
            except ValueError as exc:
                log_error(session.id, "cannot register %s again: %s", session.id, exc)

    async def _script_batch(self, name: str, calls: list[list[Any]]) -> list[Any]:
        """Run the script ``name`` once per argument list: one pipeline on one Redis, a call
        each on a cluster (its pipelines refuse scripts) or for one call (a pipeline asks SCRIPT
        EXISTS first). The caller bounds it in time."""
        script = self._scripts[name]
        if len(calls) == 1 or self._mode.cluster:
            return [await script(keys=self._route, args=args) for args in calls]
        # A with block: redis-py's pipeline takes its connection for SCRIPT EXISTS before its
        # own cleanup starts, and kept it for good when that call failed or timed out.
        async with self.redis.pipeline(transaction=False) as pipe:
            for args in calls:
                await script(keys=self._route, args=args, client=pipe)
            return list(await pipe.execute())

    async def _mirror_membership(self, session_id: str, group: str, *, join: bool) -> None:
        """Write a local join or leave to Redis (or leave it to the next resync)."""
        if self._state is not LinkState.AVAILABLE:
            self._unwritten.add(session_id)
            return
        try:
            async with self._bounded():
                if join:
                    owner = await self._scripts["JOIN"](
                        keys=self._route,
                        args=[self._keys.prefix, session_id, group, int(self.settings.index_ttl)],
                    )
                    if not owner:  # not written yet (an outage): the resync writes it whole
                        self._unwritten.add(session_id)
                else:
                    await self._scripts["LEAVE"](
                        keys=self._route, args=[self._keys.prefix, session_id, group]
                    )
        except _redis_errors() as exc:
            self._unwritten.add(session_id)
            self._fail(exc)

    async def _remove_in_redis(self, session_id: str) -> None:
        await self._scripts["REMOVE"](
            keys=self._route, args=[self._keys.prefix, session_id, self.node_id]
        )

    async def _publish(self, node: str, op: str, **fields: Any) -> None:
        await self._mode.publish(
            self.redis, self._keys.channel(node), encode_envelope(op, **fields)
        )

    def _queue_publish(
        self, pipe: Any, channel: str, data: str, later: list[tuple[str, str]]
    ) -> None:
        """Publish ``data`` with ``pipe`` on one Redis; on a cluster, append it to ``later``
        (redis-py's cluster pipelines refuse PUBLISH): see :meth:`_publish_later`."""
        if self._mode.cluster:
            later.append((channel, data))
        else:
            pipe.publish(channel, data)

    async def _publish_later(self, later: list[tuple[str, str]]) -> None:
        for channel, data in later:
            await self._mode.publish(self.redis, channel, data)

    async def _live_members(self, key: str) -> list[str]:
        return list(
            await self._scripts["LIVE_MEMBERS"](keys=self._route, args=[self._keys.prefix, key])
        )

    async def _refresh_index_ttls(self) -> None:
        """Renew the TTL of the group and user sets this worker's sessions are in (their
        safety-net expiry must never catch a set with live members)."""
        keys: set[str] = set()
        for session in self._local.snapshot():
            keys.update(self._keys.group(g) for g in session.groups)
            if session.user_key is not None:
                keys.add(self._keys.user(session.user_key))
        ttl = int(self.settings.index_ttl)
        ordered = sorted(keys)
        for start in range(0, len(ordered), 1000):
            await self._keep_lease()
            async with self._bounded():
                pipe = self.redis.pipeline(transaction=False)
                for key in ordered[start : start + 1000]:
                    pipe.expire(key, ttl)
                await pipe.execute()

    # -- internals: reads and fan-out ------------------------------------------------------

    async def _read_sessions(self, ids: list[str]) -> list[Session]:
        manager = self._bound()
        local = self._local.local_session
        remote = [i for i in ids if local(i) is None]
        pipe = self.redis.pipeline(transaction=False)
        for session_id in remote:
            pipe.hgetall(self._keys.session(session_id))
            pipe.smembers(self._keys.session_groups(session_id))
        replies = await pipe.execute() if remote else []
        rebuilt: dict[str, Session] = {}
        for n, session_id in enumerate(remote):
            fields, groups = replies[2 * n], replies[2 * n + 1]
            if fields:
                rebuilt[session_id] = rebuild_session(manager, session_id, fields, groups)
        found: list[Session] = []
        for session_id in ids:
            session = local(session_id) or rebuilt.get(session_id)
            if session is not None:
                found.append(session)
        return found

    async def _remote_owners(self, ids: Iterable[str]) -> dict[str, list[str]]:
        remote = [i for i in ids if self._local.local_session(i) is None]
        pipe = self.redis.pipeline(transaction=False)
        for session_id in remote:
            pipe.hget(self._keys.session(session_id), "node")
        owners = await pipe.execute() if remote else []
        by_node: dict[str, list[str]] = defaultdict(list)
        for session_id, owner in zip(remote, owners, strict=True):
            if owner and owner != self.node_id:  # '': detached, no worker holds it
                by_node[owner].append(session_id)
        return by_node

    async def _record_for_all(self, key: str, message: Message, exclude: str | None) -> int | None:
        """With resumption: record ``message`` for every member of the set ``key`` (this
        worker's included, in one script: see RedisJournal.record_for, so no member falls
        between a local and a remote part); how many it recorded, or ``None`` without a journal
        or when Redis cannot take it (the caller then sends as in an outage, unnumbered)."""
        if self._journal is None or self._state is not LinkState.AVAILABLE:
            return None
        try:
            async with self._bounded():
                recorded = await self._journal.record_for(message, key=key, exclude=exclude)
        except _redis_errors() as exc:
            self._fail(exc)
            return None
        self._stats_send(SendResult.QUEUED, recorded)
        return recorded

    async def _fan_out(
        self, local: list[Session], key: str, message: Message, exclude: str | None
    ) -> int:
        reached = await self._local.send_to(local, message, exclude)
        if self._state is not LinkState.AVAILABLE or self._journal is not None:
            return reached  # (with a journal: it could not record, as in an outage)
        try:
            async with self._bounded():
                ids = set(await self.redis.smembers(key))
                ids.discard(exclude)
                for owner, owned in (await self._remote_owners(ids)).items():
                    await self._publish(owner, "send", ids=owned, message=message)
                    reached += len(owned)
                    self._stats_send(SendResult.QUEUED, len(owned))
        except _redis_errors() as exc:
            self._fail(exc)
        return reached

    # -- presence -----------------------------------------------------------------------------

    async def publish_presence(self, changes: list[PresenceChange]) -> None:
        """Store this worker's presence changes in its presence hash and publish them on the
        broadcast channel, in one round trip. Skipped while Redis is unreachable: when it is
        back the worker writes and publishes its presence in full again (see
        :meth:`_presence_reset`)."""
        if self._state is not LinkState.AVAILABLE or not changes:
            return
        try:
            async with self._bounded():
                later: list[tuple[str, str]] = []
                pipe = self.redis.pipeline(transaction=False)
                _write_presence(pipe, self._keys.presence(self.node_id), changes)
                envelope = encode_envelope("presence", origin=self.node_id, changes=changes)
                self._queue_publish(pipe, self._keys.broadcast, envelope, later)
                await pipe.execute()
                await self._publish_later(later)
        except _redis_errors() as exc:
            self._fail(exc)

    async def _publish_presence_as(self, origin: str, changes: list[PresenceChange]) -> None:
        """Write ``changes`` to ``origin``'s presence hash and publish them as ``origin``'s
        (entries of detached sessions, see ``_redis_journal.DETACHED_NODE``). The caller bounds
        it in time and handles Redis errors."""
        later: list[tuple[str, str]] = []
        pipe = self.redis.pipeline(transaction=False)
        _write_presence(pipe, self._keys.presence(origin), changes)
        envelope = encode_envelope("presence", origin=origin, changes=changes)
        self._queue_publish(pipe, self._keys.broadcast, envelope, later)
        await pipe.execute()
        await self._publish_later(later)

    async def load_presence(self) -> dict[str, list[PresenceChange]]:
        """The other workers' presence entries, from their presence hashes.

        Raises:
            RegistryUnavailable: Redis is unreachable.
        """
        async with self._cluster("presence"):
            nodes = [n for n in await self.redis.smembers(self._keys.nodes) if n != self.node_id]
            nodes.append(DETACHED_NODE)  # detached sessions whose worker has gone
            pipe = self.redis.pipeline(transaction=False)
            for node in nodes:
                pipe.hgetall(self._keys.presence(node))
            hashes = await pipe.execute() if nodes else []
        loaded: dict[str, list[PresenceChange]] = {}
        for node, entries in zip(nodes, hashes, strict=True):
            changes: list[PresenceChange] = []
            for field, value in entries.items():
                topic, session_id = json.loads(field)
                person, meta = json.loads(value)
                changes.append((topic, session_id, person, meta))
            if changes:
                loaded[node] = changes
        return loaded

    async def _presence_reset(self) -> None:
        """Write this worker's presence again in full, and tell the others to replace what they
        hold for it (after an outage, whose changes were not published, and at start, which
        also clears what a crashed previous start under this node id left). One round trip;
        nothing is published when there is nothing to replace."""
        presence = self._bound().presence_if_used
        tracked = presence.tracked_here() if presence is not None else []
        key = self._keys.presence(self.node_id)
        async with self._bounded():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            _write_presence(pipe, key, tracked)
            deleted, *_ = await pipe.execute()
            if not deleted and not tracked:
                return
            later: list[tuple[str, str]] = []
            pipe = self.redis.pipeline(transaction=False)
            envelope = encode_envelope("presence_lost", node=self.node_id)
            self._queue_publish(pipe, self._keys.broadcast, envelope, later)
            if tracked:
                envelope = encode_envelope("presence", origin=self.node_id, changes=tracked)
                self._queue_publish(pipe, self._keys.broadcast, envelope, later)
            if not self._mode.cluster:
                await pipe.execute()
            await self._publish_later(later)

    async def _presence_lost(self, node: str) -> None:
        """A lost worker's presence leaves everywhere: drop its hash, tell every worker (each
        sends the leaves as one diff per topic), and apply it here."""
        async with self._bounded():
            later: list[tuple[str, str]] = []
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self._keys.presence(node))
            envelope = encode_envelope("presence_lost", node=node)
            self._queue_publish(pipe, self._keys.broadcast, envelope, later)
            await pipe.execute()
            await self._publish_later(later)
        presence = self._bound().presence_if_used
        if presence is not None:
            presence.node_lost(node)

    # -- internals: the listener ------------------------------------------------------------

    async def _listen(self) -> None:
        me = asyncio.current_task()
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub()
            try:
                async with self._bounded():
                    await self._mode.subscribe(
                        pubsub, self._keys.channel(self.node_id), self._keys.broadcast
                    )
                self._subscribed.set()
                if self._journal is not None:
                    # What was published while this worker was not subscribed is in the
                    # journals: write it (no await here: the listener must listen).
                    task = asyncio.get_running_loop().create_task(self._catch_up())
                    self._waiters.add(task)
                    task.add_done_callback(self._waiters.discard)
                backoff = 0.05
                while True:
                    item = await self._mode.next_message(pubsub, timeout=1.0)
                    if item is not None:
                        await self._on_envelope(item["data"])
            except _redis_errors() as exc:
                log_warning(
                    None, "Redis pub/sub lost (%s); retrying in %.2fs", _describe(exc), backoff
                )
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    async with self._bounded():
                        await pubsub.aclose()
            if me is not None and me.cancelling():
                raise asyncio.CancelledError  # closing, whatever redis-py made of it
            await asyncio.sleep(backoff)  # reconnect back-off, not synchronisation
            backoff = min(backoff * 2, self.heartbeat / 2)

    async def _close_detached(self, ids: list[str], code: int, reason: str) -> int:
        """End those of ``ids`` that are detached (kick, revocation): the parking worker's copy
        when it is this worker, else here, rebuilt from Redis (disconnect hooks once, with the
        code and reason). Returns how many it ended."""
        manager = self._bound()
        resumption = manager.resumption
        journal = self._journal
        assert resumption is not None and journal is not None
        ended = 0
        for session_id in ids:
            parked = resumption.detached.get(session_id)
            if parked is not None:
                ended += resumption.close(parked, code, reason)
                continue
            async with self._cluster("close"):
                session = await journal.end_detached(
                    session_id, EndReason.SERVER_CLOSED, code, reason
                )
            if session is not None:
                await end_without_connection(
                    manager, session, EndReason.SERVER_CLOSED, code, reason
                )
                ended += 1
        return ended

    async def _catch_up(self) -> None:
        journal = self._journal
        assert journal is not None
        try:
            await journal.catch_up(self._local.snapshot())
        except _redis_errors() as exc:
            self._fail(exc)
        except Exception:
            log_error(None, "catching up with the journals failed", exc=True)

    async def _sweep(self) -> None:
        """End the detached sessions nobody else will end (see ``RedisJournal.sweep``): one
        Redis step here; the rest of each ending, hooks included, is queued (see
        :class:`Endings`), so slow hooks never hold the heartbeat."""
        journal = self._journal
        assert journal is not None
        try:
            swept = await journal.sweep(scripts.TOMBSTONE_SECONDS)
        except BaseException:
            self._taken_unread = True  # it may have ended some (a lost reply): read later
            raise
        if swept:
            await self._collect_taken()

    async def _end_swept(
        self,
        session_id: str,
        stored: dict[str, str],
        groups: list[str],
        reason: EndReason = EndReason.RESUME_EXPIRED,
        code: int | None = None,
        close_reason: str | None = None,
    ) -> None:
        """End a detached session this worker took (swept, or closed without an answer): tell
        its parking worker, then its disconnect hooks (once: Redis has ended it already,
        whatever happens here)."""
        journal = self._journal
        assert journal is not None
        try:
            await journal.finish_swept(session_id, stored)
        except _redis_errors() as exc:
            self._fail(exc)
        except Exception:
            log_error(session_id, "announcing the end of detached %s failed", session_id, exc=True)
        try:
            session = journal.rebuild_swept(session_id, stored, groups)
            await end_without_connection(self._bound(), session, reason, code, close_reason)
        except Exception:
            log_error(session_id, "ending detached %s failed", session_id, exc=True)

    def _restart_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _on_envelope(self, raw: str | bytes) -> None:
        """Handle one message from the cluster. Never waits for a client: the listener serves
        every session of this worker (see :meth:`_offer`)."""
        try:
            op, fields, message = decode_envelope(raw)
        except (ValueError, KeyError) as exc:
            log_error(None, "ignoring a malformed message on %s: %s", self.prefix, exc)
            return
        local = self._local
        try:
            if op in ("presence", "presence_lost"):
                self._on_presence(op, fields)
                return
            if op == "broadcast":
                if fields.get("origin") != self.node_id and message is not None:
                    exclude = fields.get("exclude")
                    self._offer_all([s for s in local.snapshot() if s.id != exclude], message)
                return
            if op == "rsend" and message is not None:
                self._on_numbered(fields["items"], message)
                return
            if op == "moved":
                self._on_moved([str(i) for i in fields.get("ids", ())], str(fields["to"]))
                return
            if op == "ended":
                self._on_ended([str(i) for i in fields.get("ids", ())])
                return
            targets = [
                s for i in fields.get("ids", ()) if (s := local.local_session(i)) is not None
            ]
            if op == "take":
                for session in targets:
                    close_session(
                        self._bound(),
                        session,
                        TAKEN_OVER,
                        "resumed by a new connection",
                        resumable=True,
                    )
                return
            if op == "send" and message is not None:
                self._offer_all(targets, message)
            elif op == "close":
                code, reason = int(fields.get("code", 1000)), str(fields.get("reason", ""))
                for session in targets:
                    close_session(self._bound(), session, code, reason)
            elif op in ("join", "leave"):
                group = str(fields["group"])
                for session in targets:
                    if op == "join":
                        await local.join(session.id, group)
                    else:
                        await local.leave(session.id, group)
        except Exception:
            log_error(None, "failed to handle a %r message from the cluster", op, exc=True)

    def _on_moved(self, ids: list[str], node: str) -> None:
        """Sessions this worker parked were resumed on ``node``: drop the copies here; their
        presence entries become ``node``'s (no leave) and leave this worker's presence hash."""
        manager = self._bound()
        if manager.resumption is not None:
            for session_id in ids:
                manager.resumption.drop(session_id)
        presence = manager.presence_if_used
        if presence is None:
            return
        fields = [
            json.dumps(list(key), separators=(",", ":"))
            for session_id in ids
            for key in presence.hand_over(session_id, node)
        ]
        if fields:
            task = asyncio.get_running_loop().create_task(self._forget_presence(fields))
            self._waiters.add(task)
            task.add_done_callback(self._waiters.discard)

    def _on_ended(self, ids: list[str]) -> None:
        """Sessions this worker parked were ended in Redis by another worker (kicked, or
        resumed from too far behind): drop the copies here; their presence leaves."""
        manager = self._bound()
        if manager.resumption is None:
            return
        for session_id in ids:
            copy = manager.resumption.drop(session_id)
            if copy is not None:
                manager._end_presence(copy)

    async def _forget_presence(self, fields: list[str]) -> None:
        try:
            async with self._bounded():
                await self.redis.hdel(self._keys.presence(self.node_id), *fields)
        except _redis_errors() as exc:
            self._fail(exc)  # the full rewrite after an outage drops them

    def _on_numbered(self, items: list[list[Any]], message: Message) -> None:
        """Messages another worker recorded for sessions here (``[id, number]`` pairs)."""
        manager = self._bound()
        counts: dict[SendResult, int] = {}
        for session_id, seq in items:
            session = self._local.local_session(str(session_id))
            if session is not None:
                result = deliver_numbered(manager, session, int(seq), message)
                counts[result] = counts.get(result, 0) + 1
        manager.stats.sends.update(counts)

    def _on_presence(self, op: str, fields: dict[str, Any]) -> None:
        """Apply another worker's presence changes, or drop a lost worker's presence."""
        if op == "presence":
            origin = str(fields["origin"])
            if origin != self.node_id:
                changes = [(str(t), str(i), str(p), m) for t, i, p, m in fields["changes"]]
                self._bound().presence.apply_remote(origin, changes)
            return
        presence = self._bound().presence_if_used
        node = str(fields["node"])
        if presence is not None and node != self.node_id:
            presence.node_lost(node)

    def _offer_all(self, targets: list[Session], message: Message) -> None:
        manager = self._bound()
        counts: dict[SendResult, int] = {}
        for session in targets:
            result = self._offer(manager, session, message)
            if result is not None:
                counts[result] = counts.get(result, 0) + 1
        manager.stats.sends.update(counts)

    def _offer(
        self, manager: SessionManager, session: Session, message: Message
    ) -> SendResult | None:
        """Hand ``message`` to ``session`` without waiting. When the ``wait`` policy must wait
        for room, the message (and every later one for that session from the cluster, so one
        sender's order holds) waits in a per-session queue drained by its own task, bounded by
        ``send_timeout`` per message and ``max_backlog`` messages. ``None``: counted later."""
        waiting = self._waiting.get(session.id)
        if waiting is not None:
            if len(waiting) >= manager.settings.max_backlog:
                close_slow_consumer(manager, session)
                return SendResult.GONE
            waiting.append(message)
            return None
        result = try_deliver(manager, session, message)
        if result is not None:
            return result
        queue: deque[Message] = deque([message])
        self._waiting[session.id] = queue
        task = asyncio.get_running_loop().create_task(self._deliver_waiting(session, queue))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)
        return None

    async def _deliver_waiting(self, session: Session, queue: deque[Message]) -> None:
        manager = self._bound()
        try:
            while queue:
                await deliver(manager, session, queue[0])  # counts its own result
                queue.popleft()
        finally:
            if self._waiting.get(session.id) is queue:
                del self._waiting[session.id]

    # -- internals: the heartbeat, noticing lost workers, healing ---------------------------

    async def _beat(self) -> None:
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(self.heartbeat / 2)  # the renewal period
            try:
                await self._tick()
            except _outage_errors() as exc:
                self._fail(exc)
            except Exception:
                log_error(None, "Redis registry heartbeat failed", exc=True)
            if task is not None and task.cancelling():
                # redis-py may turn a cancellation into an error or a normal return: the
                # registry is closing, whatever the call said.
                raise asyncio.CancelledError

    async def _tick(self) -> None:
        """Renew the lease; write what Redis missed; look for lost workers; sweep. Each Redis
        step is bounded by ``command_timeout``; a long tick (a resync of thousands of sessions)
        renews the lease between its steps, and no hook runs here (see :class:`Endings`): the
        lease never lapses while Redis and the event loop are fine."""
        async with self._bounded():
            await self._renew()
        if self._state is LinkState.OUTAGE:
            self._enter(LinkState.RESYNCING)
        if self._state is LinkState.STARTING:
            self._enter(LinkState.RESYNCING)
        if self._state is LinkState.RESYNCING:
            await self._resync()
        if self._state is not LinkState.AVAILABLE:
            return
        if self._taken_unread:
            await self._collect_taken()
            if self._state is not LinkState.AVAILABLE:
                return
        await self._check_nodes()
        if self._journal is not None and len(self._endings) < _SWEEP_BACKLOG:
            # (With a backlog of endings, the sessions wait in Redis: another worker's sweep, or
            # a later one here, takes them.)
            await self._sweep()
        if monotonic() - self._ttl_refreshed_at > self.settings.index_ttl / 3:
            await self._refresh_index_ttls()
            self._ttl_refreshed_at = monotonic()

    async def _renew(self) -> None:
        """Renew this worker's lease (under a new node id if the cluster declared it lost)."""
        state = 1
        for _ in range(2):
            node = self.node_id
            self._token += 1
            self._renewed_at = monotonic()
            state = int(
                await self._scripts["HEARTBEAT"](
                    keys=self._route,
                    args=[
                        self._keys.prefix,
                        node,
                        self._incarnation,
                        self._token,
                        int(self.lease_ttl * 1000),
                    ],
                )
            )
            if state != -1:
                break
            self._declared_lost(node)  # then take a lease under the new id
        if state == 0 and self._state is not LinkState.STARTING:
            # Our lease was gone: Redis lost its data, or we were cut off or blocked past it.
            # Write everything again, and give the others a lease to come back before judging.
            self._recovered_at = monotonic()
            self._mark_all_unwritten()

    async def _keep_lease(self) -> None:
        """Renew the lease if half a heartbeat went by since the last renewal: called between
        the steps of a long tick, so the lease never lapses meanwhile."""
        if monotonic() - self._renewed_at >= self.heartbeat / 2:
            async with self._bounded():
                await self._renew()

    async def _resync(self) -> None:
        """Replay missed removals, write every unwritten local session; then available. In
        batches (a pipeline each on one Redis; a call each on a cluster, whose pipelines refuse
        scripts), renewing the lease between them: thousands of sessions on a slow link take
        longer than the lease."""
        size = 1 if self._mode.cluster else _RESYNC_BATCH
        removals = list(self._pending_removals)
        for start in range(0, len(removals), size):
            await self._keep_lease()
            batch = removals[start : start + size]
            async with self._bounded():
                await self._script_batch(
                    "REMOVE", [[self._keys.prefix, i, self.node_id] for i in batch]
                )
            self._pending_removals.difference_update(batch)
        unwritten = list(self._unwritten)
        for start in range(0, len(unwritten), size):
            await self._keep_lease()
            batch = unwritten[start : start + size]
            self._unwritten.difference_update(batch)  # before the write: a change re-adds one
            try:
                await self._write_back(batch)
            except BaseException:
                self._unwritten.update(batch)
                raise
        if not self._unwritten and not self._pending_removals:
            self._enter(LinkState.AVAILABLE)
            await self._presence_reset()

    def _declared_lost(self, node: str) -> None:
        """The cluster declared this worker lost (it was cut off or blocked past its lease, or
        a restart under its node id took over) and ran the node-lost hooks of the sessions it
        had registered: close those, and carry on under a new node id with the others."""
        if node != self.node_id:
            return  # handled already
        victims = [s for s in self._local.snapshot() if s.id in self._written]
        self._written = set()
        self.node_id = f"{node.split('~')[0]}~{secrets.token_hex(3)}"
        for session in self._local.snapshot():
            session.node = self.node_id
        self._mark_all_unwritten()
        self._restart_listener()
        log_error(
            None,
            "this worker was declared lost by the cluster (cut off from Redis or blocked for "
            "more than lease_ttl=%ss); closing %d session(s) whose node-lost hooks already ran; "
            "new node id %s",
            self.lease_ttl,
            len(victims),
            self.node_id,
        )
        manager = self._bound()
        for session in victims:
            log_warning(session.id, "%s was ended as node lost by the cluster: closing", session.id)
            # With resumption the cluster made these sessions detached in Redis (not ended):
            # they detach here too, and parking finds them the cluster's (no hooks here);
            # their clients resume on any worker.
            close_session(
                manager,
                session,
                _LOST_CLOSE_CODE,
                "node lost",
                end_reason=EndReason.NODE_LOST,
                resumable=self._journal is not None,
            )

    async def _take_over_previous_incarnation(self) -> None:
        """At start: if an earlier start under this node id (a fixed ``node_id``) left a lease
        or sessions, it crashed (or stalled): make sure it is not alive, take its lease, and
        end its sessions as node lost (hooks once, in a task). Raises ConfigurationError when
        another live worker uses this node id."""
        node = self.node_id
        keys = self._keys
        seen: str | None = None
        since = monotonic()
        deadline = since + self.lease_ttl + self.heartbeat
        while True:  # bounded by the deadline (the old lease expires within lease_ttl)
            async with self._bounded():
                pipe = self.redis.pipeline(transaction=False)
                pipe.get(keys.lease(node))
                pipe.scard(keys.node_sessions(node))
                lease, owned = await pipe.execute()
            if lease is None and not int(owned):
                return  # a clean start
            if lease is None:
                break
            now = monotonic()
            if seen is not None and lease != seen:
                raise ConfigurationError(
                    f"node_id: {node!r} is in use by another live worker (its lease is renewed)"
                )
            if seen is None:
                seen, since = lease, now
            async with self._bounded():
                listeners = await self._mode.listeners(self.redis, [keys.channel(node)])
            listening = listeners.get(keys.channel(node), 0) > 0
            if (not listening and now - since >= 0.75 * self.heartbeat) or now > deadline:
                break
            await asyncio.sleep(self.heartbeat / 4)  # the old worker's renewal period / 2
        self._token += 1
        async with self._bounded():
            left = int(
                await self._scripts["TAKE_OVER"](
                    keys=self._route,
                    args=[
                        self._keys.prefix,
                        node,
                        lease or "",
                        self._incarnation,
                        self._token,
                        int(self.lease_ttl * 1000),
                        scripts.TOMBSTONE_SECONDS,
                    ],
                )
            )
        if left == -1:
            raise ConfigurationError(
                f"node_id: {node!r} is in use by another live worker (its lease is renewed)"
            )
        if left == -2:
            self._declared_lost(node)  # the cluster healed it already: start under a new id
            return
        if left > 0:
            log_warning(
                None,
                "a previous start of worker %s left %d session(s): ending them as node lost",
                node,
                left,
            )
            try:
                await self._claim_sessions(node)
            finally:
                await run_shielded(self._collect_taken())

    async def _check_nodes(self) -> None:
        """Start healing each worker that is lost: lease expired, or (faster) no pub/sub
        subscription and an unchanged lease token for a heartbeat."""
        if monotonic() - self._recovered_at < self.lease_ttl:
            return  # we were cut off ourselves: let the others renew before judging them
        async with self._bounded():
            redis = self.redis
            others = [n for n in await redis.smembers(self._keys.nodes) if n != self.node_id]
            for node in list(self._suspects):
                if node not in others:
                    del self._suspects[node]
            if not others:
                return
            pipe = redis.pipeline(transaction=False)
            for node in others:
                pipe.get(self._keys.lease(node))
            tokens = await pipe.execute()
            channels = [self._keys.channel(n) for n in others]
            subscribers = await self._mode.listeners(redis, channels)
        now = monotonic()
        for node, token in zip(others, tokens, strict=True):
            if node in self._healing:
                continue
            if token is None:
                expected = ""  # the lease expired
            elif subscribers.get(self._keys.channel(node), 0) == 0:
                seen = self._suspects.get(node)
                if seen is None or seen[0] != token:
                    self._suspects[node] = (token, now)
                    continue
                if now - seen[1] < 0.75 * self.heartbeat:
                    continue
                expected = token  # not listening, not renewing: its process is gone
            else:
                self._suspects.pop(node, None)
                continue
            self._suspects.pop(node, None)
            task = asyncio.get_running_loop().create_task(self._heal(node, expected))
            self._healing[node] = task

    async def _heal(self, node: str, expected: str) -> None:
        """Declare ``node`` lost and claim its sessions (in this task: the heartbeat goes on
        meanwhile), then queue their node-lost endings (see :class:`Endings`), even when
        cancelled or failing part-way: every session claimed gets its hooks once."""
        try:
            async with self._bounded():
                declared = await self._scripts["DECLARE_LOST"](
                    keys=self._route,
                    args=[
                        self._keys.prefix,
                        node,
                        expected,
                        self.node_id,
                        scripts.TOMBSTONE_SECONDS,
                    ],
                )
            if not int(declared):
                return  # it renewed its lease meanwhile: alive
            log_warning(None, "worker %s is lost: ending its sessions as node lost", node)
            self._taken_unread = True
            async with self._bounded():
                # What it took from another lost worker and had not read yet ends here too.
                await self._scripts["ADOPT_TAKEN"](
                    keys=self._route,
                    args=[self._keys.prefix, node, self.node_id, scripts.TOMBSTONE_SECONDS],
                )
            await self._claim_sessions(node)
            async with self._bounded():
                await self._scripts["FORGET_NODE"](keys=self._route, args=[self._keys.prefix, node])
            await self._presence_lost(node)
        except _redis_errors() as exc:
            self._fail(exc)
        except Exception:
            log_error(None, "healing lost worker %s failed", node, exc=True)
        finally:
            try:
                if self._state is not LinkState.OUTAGE:  # (else the heartbeat reads it later)
                    await run_shielded(self._collect_taken())
            finally:
                self._healing.pop(node, None)

    async def _claim_sessions(self, node: str) -> None:
        """Claim every session ``node`` still owns (each claim atomic: a session is claimed by
        one worker only) into this worker's taken hash (see :meth:`_collect_taken`)."""
        for _ in range(1000):  # bounded: each round empties what it saw
            async with self._bounded():
                ids = list(await self.redis.smembers(self._keys.node_sessions(node)))
            if not ids:
                break
            for start in range(0, len(ids), _CLAIM_BATCH):
                batch = ids[start : start + _CLAIM_BATCH]
                self._taken_unread = True
                async with self._bounded():
                    await run_shielded(self._claim_batch(node, batch))

    async def _claim_batch(self, node: str, batch: list[str]) -> None:
        """CLAIM ``batch``, shielded: a claim cancelled once sent may still run in Redis, and
        the read of the taken hash that follows (:meth:`_collect_taken`) must come after it."""
        async with Deadline(self.command_timeout):  # (shielded from the caller's)
            # One script per batch (redis-py's cluster pipelines refuse scripts).
            await self._scripts["CLAIM"](
                keys=self._route,
                args=[
                    self._keys.prefix,
                    node,
                    self._window_ms(),
                    self.node_id,
                    scripts.TOMBSTONE_SECONDS,
                    *batch,
                ],
            )

    async def _collect_taken(self) -> None:
        """Queue the endings of the sessions CLAIM or SWEEP took for this worker: read the
        taken hash, delete what was read, queue each ending once (see :meth:`_end_taken`).

        Why they wait in Redis (issue 17): the script takes the sessions as it runs, and its
        reply was the only record of which ones; a reply that came after ``command_timeout``
        (or never) left their hooks unrun anywhere. Here a failed read is read again (by the
        heartbeat, once Redis answers). Deleted before their hooks run, and remembered here
        until a delete is known to have happened: a lost delete reply queues nothing twice,
        and no other worker (adopting this one's hash when it dies) runs them again."""
        async with self._taken_lock:
            key = self._keys.taken(self.node_id)
            self._taken_unread = False
            try:
                # In pages (a lost worker's 50k sessions are one hash): one pass of HSCAN, each
                # page deleted as it is read, so none comes back in the same pass.
                cursor = 0
                for _ in range(1_000_000):  # bounded: one pass over the hash
                    async with self._bounded():
                        cursor, page = await self.redis.hscan(key, cursor, count=_CLAIM_BATCH)
                    if page:
                        await self._queue_taken(key, page)
                    if not cursor:
                        break
            except _redis_errors() as exc:
                self._taken_unread = True
                self._fail(exc)
            except BaseException:
                self._taken_unread = True
                raise

    async def _queue_taken(self, key: str, page: dict[str, str]) -> None:
        """Delete ``page`` (read from the taken hash ``key``), then queue the endings in it not
        queued before (see :meth:`_collect_taken`). Entries whose END_DETACHED is still in
        flight are left alone: its caller ends them, or they are read again."""
        page = {k: v for k, v in page.items() if k not in self._taken_asked}
        if not page:
            return
        fresh = {k: v for k, v in page.items() if k not in self._taken_queued}
        self._taken_queued.update(fresh)
        try:
            async with self._bounded():
                await self.redis.hdel(key, *page)
            self._taken_queued.difference_update(page)
        finally:
            for session_id, raw in fresh.items():
                self._endings.add(functools.partial(self._end_taken, session_id, raw))

    def _taken_asking(self, session_id: str) -> None:
        """END_DETACHED of ``session_id`` is about to be sent (see RedisJournal.end_detached)."""
        self._taken_asked.add(session_id)

    def _taken_answered(self, session_id: str, *, won: bool) -> None:
        """END_DETACHED of ``session_id`` ended. ``won``: answered, and its caller ends the
        session, so the taken entry is only deleted (:meth:`_forget_taken`); else (no answer,
        or what followed it failed) Redis may have ended it: the next read of the taken hash
        ends it."""
        self._taken_asked.discard(session_id)
        if won:
            self._taken_queued.add(session_id)
        else:
            self._taken_unread = True

    async def _forget_taken(self, session_id: str) -> None:
        """Delete the taken entry of a session whose END_DETACHED this worker won, at once:
        while it is there, a worker that heals this one would end it again. If the delete
        fails, the next read of the taken hash deletes it without ending it."""
        deleted = False
        try:
            async with self._bounded():
                await self.redis.hdel(self._keys.taken(self.node_id), session_id)
            deleted = True
            self._taken_queued.discard(session_id)
        except Exception as exc:
            if isinstance(exc, _redis_errors()):
                self._fail(exc)
            else:
                log_error(session_id, "forgetting the end of %s failed", session_id, exc=True)
        finally:
            if not deleted:
                self._taken_unread = True

    async def _end_taken(self, session_id: str, raw: str) -> None:
        """End a session this worker took in Redis (see :meth:`_collect_taken`): swept (kind
        2), or claimed from a lost worker (1: resumable, detached instead; 0: ended)."""
        try:
            flat, groups, kind, *how = json.loads(raw)
            if not isinstance(groups, list):  # (Lua's JSON writes an empty table as {})
                groups = []
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            reason, code, close_reason = EndReason.RESUME_EXPIRED, None, None
            if kind == _CLOSED:
                name, code, close_reason = json.loads(how[0])
                reason = EndReason(name)
        except (ValueError, TypeError, IndexError):
            log_error(session_id, "cannot end %s: unreadable entry %r", session_id, raw)
            return
        if kind in (_SWEPT, _CLOSED):
            resumption = self._bound().resumption
            if resumption is not None and resumption.end_unanswered(
                session_id, reason, code, close_reason
            ):
                return  # parked here: this worker's own copy ends
            await self._end_swept(
                session_id, fields, [str(g) for g in groups], reason, code, close_reason
            )
        else:
            await self._end_lost(session_id, fields, groups, detached=bool(kind))

    async def _end_lost(
        self, session_id: str, fields: dict[str, str], groups: list[str], *, detached: bool
    ) -> None:
        """End (or detach, when resumable) a session claimed from a lost worker."""
        try:
            manager = self._bound()
            session = rebuild_session(manager, session_id, fields, set(groups))
            if detached:
                # Resumable: it waits for its client in Redis (any worker may resume it; the
                # sweep ends it after its window). Its detach hooks run here, once.
                session._end(EndReason.NODE_LOST, None, None)
                session.state = SessionState.DETACHED
                manager.stats.detached += 1
                await run_shielded(run_hooks(manager, session, manager.detach_hooks, "detach"))
                return
            await end_without_connection(manager, session, EndReason.NODE_LOST)
        except Exception:
            log_error(session_id, "node-lost teardown of %s failed", session_id, exc=True)

    # -- small helpers -----------------------------------------------------------------------

    def _window_ms(self) -> int:
        """The resume window in ms when resumption uses this registry, else 0."""
        if self._journal is None:
            return 0
        return int(self._bound().settings.resume_window * 1000)

    def _bound(self) -> SessionManager:
        if self._manager is None:
            raise RuntimeError("registry not bound: give it to a SessionManager first")
        return self._manager

    def _stats_send(self, result: SendResult, count: int = 1) -> None:
        if self._manager is not None and count:
            self._manager.stats.sends[result] += count

    @contextlib.asynccontextmanager
    async def _cluster(self, operation: str) -> Any:
        """Run a cluster-wide operation, bounded by ``command_timeout``; RegistryUnavailable
        unless Redis answers and holds every local session."""
        if self._state is not LinkState.AVAILABLE:
            raise RegistryUnavailable(
                f"{operation}: Redis is unreachable (or this worker is still writing its "
                "sessions back after an outage)"
            )
        try:
            async with self._bounded():
                yield
        except _redis_errors() as exc:
            self._fail(exc)
            raise RegistryUnavailable(f"{operation}: Redis unavailable: {_describe(exc)}") from exc


async def _stop(task: asyncio.Task[Any], grace: float = 2.0) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again (three times at most) if it
    lost a cancellation (redis-py may swallow one); never waits unboundedly, and never
    swallows a cancellation of the caller."""
    for _ in range(3):
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=grace)
        if done:
            if not task.cancelled() and task.exception() is not None:
                log_error(None, "a Redis registry task failed: %r", task.exception())
            return
    log_warning(None, "a Redis registry task did not stop when cancelled: left behind")


def _decodes(client: Any) -> bool:
    """Whether ``client`` answers with ``str`` (``decode_responses=True``)."""
    return bool(client.get_connection_kwargs().get("decode_responses"))


def _no_connection() -> BaseException:
    """What a call waiting for a connection gets when Redis turns out to be down."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    return RedisConnectionError("Redis unavailable: a call ahead of this one failed")


def _describe(exc: BaseException) -> str:
    """A short description of a Redis failure (a timeout has no message of its own)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer within command_timeout"
    return f"{type(exc).__name__}: {exc}"


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What counts as "Redis is unavailable": connection failures, timeouts (redis-py's and
    ``command_timeout``'s, an OSError), and error replies such as OOM or READONLY after a
    failover (a ResponseError), which must not fail connections either; on a cluster also
    its own errors (cluster down, a slot not covered, no node reachable)."""
    from redis.exceptions import ClusterError, RedisClusterException, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (
        RedisConnectionError,
        RedisTimeoutError,
        ResponseError,
        ClusterError,
        RedisClusterException,
        OSError,
    )


def _outage_errors() -> tuple[type[BaseException], ...]:
    """:func:`_redis_errors` plus this registry's own RegistryUnavailable."""
    return (*_redis_errors(), RegistryUnavailable)


def _write_presence(pipe: Any, key: str, changes: list[PresenceChange]) -> None:
    """Queue the writes of ``changes`` to a presence hash on ``pipe`` (in order: a later change
    of one entry wins)."""
    for topic, session_id, person, meta in changes:
        field = json.dumps([topic, session_id], separators=(",", ":"))
        if meta is None:
            pipe.hdel(key, field)
        else:
            pipe.hset(key, field, json.dumps([person, meta], separators=(",", ":")))
