"""A worker that registers fake sessions in Redis under a given node id, then idles until it
is killed: ``python -m tests.apps.redis_node URL PREFIX NODE_ID COUNT HEARTBEAT``.

Tests kill it with SIGKILL to leave a crashed worker's lease and sessions behind."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.support import open_session
from wsession import Session, SessionManager
from wsession.backends.redis import RedisRegistry


def fake_session(manager: SessionManager, session_id: str) -> Session:
    """An open session whose frames go nowhere."""

    async def send(message: Any) -> None:
        return None

    return open_session(session_id, send, manager.new_data())


async def main(url: str, prefix: str, node_id: str, count: int, heartbeat: float) -> None:
    registry = RedisRegistry(url, prefix=prefix, node_id=node_id or None, heartbeat=heartbeat)
    manager = SessionManager(registry=registry, drain_on_signal=False)
    async with manager:
        for i in range(count):
            await registry.add(fake_session(manager, f"{registry.node_id}-s{i}"))
        print("ready", registry.node_id, flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    url, prefix, node_id, count, heartbeat = sys.argv[1:6]
    asyncio.run(main(url, prefix, node_id, int(count), float(heartbeat)))
