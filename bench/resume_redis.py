"""The Redis half of ``bench.resume``: a private redis-server, managers on ``RedisRegistry``, and
what the measurements read from Redis (its CPU time, ``INFO used_memory``, ``MEMORY USAGE``).

The redis-server runs on a free loopback port in a temporary folder, keeps nothing on disk and is
stopped (and its folder removed) on exit; never the machine's 6379.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from example_app.procs import free_port, redis_binary, start_redis, stop
from wsession import SessionManager

from .procs import cpu_ns
from .resume_measure import Make

SECRET = "s" * 32
"""The ``resume_secret`` every worker shares (as a deployment configures it)."""


@dataclass
class PrivateRedis:
    """A redis-server this harness started."""

    url: str
    pid: int
    version: str

    def cpu(self) -> int:
        """CPU ns the redis-server has used so far (all its threads)."""
        return cpu_ns([self.pid])


@contextmanager
def private_redis() -> Iterator[PrivateRedis | None]:
    """A redis-server on a free 127.0.0.1 port for the ``with`` block; None (nothing started)
    when ``redis-server`` is not installed."""
    binary = redis_binary()
    if binary is None:
        yield None
        return
    import subprocess

    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=10
    ).stdout.split()
    folder = tempfile.mkdtemp(prefix="wsession-bench-resume-")
    port = free_port()
    proc = start_redis(binary, port, folder)
    try:
        yield PrivateRedis(
            f"redis://127.0.0.1:{port}/0",
            proc.pid,
            next((w[2:] for w in version if w.startswith("v=")), "?"),
        )
    finally:
        stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


def redis_maker(url: str, prefix: str, resume: dict[str, Any]) -> Make:
    """Managers on one ``RedisRegistry`` prefix (so several are workers of one cluster), with
    ``resume`` settings (empty: resumption off)."""
    from wsession.backends.redis import RedisRegistry

    def make() -> SessionManager:
        settings = {**resume, "resume_secret": SECRET} if resume else {}
        return SessionManager(registry=RedisRegistry(url, prefix=prefix), **settings)

    return make


class RedisStore:
    """``resume_measure.Store`` over a redis-server: ``INFO used_memory`` and ``MEMORY USAGE``
    (``SAMPLES 0``: every element counted) of one session's hash, group set and journal."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def reset(self) -> None:
        await self.client.flushdb()

    async def used(self) -> int:
        info = await self.client.info("memory")
        return int(info["used_memory"])

    async def sample(self, manager: SessionManager, detached: bool) -> dict[str, int]:
        if detached:
            ids = list(manager.detached)
        else:
            ids = [s for s in manager.local if s not in manager.detached]
        if not ids:
            return {}
        sid = ids[len(ids) // 2]
        sizes = {}
        for kind in ("s", "sg", "j"):
            size = await self.client.memory_usage(f"{self.prefix}:{kind}:{sid}", samples=0)
            sizes[kind] = int(size or 0)
        return sizes


@asynccontextmanager
async def redis_store(url: str, prefix: str) -> AsyncIterator[RedisStore]:
    """A :class:`RedisStore` with its own client, closed on exit."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, decode_responses=True)
    try:
        yield RedisStore(client, prefix)
    finally:
        await client.aclose()
