"""``python -m bench.redis_latency``: cross-worker send-by-id latency over a loopback Redis.

Starts a private ``redis-server`` on a free port and one worker of the example app (uvicorn, its
own process) on the Redis registry; a client connects to that worker; this process, a second
worker's ``SessionManager`` on the same Redis, sends to the client's id and times each send
until the client has the frame. Prints p50/p99/max over the measured sends. Everything it starts
is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time

from websockets.asyncio.client import connect

from example_app.procs import (
    free_port,
    redis_binary,
    start_redis,
    start_worker,
    stop,
    wait_for_port,
)
from wsession import SessionManager
from wsession.backends.redis import RedisRegistry


async def measure(sends: int, warmup: int) -> list[float]:
    """Latencies in milliseconds of ``sends`` cross-worker sends (after ``warmup`` more)."""
    binary = redis_binary()
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis_port, app_port = free_port(), free_port()
        folder = tempfile.mkdtemp(prefix="wsession-bench-redis-")
        started.append(start_redis(binary, redis_port, folder))
        url = f"redis://127.0.0.1:{redis_port}/0"
        env = {**os.environ, "WSESSION_REDIS_URL": url, "WSESSION_REDIS_PREFIX": "bench"}
        started.append(start_worker(app_port, env))
        wait_for_port(app_port, started[-1], "example worker", timeout=20)
        ws = await connect(f"ws://127.0.0.1:{app_port}/ws?name=bench")
        target = json.loads(await ws.recv())["id"]
        manager = SessionManager(registry=RedisRegistry(url, prefix="bench"))
        latencies: list[float] = []
        async with manager, asyncio.timeout(120):
            for i in range(warmup + sends):
                started_at = time.perf_counter()
                await manager.send(target, {"i": i})
                while json.loads(await ws.recv()).get("i") != i:
                    pass  # presence or other chatter
                if i >= warmup:
                    latencies.append((time.perf_counter() - started_at) * 1000)
        await ws.close()
        return latencies
    finally:
        for proc in reversed(started):  # the worker before the Redis it uses
            stop(proc)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one line of results."""
    parser = argparse.ArgumentParser(prog="python -m bench.redis_latency")
    parser.add_argument("--sends", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    latencies = sorted(asyncio.run(measure(args.sends, args.warmup)))
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"cross-worker send-by-id over loopback Redis: n={len(latencies)} "
        f"p50={p50:.3f} ms p99={p99:.3f} ms max={latencies[-1]:.3f} ms (target p99 <= 2 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
