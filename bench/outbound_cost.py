"""``python -m bench.outbound_cost``: instructions per broadcast recipient, per send by id and
per echoed message, counted by callgrind (repeatable on a busy machine).

The driver opens ``--connections`` sessions on the wsession bench app (``bench.apps``) with an
in-memory server whose ``send`` completes at once, then runs an operation ``n`` times. Each
operation runs under ``valgrind --tool=callgrind`` twice, with ``n`` and ``2n`` repetitions; the
difference, divided by ``n`` (and by the recipients for a broadcast), is the cost of one
operation with everything else (start-up, connecting, the event loop's set-up) taken out. The
server's ``send`` is a trivial coroutine here, so the figures are wsession's (and Starlette's)
Python cost plus that stub and uvloop's, not uvicorn's framing.

Operations: ``broadcast`` (to every session; per recipient), ``send`` (``manager.send`` by id,
one at a time; per send), ``echo`` (one connection echoing through Starlette; per message) and
``echo-bare`` (the same without wsession), ``broadcast-bare`` (the bare app's own send loop,
through its ``POST /broadcast``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

_TEXT = "0123456789abcdef" * 2


async def _drive(op: str, repeats: int, connections: int) -> None:
    from wsession import SessionManager

    from .apps import _wsession_starlette, bare_app
    from .inproc import _scope

    manager = SessionManager()
    bare = op.endswith("-bare")
    app = bare_app() if bare else _wsession_starlette(manager)
    loop = asyncio.get_running_loop()
    stops: list[asyncio.Future[None]] = []

    async def send(message: Any) -> None:
        return None

    def connection(echoes: int) -> Any:
        stop = loop.create_future()
        stops.append(stop)
        received = 0

        async def receive() -> Any:
            nonlocal received
            received += 1
            if received == 1:
                return {"type": "websocket.connect"}
            if received <= echoes + 1:
                ready = loop.create_future()  # suspend like a server's queue.get()
                loop.call_soon(ready.set_result, None)
                await ready
                return {"type": "websocket.receive", "text": _TEXT}
            await stop
            return {"type": "websocket.disconnect", "code": 1000}

        return app(_scope(), receive, send)

    if op in ("echo", "echo-bare"):
        echo = connection(repeats)
        stops[0].set_result(None)  # read once the echoes are done
        await echo
        return
    tasks = [loop.create_task(connection(0)) for _ in range(connections)]
    for _ in range(100 * connections):  # bounded: each connection accepts and registers
        if len(manager.local) == connections:
            break
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0)
    assert bare or len(manager.local) == connections, len(manager.local)
    if op == "broadcast-bare":  # through the app's POST /broadcast (the bare app's own loop)
        for _ in range(repeats):
            await _post_broadcast(app)
        repeats = 0
    ids = list(manager.local)
    if op == "broadcast-bare":
        pass
    elif op == "broadcast":
        for _ in range(repeats):
            sent = await manager.broadcast(_TEXT)
            assert sent == connections, sent
    elif op == "send":
        for i in range(repeats):
            await manager.send(ids[i % len(ids)], _TEXT)
    else:
        raise SystemExit(f"unknown operation {op!r}")
    for stop in stops:
        stop.set_result(None)
    await asyncio.gather(*tasks)


async def _post_broadcast(app: Any) -> None:
    sent: list[Any] = []
    body = [{"type": "http.request", "body": _TEXT.encode(), "more_body": False}]

    async def receive() -> Any:
        return body.pop() if body else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {**_scope_http(), "method": "POST", "path": "/broadcast", "raw_path": b"/broadcast"}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent


def _scope_http() -> dict[str, Any]:
    from .inproc import _scope

    scope = _scope()
    scope.update(type="http", scheme="http", headers=[(b"host", b"127.0.0.1:8000")])
    scope.pop("subprotocols")
    return scope


def _instructions(op: str, repeats: int, connections: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.outbound_cost",
                "--child",
                op,
                "--repeats",
                str(repeats),
                "--connections",
                str(connections),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        with open(out) as f:
            match = re.search(r"^summary: (\d+)", f.read(), re.MULTILINE)
        assert match is not None
        return int(match[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbound_cost", description=__doc__)
    parser.add_argument("ops", nargs="*", default=["broadcast", "send", "echo"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help="n (default: per operation)")
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.child:
        (op,) = args.ops
        try:  # the loop uvicorn[standard] serves on, as in bench.inproc
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:  # pragma: no cover
            runner = asyncio.Runner()
        with runner:
            runner.run(_drive(op, args.repeats, args.connections))
        return 0
    defaults = {"broadcast": 5, "broadcast-bare": 5, "send": 1000, "echo": 2000, "echo-bare": 2000}
    for op in args.ops:
        n = args.repeats or defaults[op]
        one = _instructions(op, n, args.connections)
        two = _instructions(op, 2 * n, args.connections)
        per = (two - one) / n / (args.connections if op.startswith("broadcast") else 1)
        unit = {"send": "send"}.get(op, "recipient" if "broadcast" in op else "echoed message")
        print(f"{op}: {per:,.0f} instructions per {unit} (n={n}, {args.connections} sessions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
