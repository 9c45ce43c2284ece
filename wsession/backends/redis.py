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
Survivors declare it lost (a tombstone, atomic with its heartbeat), claim its sessions one by one
with an atomic script, so each lost session's disconnect hooks run once in the cluster, with
``end_reason`` ``node lost`` and the data stored at registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import defaultdict
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .._delivery import SendResult, close_session
from .._exceptions import ConfigurationError, RegistryUnavailable
from .._lifecycle import end_without_connection
from .._log import log_error, log_warning
from .._session import EndReason, Session, SessionState
from .._types import Message
from . import _redis_scripts as scripts
from ._base import SessionFilter
from ._redis_codec import (
    Keys,
    decode_envelope,
    encode_envelope,
    rebuild_session,
    session_fields,
)
from .memory import MemoryRegistry

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .._manager import SessionManager

_URL_SCHEMES = ("redis://", "rediss://", "unix://")
_LOST_CLOSE_CODE = 1012  # "service restart": the client may reconnect at once
_CLAIM_BATCH = 200


class RedisRegistry:
    """Live sessions of every worker, in one Redis (standalone, or a primary behind Sentinel;
    Redis Cluster is not supported).

    Args:
        url: a Redis URL (``redis://127.0.0.1:6379/0``, ``rediss://``, ``unix://``); or give
            ``client``.
        client: a ready ``redis.asyncio.Redis`` made with ``decode_responses=True`` (not closed
            by the registry).
        prefix: namespace of every key and channel, so several apps can share one Redis (no
            prefix may be another's prefix followed by ``:``).
        heartbeat: seconds between lease renewals (the registry renews twice per heartbeat). A
            worker that dies (kill -9, crash, OOM kill) is noticed within two heartbeats.
        lease_ttl: seconds a lease lives without renewal (default 5 heartbeats; longer than
            ``heartbeat``). A worker whose host vanishes, or that is cut off from Redis (or whose
            event loop is blocked) for longer than this, is declared lost.
        node_id: this worker's id (default: random).
        max_connections: size of the connection pool made from ``url``; callers beyond it
            wait for a free connection (up to 10 s) instead of failing.

    Raises:
        ConfigurationError: bad arguments (named in the message).

    Consistency notes:

    - A session's data is stored when it is registered (after its connect hooks); call
      :meth:`update_data` after changing it if other workers, or node-lost hooks, must see the
      change. Remote sessions are read-only snapshots (:class:`~wsession.backends._redis_codec.
      RemoteSession`): reach them through the manager.
    - A send to a session on another worker returns ``queued`` once published to its worker, or
      ``gone`` when the id is unknown or its worker is not listening. Messages published while a
      worker reconnects to Redis are lost (Redis pub/sub keeps nothing).
    - During a Redis outage local sessions keep working and local sends deliver; cluster-wide
      queries (``get`` of a remote id, ``count``, ``sessions``, ``members``, ``user_sessions``),
      sends and kicks aimed at another worker's session, and ``close_user`` (after closing the
      local ones) raise :class:`~wsession.RegistryUnavailable`; group, user and broadcast sends
      reach the local targets and return how many they reached. ``add`` and ``remove`` never
      raise for an outage: the worker writes its live sessions again when Redis is back, and
      answers cluster queries only once that is done.
    - The node-lost hooks of a lost worker's sessions run on the worker that claimed them; if
      that worker dies too before running them, they do not run (at most once). A worker that
      was alive but declared lost (cut off from Redis or blocked past ``lease_ttl``) finds its
      tombstone when it comes back: it closes those sessions with 1012, whose hooks then run a
      second time there, and carries on under a new node id.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "wsession",
        heartbeat: float = 1.0,
        lease_ttl: float | None = None,
        node_id: str | None = None,
        max_connections: int = 64,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigurationError("RedisRegistry: give exactly one of url and client")
        if url is not None and (not isinstance(url, str) or not url.startswith(_URL_SCHEMES)):
            raise ConfigurationError(
                f"url: expected redis://, rediss:// or unix:// (a Redis URL), got {url!r}"
            )
        if client is not None and not _decodes(client):
            raise ConfigurationError("client: RedisRegistry needs decode_responses=True")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigurationError(f"prefix: must be non-empty without spaces, got {prefix!r}")
        if not isinstance(heartbeat, int | float) or not heartbeat > 0:
            raise ConfigurationError(f"heartbeat: must be > 0 seconds, got {heartbeat!r}")
        if not isinstance(max_connections, int) or max_connections < 2:
            raise ConfigurationError(f"max_connections: must be >= 2, got {max_connections!r}")
        ttl = 5 * heartbeat if lease_ttl is None else lease_ttl
        if not isinstance(ttl, int | float) or not ttl > heartbeat:
            raise ConfigurationError(
                f"lease_ttl: must be longer than heartbeat ({heartbeat}s), got {ttl!r}"
            )
        if node_id is not None and (
            not isinstance(node_id, str) or not node_id or any(c.isspace() for c in node_id)
        ):
            raise ConfigurationError(f"node_id: must be non-empty without spaces, got {node_id!r}")
        self.url = url
        self.prefix = prefix
        self.heartbeat = float(heartbeat)
        self.lease_ttl = float(ttl)
        self.node_id = node_id or secrets.token_hex(8)
        """This worker's id in the cluster (``session.node`` of its sessions). It changes if the
        cluster declared this worker lost while it was alive."""
        self.max_connections = max_connections
        self._pool: Any = None
        self._keys = Keys(prefix)
        self._external_client = client
        self._client: Any = client
        self._scripts: dict[str, Any] = {}
        self._local = MemoryRegistry()
        self._manager: SessionManager | None = None
        self._listener: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._healing: dict[str, asyncio.Task[None]] = {}
        self._available = False  # Redis reachable and every local session written there
        self._recovered_at = float("-inf")  # when Redis came back after an outage (monotonic)
        self._outage = False  # Redis failed since the last successful heartbeat
        self._leased = False  # a lease was taken once: a missing one later means trouble
        self._dirty = False  # Redis missed writes: write every local session again
        self._pending_removals: set[str] = set()
        self._written: set[str] = set()  # ids registered in Redis under the current node id
        self._token = 0
        self._suspects: dict[str, tuple[str, float]] = {}  # node -> (lease token, first seen)

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self, manager: SessionManager) -> None:
        """Attach the owning manager (its settings drive delivery; its hooks run on node loss)."""
        self._local.bind(manager)
        self._manager = manager

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
        return self._available

    async def __aenter__(self) -> Self:
        """Connect, take this worker's lease, heal sessions of dead workers, start listening.

        Raises:
            RegistryUnavailable: Redis cannot be reached at start-up.
        """
        if self._client is None:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff

            assert self.url is not None
            # A blocking pool: a burst of sessions waits for a connection instead of failing
            # with "Too many connections" (redis-py's default pool raises at its limit). Few,
            # quick retries: an outage must be noticed fast (local work goes on meanwhile).
            self._pool = BlockingConnectionPool.from_url(
                self.url,
                decode_responses=True,
                max_connections=self.max_connections,
                timeout=10,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
            )
            self._client = Redis(connection_pool=self._pool)
        client = self._client
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in ("REGISTER", "REMOVE", "CLAIM", "HEARTBEAT", "DECLARE_LOST", "SEND")
        }
        self._scripts["FORGET_NODE"] = client.register_script(scripts.FORGET_NODE)
        try:
            await self._tick()
        except _redis_errors() as exc:
            raise RegistryUnavailable(f"cannot reach Redis: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._listener = loop.create_task(self._listen())
        self._beater = loop.create_task(self._beat())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):  # sends to our sessions need the subscription
                await self._subscribed.wait()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, finish node-lost hooks under way, give up the lease, close the
        client the registry opened."""
        for task in (self._beater, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._beater = self._listener = None
        if self._healing:
            # Their sessions are claimed already: give their hooks time to run.
            limit = self._manager.settings.drain_timeout if self._manager is not None else 10.0
            _, late = await asyncio.wait(list(self._healing.values()), timeout=limit)
            for task in late:
                task.cancel()
        client = self._client
        if client is None:
            return
        # Bounded: shutdown must not hang on an unreachable or busy Redis.
        with contextlib.suppress(*_redis_errors(), TimeoutError):
            async with asyncio.timeout(5):
                for session in await self._local.sessions():
                    await self._remove_in_redis(session.id)
                await client.delete(self._keys.lease(self.node_id))
                await client.srem(self._keys.nodes, self.node_id)
        self._available = False
        if self._external_client is None:
            with contextlib.suppress(*_redis_errors(), TimeoutError):
                async with asyncio.timeout(5):
                    await client.aclose()
                    if self._pool is not None:
                        await self._pool.aclose()
            self._client = self._pool = None

    # -- membership -----------------------------------------------------------------------

    async def add(self, session: Session) -> None:
        """Register a local session here and in Redis. Never raises because Redis is down (the
        failure is logged: the connection works, and the worker writes the session when Redis
        is back). Raises ``ValueError`` for an id already live here or on another worker."""
        await self._local.add(session)
        session.node = self.node_id
        if not self._available:
            self._dirty = True
            return
        try:
            await self._register(session)
        except ValueError:
            await self._local.remove(session)
            raise
        except _redis_errors() as exc:
            self._unavailable(exc)
            log_warning(
                session.id, "Redis unavailable, %s registered locally only: %s", session.id, exc
            )

    async def remove(self, session: Session) -> None:
        """Forget a local session here and in Redis (done later if Redis is down; never
        raises for an outage)."""
        if await self._local.get(session.id) is not session:
            return
        await self._local.remove(session)
        self._written.discard(session.id)
        if not self._available:
            self._pending_removals.add(session.id)
            return
        try:
            await self._remove_in_redis(session.id)
        except _redis_errors() as exc:
            self._unavailable(exc)
            self._pending_removals.add(session.id)
            log_warning(session.id, "Redis unavailable, %s removed locally only", session.id)

    async def update_data(self, session: Session) -> None:
        """Store this worker's ``session`` again (its ``data``, ``user_key``, ``subprotocol``
        and groups), for other workers and node-lost hooks to read.

        Raises:
            ValueError: ``session`` is not a live session of this worker.
            RegistryUnavailable: Redis is unreachable.
        """
        if await self._local.get(session.id) is not session:
            raise ValueError(f"update_data: {session.id} is not a live session of this worker")
        async with self._cluster("update_data"):
            await self._register(session)

    async def get(self, session_id: str) -> Session | None:
        """The session with this id on any worker (remote ones are read-only snapshots)."""
        local = await self._local.get(session_id)
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
        """Add a session of any worker to ``group``."""
        local = await self._local.get(session_id)
        if local is not None:
            if not await self._local.join(session_id, group):
                return False
            await self._mirror_membership(session_id, group, join=True)
            return True
        async with self._cluster("join"):
            owner = await self.redis.hget(self._keys.session(session_id), "node")
            if owner is None:
                return False
            await self._write_membership(session_id, group, join=True)
            await self._publish(owner, "join", ids=[session_id], group=group)
        return True

    async def leave(self, session_id: str, group: str) -> bool:
        """Remove a session of any worker from ``group``."""
        local = await self._local.get(session_id)
        if local is not None:
            left = await self._local.leave(session_id, group)
            if left:
                await self._mirror_membership(session_id, group, join=False)
            return left
        async with self._cluster("leave"):
            owner = await self.redis.hget(self._keys.session(session_id), "node")
            removed = await self._write_membership(session_id, group, join=False)
            if owner is not None:
                await self._publish(owner, "leave", ids=[session_id], group=group)
        return bool(removed)

    async def members(self, group: str) -> list[str]:
        """Ids of the members of ``group`` on every worker."""
        async with self._cluster("members"):
            return sorted(await self.redis.smembers(self._keys.group(group)))

    async def user_sessions(self, user_key: str) -> list[str]:
        """Ids of one user's sessions on every worker."""
        async with self._cluster("user_sessions"):
            return sorted(await self.redis.smembers(self._keys.user(user_key)))

    # -- delivery ---------------------------------------------------------------------------

    async def send(self, session_id: str, message: Message) -> SendResult:
        """Local sessions: delivered at once, no Redis round trip. Another worker's session:
        published to its worker in one round trip (``queued``). ``gone`` for an unknown id or
        a worker that is not listening. Raises RegistryUnavailable for a non-local id during a
        Redis outage."""
        if session_id in self._local._sessions:
            return await self._local.send(session_id, message)
        envelope = encode_envelope("send", ids=[session_id], message=message)
        async with self._cluster("send"):
            reply = await self._scripts["SEND"](args=[self.prefix, session_id, envelope])
        result = SendResult.GONE
        if reply and reply[0] != self.node_id and int(reply[1]) > 0:
            result = SendResult.QUEUED
        self._stats_send(result)
        return result

    async def send_group(self, group: str, message: Message, exclude: str | None = None) -> int:
        """Send to the members of ``group`` wherever they are (local ones first, at once)."""
        local = self._local._groups.get(group, {})
        return await self._fan_out(local, self._keys.group(group), message, exclude)

    async def send_user(self, user_key: str, message: Message) -> int:
        """Send to every session of ``user_key`` wherever it is (local ones first, at once)."""
        local = self._local._users.get(user_key, {})
        return await self._fan_out(local, self._keys.user(user_key), message, None)

    async def broadcast(self, message: Message, exclude: str | None = None) -> int:
        """Send to every open session of the cluster; local ones first, at once. Returns how
        many it reached (remote sessions counted as reached once published)."""
        reached = await self._local.broadcast(message, exclude)
        if not self._available:
            return reached
        keys = self._keys
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.publish(
                keys.broadcast,
                encode_envelope("broadcast", origin=self.node_id, exclude=exclude, message=message),
            )
            pipe.scard(keys.all)
            pipe.scard(keys.node_sessions(self.node_id))
            if exclude is not None and exclude not in self._local._sessions:
                pipe.sismember(keys.all, exclude)
            _, total, mine, *excluded = await pipe.execute()
        except _redis_errors() as exc:
            self._unavailable(exc)
            return reached
        remote = int(total) - int(mine) - (1 if excluded and excluded[0] else 0)
        self._stats_send(SendResult.QUEUED, max(0, remote))
        return reached + max(0, remote)

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close a session wherever it is; its disconnect hooks run once, on its worker. For
        another worker's session: True once its worker was told."""
        if session_id in self._local._sessions:
            return await self._local.close(session_id, code, reason)
        envelope = encode_envelope("close", ids=[session_id], code=code, reason=reason)
        async with self._cluster("close"):
            reply = await self._scripts["SEND"](args=[self.prefix, session_id, envelope])
        return bool(reply) and reply[0] != self.node_id and int(reply[1]) > 0

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of ``user_key`` wherever it is. The local ones are closed even
        when Redis is unreachable; then RegistryUnavailable tells that the others were not."""
        closed = await self._local.close_user(user_key, code, reason)
        async with self._cluster("close_user"):
            ids = await self.redis.smembers(self._keys.user(user_key))
            for owner, owned in (await self._remote_owners(ids)).items():
                await self._publish(owner, "close", ids=owned, code=code, reason=reason)
                closed += len(owned)
        return closed

    # -- internals: writes ------------------------------------------------------------------

    async def _register(self, session: Session) -> None:
        """Write ``session`` under this worker's id (a full rewrite: data, user key, groups)."""
        for _ in range(3):
            node = self.node_id
            fields = session_fields(session, node)
            groups = sorted(session.groups)
            args: list[str | int] = [
                self.prefix,
                node,
                session.id,
                session.user_key or "",
                len(groups),
                *groups,
            ]
            for name, value in fields.items():
                args += [name, value]
            result = int(await self._scripts["REGISTER"](args=args))
            if result == 1:
                session.node = node
                self._written.add(session.id)
                return
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

    async def _mirror_membership(self, session_id: str, group: str, *, join: bool) -> None:
        if not self._available:
            self._dirty = True
            return
        try:
            await self._write_membership(session_id, group, join=join)
        except _redis_errors() as exc:
            self._unavailable(exc)

    async def _write_membership(self, session_id: str, group: str, *, join: bool) -> int:
        keys = self._keys
        pipe = self.redis.pipeline(transaction=True)
        if join:
            pipe.sadd(keys.group(group), session_id)
            pipe.sadd(keys.session_groups(session_id), group)
        else:
            pipe.srem(keys.group(group), session_id)
            pipe.srem(keys.session_groups(session_id), group)
        changed, _ = await pipe.execute()
        return int(changed)

    async def _remove_in_redis(self, session_id: str) -> None:
        await self._scripts["REMOVE"](args=[self.prefix, session_id, self.node_id])

    async def _publish(self, node: str, op: str, **fields: Any) -> None:
        await self.redis.publish(self._keys.channel(node), encode_envelope(op, **fields))

    # -- internals: reads and fan-out ------------------------------------------------------

    async def _read_sessions(self, ids: list[str]) -> list[Session]:
        manager = self._bound()
        local = self._local._sessions
        remote = [i for i in ids if i not in local]
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
            session = local.get(session_id) or rebuilt.get(session_id)
            if session is not None:
                found.append(session)
        return found

    async def _remote_owners(self, ids: set[str] | list[str]) -> dict[str, list[str]]:
        remote = [i for i in ids if i not in self._local._sessions]
        pipe = self.redis.pipeline(transaction=False)
        for session_id in remote:
            pipe.hget(self._keys.session(session_id), "node")
        owners = await pipe.execute() if remote else []
        by_node: dict[str, list[str]] = defaultdict(list)
        for session_id, owner in zip(remote, owners, strict=True):
            if owner is not None and owner != self.node_id:
                by_node[owner].append(session_id)
        return by_node

    async def _fan_out(
        self, local: dict[str, Session], key: str, message: Message, exclude: str | None
    ) -> int:
        reached = await self._local._send_all(list(local.values()), message, exclude)
        if not self._available:
            return reached
        try:
            ids = set(await self.redis.smembers(key))
            ids.discard(exclude)
            for owner, owned in (await self._remote_owners(ids)).items():
                await self._publish(owner, "send", ids=owned, message=message)
                reached += len(owned)
                self._stats_send(SendResult.QUEUED, len(owned))
        except _redis_errors() as exc:
            self._unavailable(exc)
        return reached

    # -- internals: the listener ------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self._keys.channel(self.node_id), self._keys.broadcast)
                self._subscribed.set()
                backoff = 0.05
                while True:
                    item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if item is not None:
                        await self._on_envelope(item["data"])
            except _redis_errors() as exc:
                log_warning(None, "Redis pub/sub lost (%s); retrying in %.2fs", exc, backoff)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)  # reconnect back-off, not synchronisation
            backoff = min(backoff * 2, self.heartbeat / 2)

    def _restart_listener(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _on_envelope(self, raw: str | bytes) -> None:
        try:
            op, fields, message = decode_envelope(raw)
        except (ValueError, KeyError) as exc:
            log_error(None, "ignoring a malformed message on %s: %s", self.prefix, exc)
            return
        local = self._local
        try:
            if op == "broadcast":
                if fields.get("origin") != self.node_id and message is not None:
                    await local.broadcast(message, fields.get("exclude"))
                return
            ids = [i for i in fields.get("ids", ()) if i in local._sessions]
            if op == "send" and message is not None:
                await local._send_all([local._sessions[i] for i in ids], message, None)
            elif op == "close":
                for session_id in ids:
                    code, reason = int(fields.get("code", 1000)), str(fields.get("reason", ""))
                    await local.close(session_id, code, reason)
            elif op in ("join", "leave"):
                group = str(fields["group"])
                for session_id in ids:
                    if op == "join":
                        await local.join(session_id, group)
                    else:
                        await local.leave(session_id, group)
        except Exception:
            log_error(None, "failed to handle a %r message from the cluster", op, exc=True)

    # -- internals: the heartbeat, noticing lost workers, healing ---------------------------

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat / 2)  # the renewal period
            try:
                await self._tick()
            except _redis_errors() as exc:
                self._unavailable(exc)
            except Exception:
                log_error(None, "Redis registry heartbeat failed", exc=True)

    async def _tick(self) -> None:
        """Renew the lease; write what Redis missed; look for lost workers."""
        await self._renew()
        if self._dirty or self._pending_removals:
            await self._resync()
        if not self._available:
            self._available = True
            if self._outage:
                self._outage = False
                self._recovered_at = monotonic()
                log_warning(None, "Redis reachable again; this worker's sessions re-registered")
        await self._check_nodes()

    async def _renew(self) -> None:
        """Renew this worker's lease (under a new node id if the cluster declared it lost)."""
        state = 1
        for _ in range(2):
            node = self.node_id
            self._token += 1
            state = int(
                await self._scripts["HEARTBEAT"](
                    args=[self.prefix, node, self._token, int(self.lease_ttl * 1000)]
                )
            )
            if state != -1:
                break
            self._declared_lost(node)  # then take a lease under the new id
        if state == 0 and self._leased:
            # Our lease was gone: Redis lost its data, or we were cut off or blocked past it.
            # Write everything again, and give the others a lease to come back before judging.
            self._dirty = True
            self._recovered_at = monotonic()
        self._leased = True

    def _unavailable(self, exc: BaseException) -> None:
        self._dirty = True
        self._outage = True
        if self._available:
            self._available = False
            log_warning(
                None,
                "Redis unavailable (%s): working locally; cluster queries raise "
                "RegistryUnavailable until it is back",
                exc,
            )

    async def _resync(self) -> None:
        self._dirty = False
        for session_id in list(self._pending_removals):
            await self._remove_in_redis(session_id)
            self._pending_removals.discard(session_id)
        for session in list(self._local._sessions.values()):
            if session.end_reason is not None or session.state is SessionState.CLOSED:
                continue  # ending: its removal follows
            try:
                await self._register(session)
            except ValueError as exc:
                log_error(session.id, "cannot register %s again: %s", session.id, exc)

    def _declared_lost(self, node: str) -> None:
        """The cluster declared this worker lost (it was cut off or blocked past its lease) and
        ran the node-lost hooks of the sessions it had registered: close those, and carry on
        under a new node id with the others."""
        if node != self.node_id:
            return  # handled already
        victims = [s for i, s in self._local._sessions.items() if i in self._written]
        self._written = set()
        self.node_id = f"{node.split('~')[0]}~{secrets.token_hex(3)}"
        for session in self._local._sessions.values():
            session.node = self.node_id
        self._dirty = True
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
            close_session(
                manager, session, _LOST_CLOSE_CODE, "node lost", end_reason=EndReason.NODE_LOST
            )

    async def _check_nodes(self) -> None:
        """Start healing each worker that is lost: lease expired, or (faster) no pub/sub
        subscription and an unchanged lease token for a heartbeat."""
        if monotonic() - self._recovered_at < self.lease_ttl:
            return  # we were cut off ourselves: let the others renew before judging them
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
        pipe.pubsub_numsub(*(self._keys.channel(n) for n in others))
        *tokens, numsub = await pipe.execute()
        subscribers = dict(numsub)
        now = monotonic()
        for node, token in zip(others, tokens, strict=True):
            if node in self._healing:
                continue
            if token is None:
                expected = ""  # the lease expired
            elif int(subscribers.get(self._keys.channel(node), 0)) == 0:
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
        """Declare ``node`` lost, claim its sessions, then run their node-lost hooks (in this
        task: the heartbeat goes on meanwhile)."""
        claimed: list[tuple[str, list[Any]]] = []
        try:
            declared = await self._scripts["DECLARE_LOST"](
                args=[self.prefix, node, expected, self.node_id, scripts.TOMBSTONE_SECONDS]
            )
            if not int(declared):
                return  # it renewed its lease meanwhile: alive
            log_warning(None, "worker %s is lost: ending its sessions as node lost", node)
            for _ in range(1000):  # bounded: each round empties what it saw
                ids = list(await self.redis.smembers(self._keys.node_sessions(node)))
                if not ids:
                    break
                for start in range(0, len(ids), _CLAIM_BATCH):
                    batch = ids[start : start + _CLAIM_BATCH]
                    pipe = self.redis.pipeline(transaction=False)
                    for session_id in batch:
                        await self._scripts["CLAIM"](
                            args=[self.prefix, session_id, node], client=pipe
                        )
                    replies = await pipe.execute()
                    claimed += [(i, r) for i, r in zip(batch, replies, strict=True) if r]
            await self._scripts["FORGET_NODE"](args=[self.prefix, node])
        except _redis_errors() as exc:
            self._unavailable(exc)
        except Exception:
            log_error(None, "healing lost worker %s failed", node, exc=True)
        finally:
            try:
                for session_id, reply in claimed:
                    await self._end_lost(session_id, reply)
            finally:
                self._healing.pop(node, None)

    async def _end_lost(self, session_id: str, claimed: list[Any]) -> None:
        try:
            flat, groups = claimed
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            manager = self._bound()
            session = rebuild_session(manager, session_id, fields, set(groups))
            await end_without_connection(manager, session, EndReason.NODE_LOST)
        except Exception:
            log_error(session_id, "node-lost teardown of %s failed", session_id, exc=True)

    # -- small helpers -----------------------------------------------------------------------

    def _bound(self) -> SessionManager:
        if self._manager is None:
            raise RuntimeError("registry not bound: give it to a SessionManager first")
        return self._manager

    def _stats_send(self, result: SendResult, count: int = 1) -> None:
        if self._manager is not None and count:
            self._manager.stats.sends[result] += count

    @contextlib.asynccontextmanager
    async def _cluster(self, operation: str) -> Any:
        if not self._available:
            raise RegistryUnavailable(
                f"{operation}: Redis is unreachable (or this worker is still writing its "
                "sessions back after an outage)"
            )
        try:
            yield
        except _redis_errors() as exc:
            self._unavailable(exc)
            raise RegistryUnavailable(f"{operation}: Redis unavailable: {exc}") from exc


def _decodes(client: Any) -> bool:
    """Whether ``client`` answers with ``str`` (``decode_responses=True``)."""
    return bool(client.get_connection_kwargs().get("decode_responses"))


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)
