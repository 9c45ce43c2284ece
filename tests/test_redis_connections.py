"""No Redis call keeps a pooled connection when it fails or times out.

A pipeline that still holds its connection when it is dropped keeps it until the garbage
collector finds it (counted as in use by the pool meanwhile, so the worker has fewer
connections than ``max_connections``); redis-py then warns "Unclosed client session", which
failed a CI run (the warning surfaced in whichever test the collector ran in)."""

from __future__ import annotations

import gc
import secrets
import signal
import warnings

import pytest

from wsession import SessionManager
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisServer
from .test_redis_healing import live_session, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


async def test_a_script_batch_that_times_out_gives_its_connection_back(
    own_redis_server: RedisServer,
) -> None:
    """A batch of scripts is one pipeline, and redis-py's pipeline asks SCRIPT EXISTS before
    the cleanup that gives its connection back starts. Redis stops answering there (SIGSTOP)
    three times: no pipeline is left holding a connection, and the worker reaches Redis again
    once it answers."""
    registry = RedisRegistry(
        own_redis_server.url,
        prefix=f"pool-{secrets.token_hex(4)}",
        heartbeat=0.2,
        command_timeout=0.3,
        max_connections=2,
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    proc = own_redis_server.proc
    assert proc is not None
    async with manager:
        sessions = [live_session(manager, f"s{i}") for i in range(2)]
        for session in sessions:
            await registry.add(session)
        batch = [registry._register_args(s, registry.node_id) for s in sessions]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                proc.send_signal(signal.SIGSTOP)
                try:
                    with pytest.raises(TimeoutError):
                        async with registry._bounded():
                            await registry._script_batch("REGISTER", batch)
                finally:
                    proc.send_signal(signal.SIGCONT)
            gc.collect()  # a pipeline still holding its connection warns as it is collected
        unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert unclosed == []

        async def available() -> bool:
            return registry.state is LinkState.AVAILABLE

        await wait_for(available, 10, "the registry to reach Redis again")
        assert await manager.count() == 2
