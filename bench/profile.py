"""``python -m bench.profile``: where a server variant spends its CPU during one phase.

Starts the variant like ``make bench`` does, attaches py-spy (``.venv/bin/pip install py-spy``)
to the server process for the length of one phase, and prints the samples that fall in
wsession's own code, by function and line. A sample counts as wsession overhead when its
innermost ``wsession/`` frame is executing itself or calling anything other than the app or the
server: the ``await app(...)``, ``await receive()`` and ``await send(...)`` that wsession passes
through are the bare app's cost, not wsession's. Calls from wsession into the benchmark's own
hooks (and the parsing they ask for, such as ``session.query_params``) are shown apart.

With ``--phase idle`` it measures memory instead: the server traces allocations
(tracemalloc) and the Python memory held per open connection is split the same way.

Examples: ``python -m bench.profile --phase churn --scale 2``, ``--phase echo``,
``--phase idle``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .client import Http
from .phases import Target, phase_idle
from .procs import raise_fd_limit
from .runner import PHASES, Phase, ServerProcess, _event_loop_factory, _scaled
from .settings import FULL, Settings
from .variants import VARIANTS, Variant

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")

# wsession functions that call the app; the benchmark's hooks are called by the others.
_PASS_THROUGH = {"_run_app", "serve_connection", "__call__"}


def _frames(stack: str) -> list[tuple[str, str, int]]:
    frames = []
    for raw in stack.split(";"):
        match = _FRAME.match(raw)
        if match:
            frames.append((match["func"], match["file"], int(match["line"])))
        else:
            frames.append((raw, "", 0))
    return frames


def _is_wsession(file: str) -> bool:
    return "wsession/" in file and "/bench/" not in file and not file.startswith("bench/")


def _is_bench(file: str) -> bool:
    return file.startswith("bench/") or "/bench/" in file


def analyse(raw: str, top: int = 25) -> str:
    """Summarise py-spy's raw (collapsed) output."""
    total = 0
    overhead: Counter[str] = Counter()
    hooks: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    pass_through = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        inner = max((i for i, f in enumerate(frames) if _is_wsession(f[1])), default=None)
        if inner is None:
            continue
        func, file, lineno = frames[inner]
        short = func.rsplit(".", 1)[-1]
        where = f"{func} ({Path(file).name}:{lineno})"
        callee = frames[inner + 1] if inner + 1 < len(frames) else None
        if callee is None:
            overhead[where] += count
            by_function[func] += count
        elif _is_bench(callee[1]) and short not in _PASS_THROUGH:
            hooks[f"{where} -> {callee[0]}"] += count
        elif "starlette/datastructures" in callee[1]:
            # Session.query_params / .headers parsing, on behalf of a hook.
            hooks[f"{where} -> {callee[0]}"] += count
        elif "uvicorn/" in callee[1] or "starlette/" in callee[1]:
            pass_through += count  # wsession handing a message to the server or the app
        else:
            overhead[f"{where} -> {callee[0]} ({Path(callee[1]).name})"] += count
            by_function[func] += count
    if total == 0:
        return "no samples"
    own = sum(overhead.values())
    lines = [
        f"samples: {total}; wsession overhead: {own} ({own / total:.1%}); "
        f"benchmark hooks (and what they ask wsession for): {sum(hooks.values())} "
        f"({sum(hooks.values()) / total:.1%}); app/server under wsession frames: {pass_through}",
        "",
        "overhead by wsession function:",
    ]
    lines += [f"  {n:6d} {n / total:6.1%}  {f}" for f, n in by_function.most_common(top)]
    lines += ["", "overhead by line (-> callee when not the line itself):"]
    lines += [f"  {n:6d} {n / total:6.1%}  {w}" for w, n in overhead.most_common(top)]
    if hooks:
        lines += ["", "benchmark hooks and what they ask for:"]
        lines += [f"  {n:6d} {n / total:6.1%}  {w}" for w, n in hooks.most_common(top)]
    return "\n".join(lines)


