"""RedisRegistry on a 3-master Redis Cluster: keys hash-tagged to one slot per prefix, sharded
pub/sub (or plain pub/sub when asked), configuration that fails clearly, and bursts beyond
``max_connections`` that wait instead of failing."""

from __future__ import annotations

import asyncio
import secrets
import signal
from time import monotonic
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from wsession import ConfigurationError, RegistryUnavailable, SendResult, SessionManager
from wsession.backends.redis import LinkState, RedisRegistry

from . import test_presence_redis as presence_redis
from .redis_support import RedisClusterServer, RedisServer
from .support import open_session
from .test_redis_healing import live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


def registry_on(url: str, prefix: str, **kwargs: Any) -> RedisRegistry:
    return RedisRegistry(url, prefix=prefix, heartbeat=0.4, **kwargs)


async def all_keys(cluster: RedisClusterServer) -> list[str]:
    client = RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        return [str(k) async for k in client.scan_iter(match="*", count=1000)]
    finally:
        await client.aclose()


async def test_every_key_of_a_prefix_is_in_one_slot_but_the_denylist(
    redis_cluster: RedisClusterServer,
) -> None:
    prefix = f"slot-{secrets.token_hex(4)}"
    manager = SessionManager(registry=registry_on(redis_cluster.url, prefix))
    async with manager:
        registry = manager.registry
        assert isinstance(registry, RedisRegistry)
        assert registry.state is LinkState.AVAILABLE
        session = live_session(manager, "s1")
        session.user_key = "ada"
        await registry.add(session)
        assert await registry.join("s1", "room")
        await registry.deny("token-1", 30)
        assert await registry.is_denied("token-1")
        keys = [k for k in await all_keys(redis_cluster) if prefix in k]
        tagged = [k for k in keys if k.startswith(f"{{{prefix}}}:")]
        assert {f"{{{prefix}}}:s:s1", f"{{{prefix}}}:g:room", f"{{{prefix}}}:u:ada"} <= set(tagged)
        assert set(keys) - set(tagged) == {f"{prefix}:deny:token-1"}  # spread, single-key
        # The channels are sharded ones, on the node that owns the prefix's slot.
        client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
        try:
            await client.initialize()
            node = client.get_node_from_key(f"{{{prefix}}}:nodes")
            channels = await client.pubsub_shardchannels(f"{{{prefix}}}:*", target_nodes=node)
        finally:
            await client.aclose()
        assert set(channels) == {
            f"{{{prefix}}}:ch:{registry.node_id}",
            f"{{{prefix}}}:ch:all",
        }
    assert [k for k in await all_keys(redis_cluster) if k.startswith(f"{{{prefix}}}")] == []


@pytest.mark.parametrize("sharded", [True, False])
async def test_cross_worker_sends_and_healing_with_either_pubsub(
    redis_cluster: RedisClusterServer, sharded: bool
) -> None:
    """Two workers in one process: a send by id crosses over; when A stops listening and
    renewing (a crash, as B sees it), B claims its session, with sharded or plain pub/sub."""
    prefix = f"xw-{secrets.token_hex(4)}"
    a = SessionManager(
        registry=registry_on(redis_cluster.url, prefix, sharded_pubsub=sharded),
        drain_on_signal=False,
    )
    b = SessionManager(
        registry=registry_on(redis_cluster.url, prefix, sharded_pubsub=sharded),
        drain_on_signal=False,
    )
    ended: list[str] = []

    @b.on_disconnect
    def record(session: Any) -> None:
        ended.append(session.id)

    async with b:
        got: list[Any] = []
        async with a:
            registry_a = a.registry
            assert isinstance(registry_a, RedisRegistry)
            assert registry_a._mode.sharded is sharded
            received = asyncio.Event()

            async def on_frame(message: Any) -> None:
                got.append(message)
                received.set()

            session = open_session("on-a", on_frame, a.new_data())
            await a.registry.add(session)
            assert await b.send("on-a", {"hello": 1}) is SendResult.QUEUED
            async with asyncio.timeout(5):
                await received.wait()
            # A "dies": no more heartbeats, no more listening; its Redis entries stay.
            for task in (registry_a._beater, registry_a._listener):
                assert task is not None
                task.cancel()
            crashed_client = registry_a._client
            registry_a._client = None  # its exit must not clean up: it crashed
            registry_a._local.discard(session)

            async def claimed() -> bool:
                return ended == ["on-a"]

            try:
                await wait_for(claimed, 10, "B to heal A's session")
                assert await b.count() == 0
            finally:
                await crashed_client.aclose()
        assert got and "hello" in str(got[0])


async def test_wrong_cluster_flag_fails_clearly(
    redis_cluster: RedisClusterServer, redis_server: RedisServer
) -> None:
    with pytest.raises(ConfigurationError, match=r"cluster=False.*Redis Cluster node"):
        async with registry_on(redis_cluster.url, "flag", cluster=False):
            pass
    with pytest.raises(ConfigurationError, match=r"cluster=True.*no cluster"):
        async with registry_on(redis_server.url, "flag", cluster=True):
            pass
    with pytest.raises(ConfigurationError, match="prefix"):
        async with registry_on(redis_cluster.url, "a{b}"):
            pass
    with pytest.raises(ConfigurationError, match="sharded_pubsub"):
        registry_on(redis_cluster.url, "flag", cluster=False, sharded_pubsub=True)
    with pytest.raises(ConfigurationError, match="cluster"):
        RedisRegistry(client=Redis(decode_responses=True), cluster=True)


