"""RedisRegistry's shape: validated settings, one explicit link state, the memory registry used
through its public surface only, and a removal that survives its caller's cancellation."""

from __future__ import annotations

import asyncio
import inspect
import secrets
from typing import Any

import pytest
from redis.asyncio import Redis

from wsession import ConfigurationError, SessionManager
from wsession.backends import redis as redis_backend
from wsession.backends.redis import LinkState, RedisRegistry

from .redis_support import RedisServer
from .test_redis_healing import live_session, wait_for

URL = "redis://127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"heartbeat": 0}, "heartbeat"),
        ({"heartbeat": "often"}, "heartbeat"),
        ({"lease_ttl": 0.5, "heartbeat": 1.0}, "lease_ttl"),
        ({"prefix": "my app"}, "prefix"),
        ({"node_id": ""}, "node_id"),
        ({"max_connections": 1}, "max_connections"),
        ({"command_timeout": -1}, "command_timeout"),
        ({"stored_headers": ["cookie"]}, "stored_headers"),
        ({"max_stored_header_bytes": -1}, "max_stored_header_bytes"),
    ],
)
def test_bad_settings_raise_configuration_error_naming_the_setting(
    kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        RedisRegistry(URL, **kwargs)


def test_a_bad_url_is_named() -> None:
    with pytest.raises(ConfigurationError, match="url"):
        RedisRegistry("http://127.0.0.1:6379")


def test_the_state_is_one_enum_with_checked_transitions() -> None:
    registry = RedisRegistry(URL)
    assert registry.state is LinkState.STOPPED
    assert not registry.available
    with pytest.raises(RuntimeError, match="illegal transition"):
        registry._enter(LinkState.AVAILABLE)  # never straight from stopped
    for flag in ("_available", "_outage", "_leased", "_dirty"):
        assert not hasattr(registry, flag), flag


def test_the_memory_registry_is_used_through_its_public_surface() -> None:
    source = inspect.getsource(redis_backend)
    assert "self._local._" not in source
    assert "local._" not in source.replace("self._local.", "")


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.timeout(30)
async def test_a_removal_cancelled_while_waiting_for_redis_is_still_done(
    redis_server: RedisServer,
) -> None:
    """The connection code calls remove() unshielded in teardown. Cancel it while it waits for
    a pool connection (both are busy): the session must still leave Redis."""
    prefix = f"structure-{secrets.token_hex(4)}"
    registry = RedisRegistry(
        redis_server.url, prefix=prefix, heartbeat=0.5, max_connections=2, command_timeout=1.0
    )
    manager = SessionManager(registry=registry, drain_on_signal=False)
    direct = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with manager:
            session = live_session(manager, "victim")
            await registry.add(session)
            assert await direct.exists(f"{prefix}:s:victim")
            # The listener holds one connection; blocking pops hold the others for 1.5 s.
            blockers = [
                asyncio.create_task(registry.redis.blpop([f"{prefix}:nothing"], 1.5))
                for _ in range(registry._pool.max_connections - 1)
            ]
            await asyncio.sleep(0.1)  # let the pops take their connections (no event to wait on)
            removal = asyncio.create_task(registry.remove(session))
            await asyncio.sleep(0.05)  # the removal is now waiting for a connection
            assert registry._local.local_session("victim") is None  # done before any await
            removal.cancel()
            with pytest.raises(asyncio.CancelledError):
                await removal
            await asyncio.gather(*blockers)

            async def gone_from_redis() -> bool:
                return not await direct.exists(f"{prefix}:s:victim")

            await wait_for(gone_from_redis, 10, "the cancelled removal to reach Redis")
            assert not await direct.sismember(f"{prefix}:sessions", "victim")
    finally:
        await direct.aclose()