def analyse_memory(before: Path, after: Path, connections: int, top: int = 25) -> str:
    """Per-connection Python allocations between two tracemalloc snapshots, by wsession line."""
    import tracemalloc

    diffs = tracemalloc.Snapshot.load(str(after)).compare_to(
        tracemalloc.Snapshot.load(str(before)), "traceback"
    )
    total = 0
    own: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    for diff in diffs:
        total += diff.size_diff
        frames = list(diff.traceback)  # oldest first
        inner = max((i for i, f in enumerate(frames) if _is_wsession(f.filename)), default=None)
        if inner is None:
            leaf = frames[-1]
            elsewhere[f"{Path(leaf.filename).name}:{leaf.lineno}"] += diff.size_diff
            continue
        frame = frames[inner]
        where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
        callee = frames[inner + 1] if inner + 1 < len(frames) else None
        if callee is not None and not _is_wsession(callee.filename):
            if "uvicorn/" in callee.filename or "starlette/" in callee.filename:
                elsewhere[f"{where} -> {Path(callee.filename).name} (app/server)"] += diff.size_diff
                continue
            where += f" -> {Path(callee.filename).name}:{callee.lineno}"
        own[where] += diff.size_diff
    per = float(connections)
    lines = [
        f"Python allocations held per open connection: {total / per:,.0f} B in all, "
        f"{sum(own.values()) / per:,.0f} B under wsession frames "
        "(innermost wsession frame, or its callee outside app/server)",
        "",
        "by wsession line:",
    ]
    lines += [f"  {n / per:8,.0f} B  {w}" for w, n in own.most_common(top) if n / per >= 1]
    lines += ["", "largest elsewhere (the bare app pays these too, mostly):"]
    lines += [f"  {n / per:8,.0f} B  {w}" for w, n in elsewhere.most_common(10)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--variant", default="wsession", choices=[v.name for v in VARIANTS])
    parser.add_argument("--phase", default="churn", choices=[name for name, _, _ in PHASES])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply connection counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="echo phase length")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    variant = next(v for v in VARIANTS if v.name == args.variant)
    phase = next(p for name, p, _ in PHASES if name == args.phase)
    settings = replace(_scaled(FULL, args.scale), echo_seconds=args.seconds)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="wsession-profile-") as tmp:
        if args.phase == "idle":
            return _profile_memory(variant, settings, Path(tmp), args.top)
        return _profile_cpu(variant, phase, settings, Path(tmp), args)


def _profile_memory(variant: Variant, settings: Settings, tmp: Path, top: int) -> int:
    snaps = tmp / "snapshots"
    snaps.mkdir()
    os.environ["BENCH_TRACEMALLOC_DIR"] = str(snaps)
    server = ServerProcess(variant, tmp, "profile")
    try:
        server.wait_ready(settings.server_start_timeout)
        pids = server.pids()

        async def probe(point: str) -> None:
            wanted = snaps / f"snap-{len(list(snaps.glob('snap-*')))}"
            os.kill(pids[0], signal.SIGUSR1)
            for _ in range(600):  # up to 60 s: a snapshot of a big heap takes a while
                if wanted.exists():
                    return
                await asyncio.sleep(0.1)
            raise RuntimeError(f"no tracemalloc snapshot for {point}")

        async def drive() -> None:
            target = Target(server.port, pids, Http(server.port))
            try:
                print(await phase_idle([target], settings, probe), file=sys.stderr)
            finally:
                await target.http.close()

        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(drive())
    finally:
        server.stop()
    print(analyse_memory(snaps / "snap-0", snaps / "snap-1", settings.idle_connections, top))
    return 0


def _profile_cpu(
    variant: Variant, phase: Phase, settings: Settings, tmp: Path, args: argparse.Namespace
) -> int:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raw_path: Path = args.raw or tmp / "raw.txt"
    server = ServerProcess(variant, tmp, "profile")
    spy: subprocess.Popen[bytes] | None = None
    try:
        server.wait_ready(settings.server_start_timeout)
        pids = server.pids()

        async def drive(profiled: bool) -> None:
            nonlocal spy
            target = Target(server.port, pids, Http(server.port))
            try:
                if profiled:
                    spy = _start_py_spy(py_spy, pids[0], args.rate, raw_path)
                    await asyncio.sleep(0.5)  # py-spy attaches
                print(await phase([target], settings), file=sys.stderr)
            finally:
                await target.http.close()

        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(drive(False))  # warm: one-time imports and caches stay out of the profile
            runner.run(drive(True))
    finally:
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(timeout=10)
        server.stop()
    if not raw_path.exists():
        err = spy.stderr.read().decode(errors="replace") if spy and spy.stderr else ""
        print(f"py-spy wrote nothing: {err}", file=sys.stderr)
        return 1
    print(analyse(raw_path.read_text(), args.top))
    return 0


def _start_py_spy(py_spy: str, pid: int, rate: int, out: Path) -> subprocess.Popen[bytes]:
    command = [py_spy, "record", "--pid", str(pid), "--rate", str(rate)]
    command += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


if __name__ == "__main__":
    sys.exit(main())