async def test_a_burst_beyond_max_connections_waits(redis_cluster: RedisClusterServer) -> None:
    """redis-py's cluster client fails at its connection cap: the registry queues instead."""
    registry = RedisRegistry(redis_cluster.url, prefix=f"burst-{secrets.token_hex(4)}")
    manager = SessionManager(registry=registry, drain_on_signal=False)
    async with manager:
        sessions = [live_session(manager, f"s{i}") for i in range(300)]
        await asyncio.gather(*(registry.add(s) for s in sessions))
        assert registry.state is LinkState.AVAILABLE
        assert await registry.count() == 300
        await asyncio.gather(*(registry.remove(s) for s in sessions))
        assert await registry.count() == 0


async def test_a_hung_slot_owner_holds_nothing_longer_than_command_timeout(
    redis_cluster: RedisClusterServer,
) -> None:
    """The node holding the prefix's slot frozen (SIGSTOP): cluster queries fail within
    ``command_timeout``, local work goes on, and the registry comes back once it thaws."""
    prefix = f"hang-{secrets.token_hex(4)}"
    registry = RedisRegistry(redis_cluster.url, prefix=prefix, heartbeat=0.4, command_timeout=0.5)
    manager = SessionManager(registry=registry, drain_on_signal=False)
    async with manager:
        await registry.add(live_session(manager, "kept"))
        proc = redis_cluster.proc_holding(f"{{{prefix}}}:nodes")
        proc.send_signal(signal.SIGSTOP)
        try:
            started = monotonic()
            with pytest.raises(RegistryUnavailable):
                await registry.count()
            assert monotonic() - started < 1.5  # command_timeout plus scheduling slack
            assert registry.state is LinkState.OUTAGE
            started = monotonic()
            await registry.add(live_session(manager, "during"))  # never raises for an outage
            assert monotonic() - started < 1.5
        finally:
            proc.send_signal(signal.SIGCONT)

        async def both_written_back() -> bool:
            try:
                return await registry.count() == 2
            except RegistryUnavailable:
                return False

        await wait_for(both_written_back, 15, "the session added during the hang to be written")


async def test_a_given_cluster_client_is_used_and_left_open(
    redis_cluster: RedisClusterServer,
) -> None:
    client = RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    try:
        registry = RedisRegistry(client=client, prefix=f"given-{secrets.token_hex(4)}")
        manager = SessionManager(registry=registry, drain_on_signal=False)
        async with manager:
            await registry.add(live_session(manager, "s"))
            assert await registry.count() == 1
            assert registry._mode.sharded  # Redis 7 on every node
        assert await client.ping()  # not closed by the registry
    finally:
        await client.aclose()


async def test_resharding_the_prefixs_slot_keeps_workers_alive_and_reachable(
    redis_cluster: RedisClusterServer,
) -> None:
    """The slot moves to another node while two workers run: redis-py follows MOVED, the
    listener subscribes again on the new owner, nobody is declared lost, sends arrive."""
    prefix = f"reshard-{secrets.token_hex(4)}"
    a = SessionManager(registry=registry_on(redis_cluster.url, prefix), drain_on_signal=False)
    b = SessionManager(registry=registry_on(redis_cluster.url, prefix), drain_on_signal=False)
    got: list[Any] = []

    async def on_frame(message: Any) -> None:
        got.append(message)

    async with a, b:
        registry_a = a.registry
        assert isinstance(registry_a, RedisRegistry)
        node_a = registry_a.node_id
        await registry_a.add(open_session("x", on_frame, a.new_data()))
        old, new = await asyncio.to_thread(redis_cluster.move_slot_of, f"{{{prefix}}}:nodes")
        assert old != new
        before = len(got)

        async def a_send_arrives() -> bool:
            try:
                await b.send("x", {"after": "reshard"})
            except RegistryUnavailable:
                return False
            await asyncio.sleep(0.05)  # the frame crosses over pub/sub
            return len(got) > before

        await wait_for(a_send_arrives, 10, "a send by id after the slot moved")
        await asyncio.sleep(3 * 0.4)  # three heartbeats: time for a wrong judgement
        assert registry_a.node_id == node_a  # never declared lost
        assert await b.count() == 1
        assert registry_a.state is LinkState.AVAILABLE
        assert isinstance(b.registry, RedisRegistry)
        assert b.registry.state is LinkState.AVAILABLE


# Presence across workers (issue 15's tests, reused as they are: they need only a URL).
@pytest.mark.timeout(60)
async def test_presence_diffs_reach_every_worker_on_the_cluster(
    redis_cluster: RedisClusterServer,
) -> None:
    await presence_redis.test_diffs_reach_subscribers_on_every_worker(cast(Any, redis_cluster))


@pytest.mark.timeout(60)
async def test_presence_of_a_killed_worker_leaves_as_one_diff_on_the_cluster(
    redis_cluster: RedisClusterServer,
) -> None:
    await presence_redis.test_a_killed_worker_leaves_as_one_diff_within_two_heartbeats(
        cast(Any, redis_cluster)
    )
