"""A fixed node id (a pod name) restarted after a crash: the new start ends what the crashed
incarnation left (node-lost hooks once), and two live workers cannot share one node id; on a
single Redis and on a Redis Cluster."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from example_app.procs import ROOT
from wsession import ConfigurationError, SessionManager
from wsession.backends.redis import RedisRegistry

from .redis_support import RedisClusterServer, RedisServer, direct_client, key_prefix
from .test_redis_healing import HEARTBEAT, Recorder, live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


@contextmanager
def node_process(
    url: str, prefix: str, node_id: str, count: int
) -> Iterator[subprocess.Popen[str]]:
    """A worker process with ``count`` sessions registered under ``node_id`` (ready on return)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.apps.redis_node",
            url,
            prefix,
            node_id,
            str(count),
            str(HEARTBEAT),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout; the process prints once
        assert line.startswith("ready"), f"node process did not start: {line!r}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_restart_under_a_fixed_node_id_ends_the_crashed_incarnations_sessions(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    """kill -9 inside the lease, restart with the same node id at once (no other worker): the
    old sessions are ended as node lost, once each, and leave nothing in Redis."""
    prefix = f"incarnation-{secrets.token_hex(4)}"
    keys = key_prefix(any_redis, prefix)
    node = "pod-0"
    with node_process(any_redis.url, prefix, node, 3) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    direct = direct_client(any_redis)
    try:
        assert await direct.exists(f"{keys}:lease:{node}")  # restarted inside the lease
        recorder = Recorder()
        manager = SessionManager(
            registry=RedisRegistry(any_redis.url, prefix=prefix, heartbeat=HEARTBEAT, node_id=node),
            drain_on_signal=False,
        )
        recorder.install(manager, "restarted")
        async with manager:
            await manager.registry.add(live_session(manager, "fresh"))

            async def hooks_ran() -> bool:
                return len(recorder.node_lost()) >= 3

            await wait_for(hooks_ran, 10, "the crashed incarnation's sessions to be ended")
            lost = recorder.node_lost()
            assert sorted(lost) == [f"{node}-s{i}" for i in range(3)]
            assert await manager.count() == 1
            assert {s.id for s in await manager.sessions()} == {"fresh"}
            for sid in lost:  # one by one: a cluster client refuses keys of several slots
                assert not await direct.exists(f"{keys}:s:{sid}")
            assert await direct.smembers(f"{keys}:n:{node}:s") == {"fresh"}
            assert manager.registry.node_id == node  # type: ignore[attr-defined]
        assert sorted(recorder.node_lost()) == sorted(lost)  # still once each
    finally:
        await direct.aclose()


async def test_a_second_live_worker_with_the_same_node_id_is_refused(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    prefix = f"incarnation-{secrets.token_hex(4)}"
    recorder = Recorder()
    with node_process(any_redis.url, prefix, "pod-1", 2) as proc:
        manager = SessionManager(
            registry=RedisRegistry(
                any_redis.url, prefix=prefix, heartbeat=HEARTBEAT, node_id="pod-1"
            ),
            drain_on_signal=False,
        )
        recorder.install(manager, "second")
        with pytest.raises(ConfigurationError, match="node_id"):
            async with manager:
                pass
        assert proc.poll() is None
        direct = direct_client(any_redis)
        try:
            assert (
                await direct.scard(f"{key_prefix(any_redis, prefix)}:n:pod-1:s") == 2
            )  # the live one's sessions kept
        finally:
            await direct.aclose()
    assert recorder.node_lost() == []
