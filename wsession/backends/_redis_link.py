"""How the Redis registry connects: one Redis (a pooled client) or a Redis Cluster (redis-py's
cluster client), which pub/sub it uses there, and how its calls share connections
(:class:`CallGate`: a burst waits its turn, it is not an outage).

On a cluster every key of one prefix carries the hash tag ``{prefix}`` (see
:class:`~wsession.backends._redis_codec.Keys`), so each script runs on the one node that holds
that slot, and the registry's channels use sharded pub/sub (``SSUBSCRIBE``/``SPUBLISH``, Redis
7+), which stays on that node instead of being copied to every node of the cluster as plain
``PUBLISH`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._exceptions import ConfigurationError


class CallGate:
    """At most ``size`` of the registry's Redis calls in flight (one connection each); the
    others wait their turn, first come first served.

    Why the registry queues here and not in a connection pool (issue 17): a reconnect burst
    (a thousand handshakes at once) keeps every connection busy for longer than
    ``command_timeout`` although Redis answers each call at once. Waiting in redis-py's pool
    happens inside a call's deadline, so the burst looked like Redis being down (an outage, a
    resync, the heartbeat stuck behind the burst until the other workers declared this one
    lost). Here the wait is not timed: a call's deadline starts once it holds its slot. The
    wait is still bounded: every call ahead of it ends within ``command_timeout``, and when one
    fails (Redis is down, not busy) the registry calls :meth:`refuse_waiting`, which ends every
    wait at once.

    Re-entrant per task: a call made while the same task holds a slot uses that slot (waiting
    for a second one could wait for itself).

    Concurrency: used from the event loop's tasks only; a waiter may be cancelled.
    """

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._holders: set[asyncio.Task[Any]] = set()
        self._refusal: Callable[[], BaseException] | None = None

    @property
    def waiting(self) -> int:
        """How many calls wait for a slot (cancelled ones may still be counted)."""
        return len(self._waiters)

    def held(self) -> bool:
        """Whether the current task holds a slot."""
        return asyncio.current_task() in self._holders

    def slot(self, timeout: float | None = None) -> _Slot:
        """Hold a slot for the body (the current task's own slot if it holds one already),
        then, with ``timeout``, bound the body by a :class:`Deadline` of ``timeout``: the deadline
        starts once the slot is held.

        Raises:
            BaseException: what :meth:`refuse_waiting` was given, when it had to wait.
        """
        return _Slot(self, timeout)

    def refuse_waiting(self, error: Callable[[], BaseException]) -> None:
        """Redis is down: end every wait now with ``error()``, and fail every call that finds no
        free slot at once, until :meth:`allow_waiting`. (Calls ahead fail within
        ``command_timeout``: waiting for them would only hold a handshake up.)"""
        self._refusal = error
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error())

    def allow_waiting(self) -> None:
        """Redis answers again: calls wait their turn again."""
        self._refusal = None

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if self._refusal is not None:
            raise self._refusal()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # handed a slot as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Hand the slot to the first live waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Deadline:
    """``asyncio.timeout(seconds)`` for one Redis call, except that a reply which reached the
    socket in time is never thrown away because the event loop itself was late.

    Why (issue 17): a worker's loop can stall for longer than ``command_timeout`` (a full
    garbage collection of a heap holding 100k connections, a CPU-bound handler, a starved
    CPU). When it runs again it finds Redis's reply and the expired deadline in the same turn,
    and asyncio runs the deadline's callback before the woken call, so the call failed as if
    Redis had not answered, and the registry declared an outage. Here the deadline, once due,
    expires one loop turn later (``reschedule`` to the past: ``call_soon``), after the call
    that its reply woke. A Redis that does not answer is still given up on, one turn late.
    """

    __slots__ = ("_seconds", "_timeout", "_timer")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._timeout = asyncio.timeout(None)
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        # reschedule(0.0), a time already past, expires the timeout with call_soon.
        self._timer = asyncio.get_running_loop().call_later(
            self._seconds, self._timeout.reschedule, 0.0
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._timeout.__aexit__(exc_type, exc, tb)


class _Slot:
    """One use of a :class:`CallGate` (a class, not a generator: it wraps every Redis call)."""

    __slots__ = ("_deadline", "_gate", "_task", "_timeout")

    def __init__(self, gate: CallGate, timeout: float | None) -> None:
        self._gate = gate
        self._timeout = timeout
        self._task: asyncio.Task[Any] | None = None
        self._deadline: Deadline | None = None

    async def __aenter__(self) -> None:
        gate = self._gate
        task = asyncio.current_task()
        if task is not None and task not in gate._holders:
            await gate._acquire()
            gate._holders.add(task)
            self._task = task
        if self._timeout is not None:
            self._deadline = Deadline(self._timeout)
            try:
                await self._deadline.__aenter__()
            except BaseException:
                self._deadline = None
                await self.__aexit__(None, None, None)  # give the slot back
                raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._deadline is not None:
                await self._deadline.__aexit__(exc_type, exc, tb)
        finally:
            task = self._task
            if task is not None:
                self._task = None
                self._gate._holders.discard(task)
                self._gate._release()


@dataclass(frozen=True)
class PubSubMode:
    """Where the registry's channels live: ``cluster`` (a Redis Cluster) and ``sharded``
    (sharded pub/sub, only on a cluster)."""

    cluster: bool = False
    sharded: bool = False

    @property
    def publish_command(self) -> str:
        """The command a script publishes with."""
        return "SPUBLISH" if self.sharded else "PUBLISH"

    async def publish(self, client: Any, channel: str, data: str) -> int:
        """Publish ``data`` on ``channel``; how many subscribers got it."""
        if self.sharded:
            return int(await client.spublish(channel, data))
        return int(await client.publish(channel, data))

    async def subscribe(self, pubsub: Any, *channels: str) -> None:
        if self.sharded:
            await pubsub.ssubscribe(*channels)
        else:
            await pubsub.subscribe(*channels)

    async def next_message(self, pubsub: Any, timeout: float) -> Any:
        """The next message (``None`` when none came within ``timeout``)."""
        if self.sharded:
            return await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=timeout)
        return await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)

    async def listeners(self, client: Any, channels: list[str]) -> dict[str, int]:
        """How many subscribers each channel has, cluster-wide. A sharded channel's subscribers
        are all on the node that owns its slot; a plain channel's may be on any node, so every
        node is asked and the counts are summed (redis-py adds them up)."""
        if not channels:
            return {}
        if self.sharded:
            node = client.get_node_from_key(channels[0])  # one slot: the prefix's hash tag
            reply = await client.pubsub_shardnumsub(*channels, target_nodes=node)
        elif self.cluster:
            reply = await client.pubsub_numsub(*channels, target_nodes=client.ALL_NODES)
        else:
            reply = await client.pubsub_numsub(*channels)
        return {str(name): int(count) for name, count in reply}


async def is_cluster_node(url: str, timeout: float) -> bool:
    """Whether the Redis at ``url`` runs in cluster mode (``INFO cluster``). Raises redis-py's
    errors when it cannot be asked."""
    from redis.asyncio import Redis

    client = Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        info = await client.info("cluster")
    finally:
        await client.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


async def supports_sharded_pubsub(client: Any) -> bool:
    """Whether the cluster's servers have sharded pub/sub (Redis 7.0 or later)."""
    info = await client.info("server")
    versions = [info] if "redis_version" in info else list(info.values())
    for node_info in versions:
        major = str(node_info.get("redis_version", "0")).split(".")[0]
        if not major.isdigit() or int(major) < 7:
            return False
    return bool(versions)


def check_cluster_prefix(prefix: str) -> None:
    """On a cluster the prefix becomes a hash tag: it may not hold braces of its own."""
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            f"prefix: {prefix!r} may not contain '{{' or '}}' on a Redis Cluster (the registry "
            "wraps it in braces as its hash tag)"
        )


def make_cluster_client(url: str, *, max_connections: int, timeout: float) -> Any:
    """redis-py's async cluster client for ``url`` (any node: it finds the others). Its per-node
    connection cap leaves room above ``max_connections`` (which the registry itself enforces
    with a :class:`CallGate`, since redis-py's cluster client fails instead of waiting at its
    cap) for pub/sub and the heartbeat."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    return RedisCluster.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections + 8,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 2),
    )


def is_cluster_client(client: Any) -> bool:
    """Whether ``client`` is redis-py's async cluster client."""
    try:
        from redis.asyncio.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis is installed whenever a client is given
        return False
    return isinstance(client, RedisCluster)
