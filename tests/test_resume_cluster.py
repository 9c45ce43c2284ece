"""Resumption across worker processes on one Redis (issue 14): ``kill -9`` of a worker (also on a
3-master Redis Cluster) and a rolling restart, under continuous numbered traffic, with real
example-app workers.

Each client checks what the contract promises: the welcome's ``resume`` token; every other
message numbered 1, 2, 3, ... per session, never reset, never repeated, never skipped; and
every broadcast of the talker (a client on a worker that stays up) received exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
from contextlib import AsyncExitStack, ExitStack

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from example_app.procs import free_port, start_worker, stop, wait_for_port

from .redis_support import RedisClusterServer, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.timeout(180)]

CLIENTS = 500
RATE = 10  # talker broadcasts per second: 5,000 numbered frames per second to the clients


def worker_env(redis: RedisServer | RedisClusterServer, prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "WSESSION_REDIS_URL": redis.url,
        "WSESSION_REDIS_PREFIX": prefix,
        "WSESSION_HEARTBEAT": "0.5",
        # 500 clients, two workers and up to three Redis processes share 2 cores here: Redis
        # itself, starved, sometimes answers later than the default 1 s, which is an outage by
        # that setting (resumable sends then go out unnumbered, as documented). This test is
        # about a crashed worker, not about outages: give Redis 3 s.
        "WSESSION_REDIS_COMMAND_TIMEOUT": "3",
        "WSESSION_RESUME_WINDOW": "60",
        "WSESSION_RESUME_SECRET": "k" * 32,
        "WSESSION_MAX_PER_IP": "10000",
        "WSESSION_MAX_SESSIONS": "10000",
        "WSESSION_DRAIN_TIMEOUT": "5",
    }


class Client:
    """One numbered conversation: reconnects and resumes until told to stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.id = ""
        self.token = ""
        self.last = 0
        self.seqs: list[int] = []
        self.broadcasts: list[int] = []
        self.resumed = 0
        self.fresh_after_drop = 0
        self.ws: ClientConnection | None = None
        self.welcomed = asyncio.Event()

    async def run(self, ports: list[int], stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set() and attempt < 200:  # bounded: each attempt waits or reads
            port = ports[attempt % len(ports)]
            attempt += 1
            query = f"?name={self.name}"
            if self.token:
                query += f"&resume={self.token}&last={self.last}"
            try:
                async with connect(
                    f"ws://127.0.0.1:{port}/ws{query}", open_timeout=20, max_size=None
                ) as ws:
                    self.ws = ws
                    welcome = json.loads(await ws.recv())
                    assert welcome["type"] == "welcome"
                    if self.token:
                        if welcome["resumed"]:
                            assert welcome["id"] == self.id
                            self.resumed += 1
                        else:
                            self.fresh_after_drop += 1
                            return  # a fresh session: the conversation is broken
                    self.id, self.token = welcome["id"], welcome["resume"]
                    self.welcomed.set()
                    async for raw in ws:
                        message = json.loads(raw)
                        self.seqs.append(message["seq"])
                        self.last = message["seq"]
                        if message.get("type") == "broadcast":
                            self.broadcasts.append(int(message["text"]))
            except (OSError, ConnectionClosed, TimeoutError):
                pass  # dropped (the worker died, drained or restarts): resume
            finally:
                self.ws = None
            if not stop.is_set():
                await asyncio.sleep(0.05 * (1 + secrets.randbelow(10)))  # reconnect jitter

    def check(self, first_broadcast: int, last_broadcast: int) -> list[str]:
        problems = []
        if self.seqs != list(range(1, len(self.seqs) + 1)):
            problems.append(f"{self.name}: numbers not 1..n once each")
        got = [b for b in self.broadcasts if b >= first_broadcast]
        if got != list(range(first_broadcast, last_broadcast + 1)):
            missing = sorted(set(range(first_broadcast, last_broadcast + 1)) - set(got))
            problems.append(
                f"{self.name}: broadcasts missing {missing[:5]} dup {len(got) - len(set(got))}"
            )
        return problems


def stop_port(procs: dict[int, subprocess.Popen[bytes]], port: int) -> None:
    stop(procs[port])


async def talk(port: int, count: list[int], stop: asyncio.Event) -> None:
    """Broadcast 0, 1, 2, ... from a client on a worker that stays, until stopped."""
    async with connect(f"ws://127.0.0.1:{port}/ws?name=talker", open_timeout=20) as ws:
        await ws.recv()  # welcome
        for n in range(100_000):  # bounded: stopped long before
            if stop.is_set():
                break
            await ws.send(json.dumps({"type": "broadcast", "text": str(n)}))
            count[0] = n
            await asyncio.sleep(1 / RATE)  # the traffic's pace, not synchronisation


async def scenario(redis_server: RedisServer | RedisClusterServer, disrupt: str) -> None:
    prefix = f"rc-{secrets.token_hex(4)}"
    env = worker_env(redis_server, prefix)
    # The clients' two workers; for a rolling restart the talker has a third, which stays.
    ports = [free_port(), free_port()]
    talker_port = ports[1] if disrupt == "kill" else free_port()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    with ExitStack() as cleanup:
        for port in {*ports, talker_port}:
            procs[port] = start_worker(port, env)
            cleanup.callback(stop_port, procs, port)
        for port in procs:
            wait_for_port(port, procs[port], "example worker", timeout=30)
        victim, survivor = ports
        clients = [Client(f"c{i}") for i in range(CLIENTS)]
        stopping = asyncio.Event()
        async with AsyncExitStack():
            tasks = [asyncio.create_task(c.run([victim, survivor], stopping)) for c in clients]
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.welcomed.wait() for c in clients))
            sent = [-1]
            talker = asyncio.create_task(talk(talker_port, sent, stopping))
            async with asyncio.timeout(20):
                while sent[0] < 2 * RATE:  # noqa: ASYNC110 - two seconds of traffic first
                    await asyncio.sleep(0.05)
            first = sent[0] + 1  # every client is connected by now: it must get all from here
            if disrupt == "kill":
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(timeout=10)
            else:  # a rolling restart: drain and restart each worker in turn
                for port in ports:
                    procs[port].send_signal(signal.SIGTERM)
                    procs[port].wait(timeout=30)
                    procs[port] = start_worker(port, env)
                    wait_for_port(port, procs[port], "example worker", timeout=30)

            def settled() -> int:
                return sum(c.resumed + c.fresh_after_drop for c in clients)

            async with asyncio.timeout(60):
                while settled() < CLIENTS:  # noqa: ASYNC110 - bounded; other processes' work
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # two more seconds of live traffic after the resumes
            stopping.set()
            await talker
            last = sent[0]
            async with asyncio.timeout(30):  # the tail of the traffic reaches everyone
                while any(  # noqa: ASYNC110 - bounded
                    c.ws is not None and (not c.broadcasts or c.broadcasts[-1] < last)
                    for c in clients
                ):
                    await asyncio.sleep(0.1)
            for c in clients:
                if c.ws is not None:
                    await c.ws.close()
            await asyncio.gather(*tasks)
        resumed = sum(1 for c in clients if c.resumed and not c.fresh_after_drop)
        assert resumed >= 0.999 * CLIENTS, f"only {resumed} of {CLIENTS} resumed"
        problems = [p for c in clients for p in c.check(first, last)]
        assert problems == []


async def test_kill_9_of_a_worker_with_500_clients_loses_nothing(
    any_redis: RedisServer | RedisClusterServer,
) -> None:
    await scenario(any_redis, "kill")


async def test_a_rolling_restart_of_two_workers_loses_nothing(redis_server: RedisServer) -> None:
    await scenario(redis_server, "rolling")
