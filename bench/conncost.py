"""``python -m bench.conncost``: deterministic per-connection cost, bare against wsession.

Two numbers that hold still on a busy machine, both in process (no server, no network), with
``bench.inproc``'s driver (``bench/apps.py`` apps, the same scope):

- **instructions per connection** (open, handshake, close, no messages): each variant runs
  under ``valgrind --tool=callgrind`` twice, with ``--few`` and ``--many`` connections after the
  same warm-up; the difference of the two totals over the difference of the counts cancels
  start-up and imports.
- **Python bytes held per idle connection** (tracemalloc): ``--idle`` connections are opened
  and held (the app awaits the next message); traced memory after, minus before, over the count.

Run ``python -m bench.conncost`` (needs ``valgrind``; ``--no-callgrind`` for memory only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message

from wsession import SessionManager

from .apps import _wsession_starlette, bare_app, wsession_app
from .inproc import _connection, _scope


def _wsession_no_hooks() -> ASGIApp:
    """wsession without the benchmark's hooks: its own cost alone."""
    return _wsession_starlette(SessionManager())


_APPS: dict[str, Callable[[], ASGIApp]] = {
    "bare": bare_app,
    "wsession": wsession_app,
    "wsession-nohooks": _wsession_no_hooks,
}


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return None
    return uvloop.new_event_loop


async def _run(app: ASGIApp, connections: int) -> None:
    for _ in range(connections):
        await _connection(app, 0)


def _child(variant: str, warm: int, connections: int) -> None:
    app = _APPS[variant]()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run(app, warm + connections))


async def _idle(app: ASGIApp, count: int, lines: bool) -> float:
    loop = asyncio.get_running_loop()
    release = loop.create_future()
    opened = 0

    async def hold() -> None:
        nonlocal opened
        state = 0

        async def receive() -> Message:
            nonlocal state, opened
            state += 1
            if state == 1:
                return {"type": "websocket.connect"}
            opened += 1
            await release
            return {"type": "websocket.disconnect", "code": 1000}

        async def send(message: Message) -> None:
            return None

        await app(_scope(), receive, send)

    warm = [loop.create_task(hold()) for _ in range(50)]
    while opened < 50:  # noqa: ASYNC110 - the tasks only need to run up to their first await
        await asyncio.sleep(0)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    first = tracemalloc.take_snapshot() if lines else None
    tasks = [loop.create_task(hold()) for _ in range(count)]
    while opened < 50 + count:  # noqa: ASYNC110 - as above
        await asyncio.sleep(0)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    if first is not None:
        _print_lines(first, tracemalloc.take_snapshot(), count)
    release.set_result(None)
    await asyncio.gather(*warm, *tasks)
    return (after - before) / count


def _print_lines(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int) -> None:
    by_line: dict[str, int] = {}
    for diff in after.compare_to(before, "traceback"):
        frames = list(diff.traceback)  # oldest first
        own = [f for f in frames if "/wsession/" in f.filename]
        leaf = own[-1] if own else frames[-1]
        where = f"{Path(leaf.filename).name}:{leaf.lineno}"
        by_line[where] = by_line.get(where, 0) + diff.size_diff
    for where, size in sorted(by_line.items(), key=lambda kv: -kv[1])[:25]:
        if size / count >= 4:
            print(f"  {size / count:7.0f} B  {where}", file=sys.stderr)


def _memory(count: int, lines: bool) -> dict[str, float]:
    result = {}
    for name, make in _APPS.items():
        app = make()
        tracemalloc.start(25 if lines else 1)
        try:
            if lines:
                print(f"{name}: bytes held per idle connection, by line", file=sys.stderr)
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                result[name] = runner.run(_idle(app, count, lines))
        finally:
            tracemalloc.stop()
    return result


_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _instructions(variant: str, warm: int, connections: int) -> int:
    with tempfile.TemporaryDirectory(prefix="wsession-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, "-m", "bench.conncost", "--child", variant]
        command += [str(warm), str(connections)]
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(command, check=True, capture_output=True, env=env)
        match = _TOTAL.search(out.read_text(errors="replace"))
        if match is None:
            raise RuntimeError("no total in callgrind output")
        return int(match[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conncost", description=__doc__)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--few", type=int, default=200)
    parser.add_argument("--many", type=int, default=1200)
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--lines", action="store_true", help="idle bytes by line (stderr)")
    args = parser.parse_args(argv)
    if args.child:
        variant, warm, connections = args.child
        _child(variant, int(warm), int(connections))
        return 0
    rows: dict[str, dict[str, Any]] = {name: {} for name in _APPS}
    if not args.no_callgrind:
        for name in _APPS:
            few = _instructions(name, args.warm, args.few)
            many = _instructions(name, args.warm, args.many)
            rows[name]["instr"] = (many - few) / (args.many - args.few)
    for name, per in _memory(args.idle, args.lines).items():
        rows[name]["idle"] = per
    print("| variant | instructions per connection | Python bytes per idle connection |")
    print("|---|---|---|")
    for name, row in rows.items():
        instr = f"{row['instr'] / 1e3:.1f} K" if "instr" in row else "-"
        print(f"| {name} | {instr} | {row['idle']:,.0f} |")
    if "instr" in rows["bare"]:
        ratio = rows["wsession"]["instr"] / rows["bare"]["instr"]
        print(f"\nwsession/bare instructions: {ratio:.3f}x")
    print(f"wsession - bare idle bytes: {rows['wsession']['idle'] - rows['bare']['idle']:+,.0f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
