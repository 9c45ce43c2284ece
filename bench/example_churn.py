"""``python -m bench.example_churn``: the example app with 2,000 connections coming and going.

Issue 15's second target: one worker of the example app (its own launcher, ``python -m
example_app``, presence on, resumption on, permessage-deflate as the launcher sets it) with
``--clients`` connections open at once, arriving over ``--ramp`` seconds and then, for
``--seconds``, leaving and arriving continuously (``--churn`` of them per second: half close
cleanly, half drop without a close frame) while ``--talkers`` connections send cross traffic
(each a room message and a direct message per second, and one broadcast every 5 seconds from one
of them; every client is in one of ten rooms). The clients are spread over ``--processes`` Python
processes (2 by default) that read everything they are sent. Reported: the handshake
latency (TCP connect to the welcome) of every connection made, p50 / p99 / max, failures, and
the server's CPU time. The client runs on the same machine, so the numbers include that
contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from .presence import cpu_seconds


async def run(port: int, share: int, args: argparse.Namespace) -> dict[str, Any]:
    """One client process's part: ``args.clients`` connections (already divided), churn and
    talkers; returns its raw observations for the parent to merge."""
    from websockets.asyncio.client import ClientConnection, connect

    rng = random.Random(15 + share)
    handshakes: list[float] = []
    failures = 0
    live: dict[str, ClientConnection] = {}
    readers: set[asyncio.Task[None]] = set()
    received = 0
    counter = 0

    async def drain(ws: ClientConnection) -> None:
        nonlocal received
        try:
            async for _ in ws:
                received += 1
        except Exception:
            pass

    async def arrive() -> None:
        nonlocal failures, counter
        counter += 1
        name = f"p{share}user{counter % (args.clients // 2 or 1)}"
        began = time.perf_counter()
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws?name={name}", max_queue=None, open_timeout=30
            )
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except Exception:
            failures += 1
            return
        handshakes.append(time.perf_counter() - began)
        live[welcome["id"]] = ws
        if args.rooms:
            await ws.send(json.dumps({"type": "join", "group": f"room{counter % 10}"}))
        task = asyncio.create_task(drain(ws))
        readers.add(task)
        task.add_done_callback(readers.discard)

    client_before = time.process_time()
    started = time.perf_counter()
    arrivals = []
    for _ in range(args.clients):
        arrivals.append(asyncio.create_task(arrive()))
        await asyncio.sleep(args.ramp / args.clients)
    await asyncio.gather(*arrivals)
    ramp_done = time.perf_counter()

    async def talk() -> None:
        for second in range(int(args.seconds)):  # bounded
            ids = list(live)
            for talker in ids[: args.talkers]:
                ws = live.get(talker)
                if ws is None:
                    continue
                messages: list[dict[str, Any]] = [
                    {"type": "group", "group": f"room{second % 10}", "text": "g"},
                    {"type": "dm", "to": rng.choice(ids), "text": "d"},
                ]
                if talker == ids[0] and second % 5 == 0:
                    messages.append({"type": "broadcast", "text": f"b{second}"})
                for message in messages:
                    try:
                        await ws.send(json.dumps(message))
                    except Exception:
                        break
            await asyncio.sleep(1)

    async def churn() -> None:
        for _ in range(int(args.seconds)):  # bounded
            tick = time.perf_counter()
            leaving = rng.sample(list(live)[args.talkers :], min(args.churn, len(live)))
            for i, session_id in enumerate(leaving):
                ws = live.pop(session_id)
                if i % 2:
                    ws.transport.abort()
                else:
                    await ws.close()
            await asyncio.gather(*(arrive() for _ in leaving))
            await asyncio.sleep(max(0.0, 1 - (time.perf_counter() - tick)))

    await asyncio.gather(talk(), churn())
    elapsed = time.perf_counter() - started
    for ws in live.values():
        ws.transport.abort()
    for task in list(readers):
        task.cancel()
    return {
        "handshakes": handshakes,
        "failed": failures,
        "open_at_end": len(live),
        "ramp_s": ramp_done - started,
        "messages_received": received,
        "client_cpu_share": (time.process_time() - client_before) / elapsed,
    }


def merge(parts: list[dict[str, Any]], server_cpu: float, elapsed: float) -> dict[str, Any]:
    handshakes = sorted(h for part in parts for h in part["handshakes"])
    n = len(handshakes)
    return {
        "client_processes": len(parts),
        "connections_made": n,
        "failed": sum(part["failed"] for part in parts),
        "open_at_end": sum(part["open_at_end"] for part in parts),
        "ramp_s": round(max(part["ramp_s"] for part in parts), 2),
        "messages_received": sum(part["messages_received"] for part in parts),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_share": round(server_cpu / elapsed, 2),
        "client_cpu_share": round(sum(part["client_cpu_share"] for part in parts), 2),
        "handshake_p50_ms": round(1000 * handshakes[n // 2], 1) if n else None,
        "handshake_p99_ms": round(1000 * handshakes[min(n - 1, int(n * 0.99))], 1) if n else None,
        "handshake_max_ms": round(1000 * handshakes[-1], 1) if n else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--ramp", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--churn", type=int, default=100, help="connections replaced per second")
    parser.add_argument("--talkers", type=int, default=10)
    parser.add_argument("--rooms", type=int, default=1, help="0: clients join no room")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)  # PORT SHARE
    args = parser.parse_args(argv)
    if args.child:  # one client process: its part of every count
        port, share = args.child
        print(json.dumps(asyncio.run(run(port, share, args))))
        return 0
    from example_app.procs import free_port, start_worker, stop, wait_for_port

    port = free_port()
    env = {**os.environ, "WSESSION_MAX_PER_IP": "100000", "WSESSION_MAX_SESSIONS": "100000"}
    proc = start_worker(port, env)
    children: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_port(port, proc, "example app")
        k = args.processes
        part = [
            f"--clients={args.clients // k}",
            f"--churn={max(1, args.churn // k)}",
            f"--talkers={max(1, args.talkers // k)}",
            f"--ramp={args.ramp}",
            f"--seconds={args.seconds}",
            f"--rooms={args.rooms}",
        ]
        cpu_before, started = cpu_seconds(proc.pid), time.perf_counter()
        for share in range(k):
            argv_child = [sys.executable, "-m", "bench.example_churn", *part]
            argv_child += ["--child", str(port), str(share)]
            children.append(subprocess.Popen(argv_child, stdout=subprocess.PIPE))
        budget = args.ramp + args.seconds + 120  # bounded: a stuck client is killed
        outputs = [child.communicate(timeout=budget)[0] for child in children]
        server_cpu, elapsed = cpu_seconds(proc.pid) - cpu_before, time.perf_counter() - started
        parts = [json.loads(out.decode().strip().splitlines()[-1]) for out in outputs]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        stop(proc)
    print(json.dumps(merge(parts, server_cpu, elapsed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
