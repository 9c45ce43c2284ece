"""A registry in Redis, so sessions, groups, user keys and sends work across workers and hosts.

Needs the ``redis`` extra (``pip install 'wsession[redis]'``); imported only when used.

How it works: every worker keeps its own sessions in a local index (the fast path: a send to a
local session never touches Redis) and mirrors them in Redis (a hash per session, sets for all
sessions, groups, user keys and each worker's sessions). Each worker listens on its own pub/sub
channel plus a broadcast channel; a send to a session on another worker is published to that
worker's channel, in order. Each worker holds a lease (a key with a TTL, renewed by a heartbeat);
when a lease expires, the survivors claim the dead worker's sessions one by one with an atomic
Redis script, so each lost session's disconnect hooks run exactly once in the cluster, with
``end_reason`` ``node lost`` and the data stored at registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import defaultdict
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .._connection import count_ending, run_disconnect_hooks
from .._delivery import SendResult
from .._exceptions import ConfigurationError, RegistryUnavailable
from .._log import log_error, log_warning
from .._session import EndReason, Session, SessionState
from .._shield import run_shielded
from .._types import Message
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

# Removes one session and everything that points at it, atomically. ARGV: prefix, id, node.
_REMOVE = """
local p, sid, node = ARGV[1], ARGV[2], ARGV[3]
local sk = p .. ':s:' .. sid
local uk = redis.call('HGET', sk, 'user_key')
if uk and uk ~= '' then redis.call('SREM', p .. ':u:' .. uk, sid) end
for _, g in ipairs(redis.call('SMEMBERS', p .. ':sg:' .. sid)) do
  redis.call('SREM', p .. ':g:' .. g, sid)
end
redis.call('DEL', sk, p .. ':sg:' .. sid)
redis.call('SREM', p .. ':sessions', sid)
redis.call('SREM', p .. ':n:' .. node .. ':s', sid)
return 1
"""

# Claims one session of a dead node: only the caller whose SREM succeeds gets its fields back,
# so the node-lost hooks run once in the cluster. ARGV: prefix, id, dead node.
_CLAIM = (
    """
local p, sid, node = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SREM', p .. ':n:' .. node .. ':s', sid) == 0 then return false end
local sk = p .. ':s:' .. sid
local fields = redis.call('HGETALL', sk)
local groups = redis.call('SMEMBERS', p .. ':sg:' .. sid)
"""
    + _REMOVE.split("local sk = p .. ':s:' .. sid", 1)[1].replace("return 1", "")
    + """
