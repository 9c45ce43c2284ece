"""``python -m bench.inproc``: wsession's own Python cost, without a server or a network.

Drives each variant's ASGI app directly with an in-memory ``receive``/``send`` (``receive``
suspends once per message, as a server's queue does, so every message resumes the whole
coroutine chain) and reads this process's CPU time. Nothing else runs, so the numbers hold still
on a busy machine; they leave out the server's and the kernel's share, which ``make bench``
measures. Per message: a long connection minus an empty one, over ``--messages``. Per
connection: open, handshake, close, over ``--connections``. GC is on, as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message

from .apps import bare_app, wsession_app

_TEXT = "0123456789abcdef" * 2


def _scope() -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"name=bench-client",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"sec-websocket-version", b"13"),
        ],
        "subprotocols": [],
        "state": {},
        "extensions": {"websocket.http.response": {}},
    }


async def _connection(app: ASGIApp, messages: int, text: str = _TEXT) -> int:
    """One connection that echoes ``messages`` texts; returns the CPU time it took (ns)."""
    loop = asyncio.get_running_loop()
    received = 0

    async def receive() -> Message:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "websocket.connect"}
        ready = loop.create_future()  # suspend like a server's queue.get()
        loop.call_soon(ready.set_result, None)
        await ready
        if received <= messages + 1:
            return {"type": "websocket.receive", "text": text}
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        return None

    started = time.process_time_ns()
    await app(_scope(), receive, send)
    return time.process_time_ns() - started


async def _measure(apps: dict[str, ASGIApp], rounds: int, messages: int, connections: int) -> str:
    per_msg: dict[str, list[float]] = {name: [] for name in apps}
    per_conn: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():  # alternate, so drift hits both alike
            await _connection(app, 1000)  # warm
            long = await _connection(app, messages)
            empty = await _connection(app, 0)
            per_msg[name].append((long - empty) / messages / 1e3)
            total = 0
            for _ in range(connections):
                total += await _connection(app, 0)
            per_conn[name].append(total / connections / 1e3)
    base = next(iter(apps))
    lines = ["| variant | µs per message | µs per connection |", "|---|---|---|"]
    for name in apps:
        msg, conn = statistics.median(per_msg[name]), statistics.median(per_conn[name])
        if name == base:
            lines.append(f"| {name} | {msg:.2f} | {conn:.1f} |")
            continue
        d_msg = statistics.median(a - b for a, b in zip(per_msg[name], per_msg[base], strict=True))
        d_conn = statistics.median(
            a - b for a, b in zip(per_conn[name], per_conn[base], strict=True)
        )
        lines.append(f"| {name} | {msg:.2f} ({d_msg:+.2f}) | {conn:.1f} ({d_conn:+.1f}) |")
    lines.append("")
    lines.append(
        f"Medians of {rounds} alternating rounds; in brackets: the difference from {base} "
        "(wsession's own Python cost, hooks included)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--connections", type=int, default=3000)
    args = parser.parse_args(argv)
    factories: dict[str, Callable[[], ASGIApp]] = {"bare": bare_app, "wsession": wsession_app}
    apps = {name: make() for name, make in factories.items()}
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        runner = asyncio.Runner()
    with runner:
        print(runner.run(_measure(apps, args.rounds, args.messages, args.connections)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
