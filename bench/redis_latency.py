"""``python -m bench.redis_latency``: cross-worker send-by-id latency and a broadcast across two
workers, over a loopback single Redis and over a loopback 3-master Redis Cluster.

For each target (``--target single``, ``cluster`` or ``both``, the default) it starts private
``redis-server`` processes on free ports (one, or three cluster-enabled masters) and two workers
of the example app (uvicorn, each its own process) on the Redis registry (the workers are given
one node's URL and find out that it is a cluster). This process, a third node's
``SessionManager`` on the same Redis, (1) sends to a client's id on the first worker and times
each send until the client has the frame (p50/p99/max), and (2) broadcasts to clients spread
over both workers and times trigger to last receipt. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from example_app.procs import (
    free_port,
    redis_binary,
    start_redis,
    start_worker,
    stop,
    wait_for_port,
)
from tests.redis_support import RedisClusterServer  # the cluster the tests start, reused
from wsession import SessionManager
from wsession.backends.redis import RedisRegistry


async def measure(
    sends: int, warmup: int, clients: int, rounds: int, *, cluster: bool = False
) -> tuple[list[float], list[float]]:
    """Milliseconds of ``sends`` cross-worker sends by id, and of ``rounds`` broadcasts to
    ``clients`` connections spread over two workers (each after warm-up), on a single Redis or
    (``cluster``) a 3-master Redis Cluster."""
    binary = redis_binary()
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    started: list[subprocess.Popen[bytes]] = []
    nodes: RedisClusterServer | None = None
    try:
        ports = (free_port(), free_port())
        folder = tempfile.mkdtemp(prefix="wsession-bench-redis-")
        if cluster:
            nodes = RedisClusterServer(binary, Path(folder))
            nodes.start()
            url = nodes.url
        else:
            redis_port = free_port()
            started.append(start_redis(binary, redis_port, folder))
            url = f"redis://127.0.0.1:{redis_port}/0"
        env = {**os.environ, "WSESSION_REDIS_URL": url, "WSESSION_REDIS_PREFIX": "bench"}
        for port in ports:
            started.append(start_worker(port, env))
            wait_for_port(port, started[-1], "example worker", timeout=20)
        manager = SessionManager(registry=RedisRegistry(url, prefix="bench"))
        async with manager, asyncio.timeout(300):
            by_id = await _send_by_id(manager, ports[0], sends, warmup)
            broadcast = await _broadcast(manager, ports, clients, rounds)
        return by_id, broadcast
    finally:
        for proc in reversed(started):  # the workers before the Redis they use
            stop(proc)
        if nodes is not None:
            nodes.stop()


async def _send_by_id(manager: SessionManager, port: int, sends: int, warmup: int) -> list[float]:
    ws = await connect(f"ws://127.0.0.1:{port}/ws?name=bench")
    target = json.loads(await ws.recv())["id"]
    latencies: list[float] = []
    for i in range(warmup + sends):
        started_at = time.perf_counter()
        await manager.send(target, {"i": i})
        while json.loads(await ws.recv()).get("i") != i:
            pass  # presence or other chatter
        if i >= warmup:
            latencies.append((time.perf_counter() - started_at) * 1000)
    await ws.close()
    return latencies


async def _broadcast(
    manager: SessionManager, ports: tuple[int, int], clients: int, rounds: int
) -> list[float]:
    sockets = []
    for n in range(clients):
        ws = await connect(f"ws://127.0.0.1:{ports[n % 2]}/ws?name=b{n}", max_queue=None)
        await ws.recv()  # welcome
        sockets.append(ws)

    async def receipt(ws: Any, round_: int) -> None:
        while json.loads(await ws.recv()).get("round") != round_:
            pass  # presence events of the others joining

    timings: list[float] = []
    for round_ in range(3 + rounds):  # 3 warm-up rounds
        started_at = time.perf_counter()
        await manager.broadcast({"round": round_})
        await asyncio.gather(*(receipt(ws, round_) for ws in sockets))
        if round_ >= 3:
            timings.append((time.perf_counter() - started_at) * 1000)
    await asyncio.gather(*(ws.close() for ws in sockets))
    return timings


def main(argv: list[str] | None = None) -> int:
    """Run the measurement on each target and print a small Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.redis_latency")
    parser.add_argument("--sends", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clients", type=int, default=400, help="for the broadcast")
    parser.add_argument("--rounds", type=int, default=20, help="broadcasts measured")
    parser.add_argument("--target", choices=("single", "cluster", "both"), default="both")
    args = parser.parse_args(argv)
    targets = ["single", "cluster"] if args.target == "both" else [args.target]
    rows = []
    for target in targets:
        by_id, broadcast = asyncio.run(
            measure(args.sends, args.warmup, args.clients, args.rounds, cluster=target == "cluster")
        )
        by_id.sort()
        p50 = by_id[len(by_id) // 2]
        p99 = by_id[min(len(by_id) - 1, int(len(by_id) * 0.99))]
        name = "single Redis" if target == "single" else "Redis Cluster (3 masters)"
        rows.append(
            f"| {name} | {len(by_id)} | {p50:.3f} | {p99:.3f} | {by_id[-1]:.3f} "
            f"| {statistics.median(broadcast):.2f} | {min(broadcast):.2f} | {max(broadcast):.2f} |"
        )
    print(
        "Cross-worker send by id (third node to a client on worker 1), and broadcast to "
        f"{args.clients} clients on two workers (trigger to last receipt, {args.rounds} rounds)."
    )
    print()
    print(
        "| Redis | sends | send p50 ms | send p99 ms | send max ms "
        "| broadcast median ms | min | max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
