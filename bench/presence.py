"""``python -m bench.presence``: a join storm against presence diffs and the naive way.

N clients (default 2,000) join one topic within ``--ramp`` seconds (default 2) on one uvicorn
worker, every client subscribed. Two servers, one after the other, same storm:

- ``diff``: wsession presence (``presence_interval``, default 0.5 s): each connection is
  tracked in ``lobby`` and subscribed; its welcome carries the lobby as of the last diff;
  changes go out as one ``presence_diff`` per interval to every subscriber.
- ``none`` (with ``--modes none``): no presence at all, the cost floor of the handshakes.
- ``naive``: what the example did before issue 15: the welcome lists everyone online and each
  arrival is broadcast to every other connection (one frame each).

Reported per mode: presence frames the server sent (``stats.sends``, welcomes not included),
server CPU (user+system of the server process, from /proc) per join, and the handshake
latency (TCP connect to WebSocket open) median, p99 and max, measured by the clients.
Clients and server share the machine: the numbers include that contention.

Compression is off by default (``--deflate`` turns it on): with permessage-deflate, which
uvicorn and browsers negotiate by default, every frame is compressed once per connection, so a
diff of hundreds of joins sent to 2,000 subscribers costs 2,000 compressions; an app with large
presence topics should turn it off (``uvicorn --ws-per-message-deflate false``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# -- the server (run in a child process) ------------------------------------------------------


def make_app(mode: str, interval: float) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from wsession import PresenceDiff, Session, SessionManager, WSessionMiddleware, get_session

    manager = SessionManager(presence_interval=interval, max_sessions=100_000)

    @manager.on_connect
    def name(session: Session) -> None:
        session.user_key = session.query_params.get("name") or None

    def render(diff: PresenceDiff) -> dict[str, Any]:
        return {
            "type": "presence_diff",
            "topic": diff.topic,
            "joins": [{"name": n, "ids": list(i)} for n, i in diff.joins.items()],
            "leaves": [{"name": n, "ids": list(i)} for n, i in diff.leaves.items()],
        }

    if mode == "naive":

        @manager.on_disconnect
        async def offline(session: Session) -> None:
            event = {"type": "presence", "event": "offline", "id": session.id}
            await manager.broadcast(event, exclude=session.id)
    else:
        manager.presence.render = render

    cache: dict[str, Any] = {"base": None, "text": "[]"}

    async def ws_endpoint(ws: WebSocket) -> None:
        session = get_session(ws)
        await ws.accept()
        if mode == "none":  # the floor: handshake and a small welcome, no presence at all
            await ws.send_json({"type": "welcome", "id": session.id})
        elif mode == "naive":
            online = [{"id": s.id, "name": s.user_key} for s in manager.local.values()]
            await ws.send_json({"type": "welcome", "id": session.id, "online": online})
            event = {"type": "presence", "event": "online", "id": session.id}
            await manager.broadcast({**event, "name": session.user_key}, exclude=session.id)
        else:
            await manager.presence.track(session, "lobby")
            base = await manager.presence.subscribe(session, "lobby") or {}
            if base is not cache["base"]:
                # One base per interval, shared by every subscriber of it: encode it once (the
                # example app does the same), not once per arrival.
                cache["base"] = base
                people = [{"name": n, "ids": list(i)} for n, i in base.items()]
                cache["text"] = json.dumps(people, separators=(",", ":"))
            head = json.dumps({"type": "welcome", "id": session.id}, separators=(",", ":"))
            await ws.send_text(f'{head[:-1]},"presence":{cache["text"]}}}')
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            pass

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(
            {"live": len(manager.local), "sends": sum(manager.stats.sends.values())}
        )

    return Starlette(
        routes=[WebSocketRoute("/ws", ws_endpoint), Route("/stats", stats)],
        middleware=[Middleware(WSessionMiddleware, manager=manager)],
    )


def serve(mode: str, port: int, interval: float, deflate: bool) -> None:
    import uvicorn

    uvicorn.run(
        make_app(mode, interval),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        backlog=4096,
        ws_max_queue=64,
        ws_per_message_deflate=deflate,
    )


# -- the storm (this process) -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_stats(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


async def storm(
    port: int, pid: int, clients: int, ramp: float, settle: float, deflate: bool
) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    handshakes: list[float] = []
    failures = 0
    sockets: list[Any] = []
    before_sends = (await http_stats(port))["sends"]
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal failures
        await asyncio.sleep(ramp * i / clients)
        began = time.perf_counter()
        try:
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws?name=user{i % (clients // 2 or 1)}",
                max_queue=None,  # the client library keeps reading: no back-pressure on us
                open_timeout=30,
                compression="deflate" if deflate else None,
            )
        except Exception:
            failures += 1
            return
        handshakes.append(time.perf_counter() - began)
        sockets.append(ws)

    await asyncio.gather(*(one(i) for i in range(clients)))
    joined_in = time.perf_counter() - start
    # Let the last diffs (or broadcasts) go out, then read the counters.
    last, quiet_since = -1, time.perf_counter()
    for _ in range(int(60 / 0.1)):  # bounded: at most a minute
        await asyncio.sleep(0.1)
        sends = (await http_stats(port))["sends"]
        if sends != last:
            last, quiet_since = sends, time.perf_counter()
        elif time.perf_counter() - quiet_since >= settle:
            break
    cpu = cpu_seconds(pid) - cpu_before
    for ws in sockets:
        ws.transport.abort()
    handshakes.sort()
    n = len(handshakes)
    return {
        "clients": clients,
        "failed": failures,
        "joined_in_s": round(joined_in, 2),
        "presence_frames": last - before_sends,
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_join": round(1000 * cpu / max(n, 1), 3),
        "handshake_p50_ms": round(1000 * handshakes[n // 2], 1) if n else None,
        "handshake_p99_ms": round(1000 * handshakes[min(n - 1, int(n * 0.99))], 1) if n else None,
        "handshake_max_ms": round(1000 * handshakes[-1], 1) if n else None,
    }


def run_mode(
    mode: str, clients: int, ramp: float, interval: float, deflate: bool
) -> dict[str, Any]:
    from example_app.procs import free_port, stop, wait_for_port

    port = free_port()
    argv = [sys.executable, "-m", "bench.presence", "--serve", mode, "--port", str(port)]
    argv += ["--interval", str(interval)] + (["--deflate"] if deflate else [])
    proc = subprocess.Popen(argv, cwd=ROOT)
    try:
        wait_for_port(port, proc, f"{mode} server")
        settle = max(1.0, 3 * interval)
        return asyncio.run(storm(port, proc.pid, clients, ramp, settle, deflate))
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which they join")
    parser.add_argument("--interval", type=float, default=0.5, help="presence_interval")
    parser.add_argument("--modes", default="diff,naive")
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="negotiate permessage-deflate (uvicorn's default; off here: see the docstring)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        profile = os.environ.get("WSESSION_BENCH_PROFILE")
        if profile:  # where the server's time goes: python -m pstats FILE
            import cProfile

            cProfile.runctx(
                "serve(args.serve, args.port, args.interval, args.deflate)",
                globals(),
                {"args": args},
                profile,
            )
        else:
            serve(args.serve, args.port, args.interval, args.deflate)
        return 0
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args.clients, args.ramp, args.interval, args.deflate)
        print(json.dumps({mode: results[mode]}), flush=True)
    if "diff" in results and "naive" in results:
        diff, naive = results["diff"], results["naive"]
        ratio = naive["presence_frames"] / max(diff["presence_frames"], 1)
        print(
            "\n| mode | clients | presence frames | CPU ms/join | handshake p50 / p99 / max ms |"
            "\n|---|---|---|---|---|"
        )
        for mode, r in results.items():
            print(
                f"| {mode} | {r['clients'] - r['failed']}/{r['clients']} | "
                f"{r['presence_frames']} | {r['cpu_ms_per_join']} | "
                f"{r['handshake_p50_ms']} / {r['handshake_p99_ms']} / {r['handshake_max_ms']} |"
            )
        print(f"\nnaive / diff frames: {ratio:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
