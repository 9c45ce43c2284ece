"""Resumption with RedisRegistry (issue 14): what holds today, on two workers in one process.

A session detaches on the worker that held its connection; messages sent to it from another
worker (through Redis) are numbered and kept there, and its client resumes it on that worker.
A resume that reaches the other worker gets a new session (cross-worker resumption is not
built), and the detached one still ends exactly once when its window runs out.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from wsession import EndReason, SendResult, SessionManager

from .redis_support import RedisServer
from .support import HookRecorder, mount, reset_connection, run_server
from .test_resume import app_endpoint

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(60)]


def worker(url: str, prefix: str, window: float) -> tuple[SessionManager, HookRecorder]:
    from wsession.backends.redis import RedisRegistry

    manager = SessionManager(
        registry=RedisRegistry(url, prefix=prefix, heartbeat=0.5),
        resume_window=window,
        resume_seq_field="seq",
        resume_secret="s" * 32,  # shared by the workers, as a deployment would configure it
    )
    recorder = HookRecorder()
    recorder.install(manager)
    return manager, recorder


async def hello(base: str, query: str = "") -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{base}/ws{query}", open_timeout=10)
    async with asyncio.timeout(10):
        welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws, welcome


async def detached(manager: SessionManager, session_id: str) -> None:
    async with asyncio.timeout(10):
        while session_id not in manager.detached:  # noqa: ASYNC110 - bounded; no event here
            await asyncio.sleep(0.01)


async def test_a_message_from_another_worker_reaches_a_detached_session_on_resume(
    redis_server: RedisServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, _ = worker(redis_server.url, prefix, 30)
    b, _ = worker(redis_server.url, prefix, 30)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(a)
        await stack.enter_async_context(b)
        server_a = await stack.enter_async_context(run_server(mount(app_endpoint, a)))
        ws, welcome = await hello(server_a.ws)
        sid = welcome["id"]
        assert await b.send(sid, {"n": 0}) in (SendResult.QUEUED, SendResult.DELIVERED)
        async with asyncio.timeout(10):
            first = json.loads(await ws.recv())
        assert first == {"seq": 1, "n": 0}
        reset_connection(ws)
        await detached(a, sid)
        for i in range(1, 4):  # through Redis to worker A, which keeps them for the replay
            assert await b.send(sid, {"n": i}) is SendResult.QUEUED
        back, again = await hello(server_a.ws, f"?resume={welcome['resume']}&last=1")
        assert again["resumed"] is True and again["id"] == sid
        async with asyncio.timeout(10):
            replay = [json.loads(await back.recv()) for _ in range(3)]
        assert replay == [{"seq": s, "n": s - 1} for s in (2, 3, 4)]
        await back.close()


async def test_a_resume_on_the_other_worker_gets_a_new_session_and_the_old_ends_once(
    redis_server: RedisServer,
) -> None:
    prefix = f"resume-{secrets.token_hex(4)}"
    a, recorder_a = worker(redis_server.url, prefix, 1.0)
    b, recorder_b = worker(redis_server.url, prefix, 1.0)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(a)
        await stack.enter_async_context(b)
        server_a = await stack.enter_async_context(run_server(mount(app_endpoint, a)))
        server_b = await stack.enter_async_context(run_server(mount(app_endpoint, b)))
        ws, welcome = await hello(server_a.ws)
        reset_connection(ws)
        await detached(a, welcome["id"])
        other, fresh = await hello(server_b.ws, f"?resume={welcome['resume']}&last=0")
        assert fresh["resumed"] is False and fresh["id"] != welcome["id"]
        assert b.stats.resume_failed["unknown"] == 1
        await recorder_a.wait_ended(1)  # the window (1 s) ran out on worker A
        assert recorder_a.ended == [(welcome["id"], EndReason.RESUME_EXPIRED, 1005, None)]
        async with asyncio.timeout(10):
            while await b.count() != 1:  # noqa: ASYNC110 - the removal reaches Redis after the hooks
                await asyncio.sleep(0.02)
        assert [s.id for s in await b.sessions()] == [fresh["id"]]
        await other.close()
        await recorder_b.wait_ended(1)
    assert recorder_a.ended_ids() == [welcome["id"]]
