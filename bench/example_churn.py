"""``python -m bench.example_churn``: the example app with 2,000 connections coming and going.

Issue 15's second target: one worker of the example app (its own launcher, ``python -m
example_app``, presence on, resumption on, permessage-deflate as the launcher sets it) with
``--clients`` connections open at once, arriving over ``--ramp`` seconds and then, for
``--seconds``, leaving and arriving continuously (``--churn`` of them per second: half close
cleanly, half drop without a close frame) while ``--talkers`` connections send cross traffic
(each a room message and a direct message per second, and one broadcast every 5 seconds from one
of them; every client is in one of ten rooms). The clients are spread over ``--processes`` Python
processes (2 by default) that read everything they are sent. Reported: the handshake
latency (TCP connect to the welcome's arrival) of every connection made, p50 / p99 / max,
failures, the server's CPU time, what the clients received by JSON ``type`` (count and MB; the
lobby's presence diffs apart from the rooms'), and the server's ``/api/stats`` at the end.
``--dump FILE`` keeps each client process's per-second counts and handshake timeline;
``--profile FILE`` samples the server with py-spy for the run; ``--spread`` replaces the
connections one at a time over each second instead of in one burst. The clients run on the same
machine, so the numbers include that contention: they read the welcome's id without decoding
the whole welcome, which lists everyone online.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
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
    kinds: dict[str, int] = {}  # message "type" -> count
    rooms: dict[str, int] = {}  # room -> connections that joined it
    kind_bytes: dict[str, int] = {}
    per_second: dict[int, int] = {}  # seconds since start -> messages received

    async def drain(ws: ClientConnection) -> None:
        nonlocal received
        try:
            async for text in ws:
                received += 1
                kind = _kind(text)
                kinds[kind] = kinds.get(kind, 0) + 1
                kind_bytes[kind] = kind_bytes.get(kind, 0) + len(text)
                second = int(time.perf_counter() - started)
                per_second[second] = per_second.get(second, 0) + 1
        except Exception:
            pass

    async def arrive() -> None:
        nonlocal failures, counter
        counter += 1
        number = counter  # this arrival's own: ``counter`` moves on during the handshake
        name = f"p{share}user{number % (args.clients // 2 or 1)}"
        began = time.perf_counter()
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws?name={name}", max_queue=None, open_timeout=30
            )
            welcome_text = await asyncio.wait_for(ws.recv(), 30)
        except Exception:
            failures += 1
            return
        handshakes.append(time.perf_counter() - began)
        # The id without parsing the whole welcome: it lists everyone online (~200 kB at 2,000
        # connections) and decoding it took a share of the clients' CPU, which shares the cores
        # with the server (see BENCHMARKS.md).
        session_id = _welcome_id(welcome_text)
        timeline.append((round(began - started, 2), round(handshakes[-1], 3)))
        kinds["welcome"] = kinds.get("welcome", 0) + 1
        kind_bytes["welcome"] = kind_bytes.get("welcome", 0) + len(welcome_text)
        live[session_id] = ws
        if args.rooms:
            room = f"room{number % 10}"
            rooms[room] = rooms.get(room, 0) + 1
            await ws.send(json.dumps({"type": "join", "group": room}))
        task = asyncio.create_task(drain(ws))
        readers.add(task)
        task.add_done_callback(readers.discard)

    timeline: list[tuple[float, float]] = []  # (began, handshake seconds) per connection
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
            arriving = []
            for i, session_id in enumerate(leaving):
                ws = live.pop(session_id)
                if i % 2:
                    ws.transport.abort()
                else:
                    await ws.close()
                if args.spread:  # one replacement at a time, evenly over the second
                    arriving.append(asyncio.create_task(arrive()))
                    await asyncio.sleep(
                        max(0.0, tick + (i + 1) / len(leaving) - time.perf_counter())
                    )
            if not args.spread:  # the whole second's replacements at once
                arriving = [asyncio.create_task(arrive()) for _ in leaving]
            await asyncio.gather(*arriving)
            await asyncio.sleep(max(0.0, 1 - (time.perf_counter() - tick)))

    await asyncio.gather(talk(), churn())
    churn_done = time.perf_counter()
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
        "churn_s": churn_done - ramp_done,
        "messages_received": received,
        "kinds": kinds,
        "rooms_joined": rooms,
        "kind_bytes": kind_bytes,
        "per_second": per_second,
        "timeline": timeline,
        "client_cpu_share": (time.process_time() - client_before) / elapsed,
    }


def _welcome_id(text: str | bytes) -> str:
    """The session id of a welcome (``{"type":"welcome","id":ID,...}``, as the example's
    compact JSON writes it), read from its head."""
    if isinstance(text, bytes):
        text = text.decode()
    head = json.loads(text[: text.index(',"name":')] + "}")
    if head.get("type") != "welcome":
        raise ValueError(f"not a welcome: {text[:80]!r}")
    return str(head["id"])


def _kind(text: str | bytes) -> str:
    """A message's JSON "type", found without parsing it (the clients read every diff)."""
    if isinstance(text, bytes):
        return "binary"
    at = text.find('"type":"')
    if at < 0:
        return "?"
    kind = text[at + 8 : text.find('"', at + 8)]
    if kind == "presence_diff":  # the lobby's (every client) apart from the rooms'
        return "presence_diff/lobby" if '"topic":"lobby"' in text[:80] else "presence_diff/room"
    return kind


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, value in count.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def merge(parts: list[dict[str, Any]], server_cpu: float, elapsed: float) -> dict[str, Any]:
    handshakes = sorted(h for part in parts for h in part["handshakes"])
    n = len(handshakes)
    return {
        "client_processes": len(parts),
        "connections_made": n,
        "failed": sum(part["failed"] for part in parts),
        "open_at_end": sum(part["open_at_end"] for part in parts),
        "ramp_s": round(max(part["ramp_s"] for part in parts), 2),
        "churn_s": round(max(part["churn_s"] for part in parts), 2),
        "messages_received": sum(part["messages_received"] for part in parts),
        "kinds": _sum_counts(part["kinds"] for part in parts),
        "rooms_joined": _sum_counts(part["rooms_joined"] for part in parts),
        "kind_mb": {
            k: round(v / 1e6, 1) for k, v in _sum_counts(p["kind_bytes"] for p in parts).items()
        },
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
    parser.add_argument(
        "--spread",
        action="store_true",
        help="replace connections one at a time over each second instead of in one burst",
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--profile", help="py-spy the server for the run; raw samples here")
    parser.add_argument("--dump", help="also write every client process's raw part here (JSON)")
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
    spy: subprocess.Popen[bytes] | None = None
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
            *(["--spread"] if args.spread else []),
        ]
        if args.profile:
            spy = _start_py_spy(proc.pid, args.profile)
        cpu_before, started = cpu_seconds(proc.pid), time.perf_counter()
        for share in range(k):
            argv_child = [sys.executable, "-m", "bench.example_churn", *part]
            argv_child += ["--child", str(port), str(share)]
            children.append(subprocess.Popen(argv_child, stdout=subprocess.PIPE))
        budget = args.ramp + args.seconds + 120  # bounded: a stuck client is killed
        outputs = [child.communicate(timeout=budget)[0] for child in children]
        server_cpu, elapsed = cpu_seconds(proc.pid) - cpu_before, time.perf_counter() - started
        parts = [json.loads(out.decode().strip().splitlines()[-1]) for out in outputs]
        server_stats = _server_stats(port)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(timeout=30)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        stop(proc)
    if args.dump:
        with open(args.dump, "w") as out:
            json.dump({"parts": parts, "server_stats": server_stats}, out)
    print(json.dumps({**merge(parts, server_cpu, elapsed), "server_stats": server_stats}))
    return 0


def _start_py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy (``.venv/bin/pip install py-spy``) sampling the server, without pausing it."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    command = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
    command += ["--format", "raw", "--output", out]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches
    return spy


def _server_stats(port: int) -> dict[str, Any]:
    """The example's ``GET /api/stats`` at the end of the run (resumes, detached sessions)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=30) as answer:
        stats: dict[str, Any] = json.loads(answer.read())
    keep = ("live", "detached", "resumed_total", "connected_total", "disconnected_total")
    return {key: stats.get(key) for key in keep}


if __name__ == "__main__":
    sys.exit(main())
