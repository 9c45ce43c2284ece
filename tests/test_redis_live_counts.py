"""Healing a lost worker ends its sessions on the survivor: those endings must not make the
survivor's own live count (metrics gauge, admin ``local_live``) drop."""

from __future__ import annotations

import secrets
import signal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, WebSocketRoute
from websockets.asyncio.client import connect

from wsession import SessionManager, WSessionMiddleware
from wsession.admin import admin_app
from wsession.backends.redis import RedisRegistry
from wsession.metrics import SessionMetrics

from .redis_support import RedisServer
from .support import announce_and_read, run_server
from .test_redis_healing import HEARTBEAT, Recorder, wait_for
from .test_redis_incarnation import node_process

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]
TOKEN = "live-counts-token"


async def test_healing_a_lost_worker_keeps_the_survivors_live_count(
    redis_server: RedisServer,
) -> None:
    prefix = f"live-{secrets.token_hex(4)}"
    manager = SessionManager(
        registry=RedisRegistry(redis_server.url, prefix=prefix, heartbeat=HEARTBEAT),
        drain_on_signal=False,
    )
    recorder = Recorder()
    recorder.install(manager, "survivor")
    app = Starlette(
        routes=[
            WebSocketRoute("/ws", announce_and_read),
            Mount("/admin", admin_app(manager, token=TOKEN)),
        ],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )
    async with manager, run_server(app) as server:
        ws = await connect(f"{server.ws}/ws")
        await ws.recv()
        with node_process(redis_server.url, prefix, "", 2) as proc:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

            async def healed() -> bool:
                return len(recorder.node_lost()) >= 2

            await wait_for(healed, 15, "the killed worker's sessions to be healed here")
        assert manager.stats.ended == 2 and manager.stats.accepted == 1
        gauge = {m.name: m.samples[0].value for m in SessionMetrics(manager).collect() if m.samples}
        assert gauge["wsession_sessions_live"] == 1
        async with httpx.AsyncClient(base_url=server.http) as client:
            stats = (
                await client.get("/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            ).json()
        assert stats["local_live"] == 1
        assert stats["live"] == 1
        await ws.close()