return {fields, groups}
"""
)


class RedisRegistry:
    """Live sessions of every worker, in one Redis.

    Args:
        url: a Redis URL (``redis://127.0.0.1:6379/0``); or give ``client``.
        client: a ready ``redis.asyncio.Redis`` (not closed by the registry).
        prefix: namespace of every key and channel, so several apps can share one Redis.
        heartbeat: seconds between lease renewals; dead workers are noticed within about two.
        lease_ttl: seconds a lease lives without renewal (default 1.5 x ``heartbeat``); must
            be longer than ``heartbeat``.
        node_id: this worker's id (default: random).
        max_connections: size of the connection pool made from ``url``; callers beyond it
            wait for a free connection (up to 10 s) instead of failing.

    Raises:
        ConfigurationError: bad arguments (named in the message).

    Consistency notes: a session's data is stored when it is registered; call
    :meth:`update_data` after changing it if other workers must see the change. During a Redis
    outage local sessions keep working and local sends deliver; cluster-wide queries (``get`` of
    a remote id, ``count``, ``sessions``, ``members``, ``user_sessions``) raise
    :class:`~wsession.RegistryUnavailable`; group, user and broadcast sends reach the local
    targets and skip (and log) the rest. When Redis is back, the worker writes its live
    sessions again. A send to a session on another worker returns ``queued``.
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
        if not prefix or any(c.isspace() for c in prefix):
            raise ConfigurationError(f"prefix: must be non-empty without spaces, got {prefix!r}")
        if not heartbeat > 0:
            raise ConfigurationError(f"heartbeat: must be > 0 seconds, got {heartbeat!r}")
        if max_connections < 2:
            raise ConfigurationError(f"max_connections: must be >= 2, got {max_connections!r}")
        ttl = 1.5 * heartbeat if lease_ttl is None else lease_ttl
        if not ttl > heartbeat:
            raise ConfigurationError(f"lease_ttl: must be longer than heartbeat, got {ttl!r}")
        self.url = url
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.lease_ttl = ttl
        self.node_id = node_id or secrets.token_hex(8)
        self.max_connections = max_connections
        self._pool: Any = None
        self._keys = Keys(prefix)
        self._external_client = client
        self._client: Any = client
        self._local = MemoryRegistry()
        self._manager: SessionManager | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = False  # Redis missed writes: write every local session again
        self._pending_removals: set[str] = set()
        self._reaped = 0

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

    async def __aenter__(self) -> Self:
        """Connect, take this worker's lease, heal sessions of dead workers, start listening."""
        if self._client is None:
            from redis.asyncio import BlockingConnectionPool, Redis

            assert self.url is not None
            # A blocking pool: a burst of sessions waits for a connection instead of failing
            # with "Too many connections" (redis-py's default pool raises at its limit).
            self._pool = BlockingConnectionPool.from_url(
                self.url, decode_responses=True, max_connections=self.max_connections, timeout=10
            )
            self._client = Redis(connection_pool=self._pool)
        try:
            await self._renew_lease()
            await self._reap()
        except _redis_errors() as exc:
            raise RegistryUnavailable(f"cannot reach Redis: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._beat())]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening, give up the lease, close the client the registry opened."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
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
        if self._external_client is None:
            with contextlib.suppress(*_redis_errors(), TimeoutError):
                async with asyncio.timeout(5):
                    await client.aclose()
                    if self._pool is not None:
                        await self._pool.aclose()
            self._client = self._pool = None

    # -- membership -----------------------------------------------------------------------

    async def add(self, session: Session) -> None:
        """Register a local session here and in Redis (a Redis failure is logged, not raised:
        the connection works, and the worker writes it again when Redis is back)."""
        await self._local.add(session)
        session.node = self.node_id
        try:
            await self._write_session(session)
        except _redis_errors() as exc:
            self._dirty = True
            log_warning(
                session.id, "Redis unavailable, %s registered locally only: %s", session.id, exc
            )

    async def remove(self, session: Session) -> None:
        """Forget a local session here and in Redis (retried later if Redis is down)."""
        await self._local.remove(session)
        try:
            await self._remove_in_redis(session.id)
        except _redis_errors():
            self._pending_removals.add(session.id)

    async def update_data(self, session: Session) -> None:
        """Store ``session.data`` (and ``user_key``-independent metadata) again, for other
        workers to read. Raises RegistryUnavailable during an outage."""
        async with self._cluster("update_data"):
            fields = session_fields(session, self.node_id)
            await self.redis.hset(self._keys.session(session.id), mapping=fields)

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
        """Live sessions of every worker (local ones live, remote ones as snapshots)."""
        async with self._cluster("sessions"):
            ids = sorted(await self.redis.smembers(self._keys.all))
            found = await self._read_sessions(ids)
        return [s for s in found if where is None or where(s)]

    async def join(self, session_id: str, group: str) -> bool:
        """Add a session of any worker to ``group``."""
        local = await self._local.get(session_id)
        if local is not None:
            if not await self._local.join(session_id, group):
                return False
            try:
                await self._write_membership(session_id, group, join=True)
            except _redis_errors():
                self._dirty = True
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
            try:
                await self._write_membership(session_id, group, join=False)
            except _redis_errors():
                self._dirty = True
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
        """Local sessions: delivered at once. Remote: published to the owner (``queued``).
        Unknown: ``gone``."""
        if await self._local.get(session_id) is not None:
            return await self._local.send(session_id, message)
        async with self._cluster("send"):
            owner = await self.redis.hget(self._keys.session(session_id), "node")
            if owner is None:
                self._stats_send(SendResult.GONE)
                return SendResult.GONE
            await self._publish(owner, "send", ids=[session_id], message=message)
        self._stats_send(SendResult.QUEUED)
        return SendResult.QUEUED

    async def send_group(self, group: str, message: Message, exclude: str | None = None) -> int:
        """Send to the members of ``group`` wherever they are."""
        return await self._send_set(self._keys.group(group), message, exclude)

    async def send_user(self, user_key: str, message: Message) -> int:
        """Send to every session of ``user_key`` wherever it is."""
        return await self._send_set(self._keys.user(user_key), message, None)

    async def broadcast(self, message: Message, exclude: str | None = None) -> int:
        """Send to every open session of the cluster; local ones first, at once."""
        reached = await self._local.broadcast(message, exclude)
        try:
            await self.redis.publish(
                self._keys.broadcast,
                encode_envelope("broadcast", origin=self.node_id, exclude=exclude, message=message),
            )
            remote = int(await self.redis.scard(self._keys.all)) - len(self._local._sessions)
        except _redis_errors() as exc:
            log_warning(None, "broadcast reached local sessions only (Redis unavailable): %s", exc)
            return reached
        return reached + max(0, remote)

    async def close(self, session_id: str, code: int = 1000, reason: str = "") -> bool:
        """Close a session wherever it is; its disconnect hooks run once, on its worker."""
        if await self._local.get(session_id) is not None:
            return await self._local.close(session_id, code, reason)
        async with self._cluster("close"):
            owner = await self.redis.hget(self._keys.session(session_id), "node")
            if owner is None:
                return False
            await self._publish(owner, "close", ids=[session_id], code=code, reason=reason)
        return True

    async def close_user(self, user_key: str, code: int = 1000, reason: str = "") -> int:
        """Close every session of ``user_key`` wherever it is."""
        closed = await self._local.close_user(user_key, code, reason)
        async with self._cluster("close_user"):
            ids = await self.redis.smembers(self._keys.user(user_key))
            by_node = await self._remote_owners(ids)
            for owner, owned in by_node.items():
                await self._publish(owner, "close", ids=owned, code=code, reason=reason)
                closed += len(owned)
        return closed

    # -- internals: writes ------------------------------------------------------------------

    async def _write_session(self, session: Session) -> None:
        keys = self._keys
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.session(session.id), mapping=session_fields(session, self.node_id))
        pipe.sadd(keys.all, session.id)
        pipe.sadd(keys.node_sessions(self.node_id), session.id)
        if session.user_key is not None:
            pipe.sadd(keys.user(session.user_key), session.id)
        for group in session.groups:
            pipe.sadd(keys.group(group), session.id)
            pipe.sadd(keys.session_groups(session.id), group)
        await pipe.execute()

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
        await self.redis.eval(_REMOVE, 0, self.prefix, session_id, self.node_id)

    async def _publish(self, node: str, op: str, **fields: Any) -> None:
        await self.redis.publish(self._keys.channel(node), encode_envelope(op, **fields))

    # -- internals: reads -------------------------------------------------------------------

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

    async def _send_set(self, key: str, message: Message, exclude: str | None) -> int:
        try:
            ids = await self.redis.smembers(key)
        except _redis_errors() as exc:
            log_warning(
                None, "Redis unavailable: group/user send reached no remote session: %s", exc
            )
            ids = set()
            if key.startswith(f"{self.prefix}:g:"):
                local = self._local._groups.get(key.split(":g:", 1)[1], {})
            else:
                local = self._local._users.get(key.split(":u:", 1)[1], {})
            return await self._local._send_all(list(local.values()), message, exclude)
        ids.discard(exclude)
        local_sessions = [self._local._sessions[i] for i in ids if i in self._local._sessions]
        reached = await self._local._send_all(local_sessions, message, exclude)
        try:
            for owner, owned in (await self._remote_owners(ids)).items():
                await self._publish(owner, "send", ids=owned, message=message)
                reached += len(owned)
        except _redis_errors() as exc:
            log_warning(None, "Redis unavailable: remote members skipped: %s", exc)
        return reached

    # -- internals: the listener, the heartbeat, healing ------------------------------------

    async def _listen(self) -> None:
        channels = (self._keys.channel(self.node_id), self._keys.broadcast)
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(*channels)
                backoff = 0.1
                while True:
                    item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if item is not None:
                        await self._on_envelope(item["data"])
            except _redis_errors() as exc:
                self._dirty = True
                log_warning(None, "Redis pub/sub lost (%s); retrying in %.1fs", exc, backoff)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)  # reconnect back-off, not synchronisation
            backoff = min(backoff * 2, 2.0)

    async def _on_envelope(self, raw: str | bytes) -> None:
        try:
            op, fields, message = decode_envelope(raw)
        except (ValueError, KeyError) as exc:
            log_error(None, "ignoring a malformed message on %s: %s", self.prefix, exc)
            return
        local = self._local
        if op == "broadcast":
            if fields.get("origin") != self.node_id and message is not None:
                await local.broadcast(message, fields.get("exclude"))
            return
        ids = [i for i in fields.get("ids", ()) if i in local._sessions]
        if op == "send" and message is not None:
            await local._send_all([local._sessions[i] for i in ids], message, None)
        elif op == "close":
            for session_id in ids:
                await local.close(
                    session_id, int(fields.get("code", 1000)), str(fields.get("reason", ""))
                )
        elif op == "join":
            for session_id in ids:
                await local.join(session_id, str(fields["group"]))
        elif op == "leave":
            for session_id in ids:
                await local.leave(session_id, str(fields["group"]))

    async def _beat(self) -> None:
        # Check twice per heartbeat, so a dead worker (lease 1.5 heartbeats) is noticed within
        # two heartbeats of its last renewal.
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat / 2)  # the heartbeat's period
            try:
                await self._renew_lease()
                if self._dirty or self._pending_removals:
                    await self._resync()
                await self._reap()
                if failing:
                    log_warning(None, "Redis reachable again; sessions re-registered")
                failing = False
            except _redis_errors() as exc:
                self._dirty = True
                if not failing:
                    log_warning(None, "Redis unavailable (%s): working locally", exc)
                failing = True

    async def _renew_lease(self) -> None:
        previous = await self.redis.set(
            self._keys.lease(self.node_id), "1", px=int(self.lease_ttl * 1000), get=True
        )
        added = await self.redis.sadd(self._keys.nodes, self.node_id)
        if previous is None and added and self._local._sessions:
            # Our lease and node entry were gone (Redis restarted empty): write everything.
            self._dirty = True

    async def _resync(self) -> None:
        for session_id in list(self._pending_removals):
            await self._remove_in_redis(session_id)
            self._pending_removals.discard(session_id)
        for session in list(self._local._sessions.values()):
            if session.state is not SessionState.CLOSED:
                await self._write_session(session)
        self._dirty = False

    async def _reap(self) -> None:
        redis = self.redis
        for node in await redis.smembers(self._keys.nodes):
            if node == self.node_id or await redis.exists(self._keys.lease(node)):
                continue
            for session_id in await redis.smembers(self._keys.node_sessions(node)):
                claimed = await redis.eval(_CLAIM, 0, self.prefix, session_id, node)
                if claimed:
                    await self._end_lost(session_id, claimed)
            if not await redis.scard(self._keys.node_sessions(node)):
                await redis.srem(self._keys.nodes, node)

    async def _end_lost(self, session_id: str, claimed: list[Any]) -> None:
        flat, groups = claimed
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        manager = self._bound()
        session = rebuild_session(manager, session_id, fields, set(groups))
        session._end(EndReason.NODE_LOST, None, None)
        session.state = SessionState.CLOSED
        self._reaped += 1
        count_ending(manager, session)
        await run_shielded(run_disconnect_hooks(manager, session))

    # -- small helpers -----------------------------------------------------------------------

    def _bound(self) -> SessionManager:
        if self._manager is None:
            raise RuntimeError("registry not bound: give it to a SessionManager first")
        return self._manager

    def _stats_send(self, result: SendResult) -> None:
        if self._manager is not None:
            self._manager.stats.sends[result] += 1

    @contextlib.asynccontextmanager
    async def _cluster(self, operation: str) -> Any:
        try:
            yield
        except _redis_errors() as exc:
            raise RegistryUnavailable(f"{operation}: Redis unavailable: {exc}") from exc


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)
