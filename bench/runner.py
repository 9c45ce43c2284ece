"""``python -m bench``: start each server variant, drive it, print the table.

This process is the load client: it starts every server as its own process group (uvicorn on
127.0.0.1, a port the server picks), runs the phases against it on uvloop, and stops the whole
group however the run ends (error, Ctrl-C, SIGTERM). In each repeat all variants' servers run
side by side (fresh processes) and every phase alternates short slices between them, so drift
on a shared machine hits every variant alike; the table shows medians over repeats, and each
ratio is the median of the per-repeat ratios against the baseline measured in the same repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from .client import Http
from .phases import (
    Metrics,
    NotAvailable,
    Target,
    phase_broadcast,
    phase_churn,
    phase_echo,
    phase_idle,
)
from .procs import (
    cpu_ns,
    group_members,
    is_running,
    machine_busy_ns,
    process_tree,
    raise_fd_limit,
)
from .settings import FULL, SMOKE, Settings
from .table import render_table
from .variants import BASELINE, VARIANTS, Variant, by_name

ROOT = Path(__file__).resolve().parent.parent

Phase = Callable[[list[Target], Settings], Awaitable[Sequence[Metrics | NotAvailable]]]

# Fresh processes first: idle RSS is measured before the other phases touch the allocator.
PHASES: list[tuple[str, Phase, tuple[str, ...]]] = [
    ("idle", phase_idle, ("idle_rss_kib",)),
    ("churn", phase_churn, ("conn_cpu_us", "conn_rate", "client_conn_cpu_us")),
    ("echo", phase_echo, ("echo_cpu_us", "echo_rate", "client_echo_cpu_us")),
    ("broadcast", phase_broadcast, ("bcast_wall_ms", "bcast_loop_ms", "bcast_cpu_ms")),
]


class ServerFailed(RuntimeError):
    """A server did not start or died."""


class ServerProcess:
    """One server variant running as its own process group."""

    def __init__(self, variant: Variant, log_dir: Path, tag: str) -> None:
        self.variant = variant
        self.log_path = log_dir / f"{tag}-{variant.name}.log"
        self._log = self.log_path.open("wb")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.server",
                "--app",
                variant.app,
                "--workers",
                str(variant.workers),
                "--parent",
                str(os.getpid()),
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,  # its own group: stop() ends workers too
        )
        self.pgid = self.proc.pid
        self.port = 0

    def wait_ready(self, timeout: float) -> None:
        """Read the port the server bound, then wait until it answers ``GET /count``."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.variant.name} exited ({self.proc.returncode})")
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if readable:
                line += os.read(self.proc.stdout.fileno(), 256)
        if not line.startswith(b"PORT "):
            raise ServerFailed(f"{self.variant.name} printed no port: {line!r}")
        self.port = int(line.split()[1])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.variant.name} exited ({self.proc.returncode})")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/count")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        raise ServerFailed(f"{self.variant.name} did not answer within {timeout}s")

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after a grace period; reap the leader."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait(timeout=8)
        for _ in range(100):  # workers of a multi-worker server may outlive the supervisor
            if not group_members(self.pgid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            time.sleep(0.05)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def gone(self) -> bool:
        return not is_running(self.proc.pid) and not group_members(self.pgid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if "Traceback" in ln or "ERROR" in ln]


@dataclass
class RunResult:
    """What one variant produced in one repeat."""

    variant: str
    repeat: int
    metrics: Metrics = field(default_factory=dict)
    not_available: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started: bool = False
    waited: float = 0.0  # seconds this repeat spent waiting for the machine to be quiet
    foreign: dict[str, float] = field(default_factory=dict)  # others' CPU (cores) per phase


async def _drive(targets: list[Target], results: list[RunResult], settings: Settings) -> None:
    """Run every phase against all ``targets`` (alternating slices), filling ``results``."""
    try:
        for name, phase, keys in PHASES:
            waited = await wait_until_quiet_async(settings.quiet_wait)
            before = (time.perf_counter_ns(), machine_busy_ns(), _our_cpu_ns(targets))
            try:
                outcomes = await phase(targets, settings)
            except Exception as exc:
                for result in results:
                    result.errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            wall = time.perf_counter_ns() - before[0]
            ours = _our_cpu_ns(targets) - before[2]
            foreign = max(0.0, (machine_busy_ns() - before[1] - ours) / wall)
            for result, outcome in zip(results, outcomes, strict=True):
                result.waited += waited
                result.foreign[name] = foreign
                if isinstance(outcome, NotAvailable):
                    for key in keys:
                        result.not_available[key] = str(outcome)
                else:
                    result.metrics.update(outcome)
    finally:
        for target in targets:
            await target.http.close()


def _our_cpu_ns(targets: list[Target]) -> int:
    return sum(cpu_ns(t.pids) for t in targets) + time.process_time_ns()


async def wait_until_quiet_async(limit: float, busy_below: float = 0.15) -> float:
    """Wait (at most ``limit`` seconds) until the machine is nearly idle: other engineers' test
    runs on this 2-core box would otherwise land in the measurements. Returns seconds waited."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    cores = os.cpu_count() or 1
    while loop.time() - started < limit:
        before = machine_busy_ns()
        await asyncio.sleep(0.5)
        if (machine_busy_ns() - before) / 0.5e9 / cores < busy_below:
            break
    return loop.time() - started


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_repeat(
    variants: list[Variant],
    repeat: int,
    settings: Settings,
    log_dir: Path,
    servers: list[ServerProcess],
    pin: bool,
) -> list[RunResult]:
    """Start every variant's server (fresh processes), run the phases against all of them,
    stop them all; one RunResult per variant, in ``variants`` order."""
    results = [RunResult(v.name, repeat) for v in variants]
    started: list[tuple[ServerProcess, RunResult]] = []
    try:
        for variant, result in zip(variants, results, strict=True):
            server = ServerProcess(variant, log_dir, f"r{repeat}")
            servers.append(server)
            started.append((server, result))
        live: list[tuple[ServerProcess, RunResult]] = []
        for server, result in started:
            try:
                server.wait_ready(settings.server_start_timeout)
            except ServerFailed as exc:
                result.errors["server"] = f"{exc}\n{server.log_tail()}"
                continue
            result.started = True
            live.append((server, result))
            if pin and server.variant.workers == 1:
                for pid in server.pids():
                    os.sched_setaffinity(pid, {0})
        if live:
            targets = [Target(srv.port, srv.pids(), Http(srv.port)) for srv, _ in live]
            with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
                runner.run(_drive(targets, [r for _, r in live], settings))
    finally:
        for server, _ in started:
            server.stop()
    for server, result in started:
        for line in server.log_problems()[:5]:
            result.errors.setdefault("server log", line)
    return results


def run_all(
    variants: list[Variant],
    settings: Settings,
    log_dir: Path,
    servers: list[ServerProcess],
    pin: bool,
    progress: Callable[[str], None],
) -> list[RunResult]:
    results: list[RunResult] = []
    for repeat in range(settings.repeats):
        progress(f"repeat {repeat + 1}/{settings.repeats}: {', '.join(v.name for v in variants)}")
        began = time.monotonic()
        for result in run_repeat(variants, repeat, settings, log_dir, servers, pin):
            results.append(result)
            brief = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
            progress(f"  {result.variant}: {brief}")
            for phase, error in result.errors.items():
                progress(f"  {result.variant}: ERROR in {phase}: {error}")
        progress(f"  ({time.monotonic() - began:.1f}s)")
    return results


def environment(settings: Settings, argv: list[str]) -> dict[str, Any]:
    versions = {}
    for dist in ("wsession", "uvicorn", "starlette", "websockets", "uvloop", "httptools"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "command": " ".join(["python -m bench", *argv]),
        "source": _source_state(),
        "python": platform.python_version(),
        "versions": versions,
        "machine": f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}",
        "cores": os.cpu_count() or 1,
        "settings": settings.__dict__,
    }


def _source_state() -> str:
    """The commit measured, and whether wsession/ differs from it (others edit it live)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "wsession"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes in wsession/" if dirty else "")


# -- smoke checks --------------------------------------------------------------------------


def smoke_checks(
    variants: list[Variant], results: list[RunResult], servers: list[ServerProcess]
) -> tuple[list[str], list[str]]:
    """(passed, failed) check descriptions of a ``--smoke`` run."""
    from wsession import SessionManager

    passed: list[str] = []
    failed: list[str] = []

    def check(ok: bool, what: str) -> None:
        (passed if ok else failed).append(what)

    keys = [k for _, _, ks in PHASES for k in ks]
    for variant in variants:
        runs = [r for r in results if r.variant == variant.name]
        check(bool(runs) and all(r.started for r in runs), f"server {variant.name} started")
        for run in runs:
            for phase, error in run.errors.items():
                check(False, f"{variant.name}: {phase}: {error}")
            for key in keys:
                value = run.metrics.get(key)
                if key in run.not_available:
                    # Only acceptable where the API is genuinely missing.
                    ok = variant.app != BASELINE.app and not hasattr(SessionManager, "broadcast")
                    check(ok, f"{variant.name}: {key} n/a ({run.not_available[key]})")
                else:
                    ok = value is not None and math.isfinite(value)
                    check(ok, f"{variant.name}: {key} is a number ({value})")
    for server in servers:
        check(server.gone(), f"{server.variant.name} (pid {server.proc.pid}) and its group gone")
    return passed, failed


# -- entry point -------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, checks only")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    parser.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS if v.default),
        help="comma-separated variant names (the baseline is always included)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place processes (default: one-worker servers on CPU 0, the "
        "load client on CPU 1, which steadies CPU time per operation)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply connection counts (quick looks)"
    )
    args = parser.parse_args(args_list)

    settings = SMOKE if args.smoke else FULL
    if args.repeats is not None:
        settings = replace(settings, repeats=max(1, args.repeats))
    if args.scale != 1.0:
        settings = _scaled(settings, args.scale)
    variants = by_name([n for n in args.variants.split(",") if n])
    skipped = {v.name: why for v in variants if (why := v.unavailable()) is not None}
    variants = [v for v in variants if v.name not in skipped]

    signal.signal(signal.SIGTERM, _on_sigterm)
    raise_fd_limit()
    pin = args.pin and len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {1})

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    env = environment(settings, args_list)
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="wsession-bench-") as tmp:
        try:
            results = run_all(variants, settings, Path(tmp), servers, pin, progress)
        finally:
            for server in servers:
                if server.proc.returncode is None:
                    server.stop()

    if args.smoke:
        print("Smoke run: tiny counts, one repeat; it checks the harness, not the numbers.\n")
    print(render_table(variants, results, settings, env, skipped))
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {"environment": env, "runs": [r.__dict__ for r in results]}, indent=2, default=str
            )
        )
    if args.smoke:
        passed, failed = smoke_checks(variants, results, servers)
        for what in failed:
            print(f"FAILED {what}")
        print(f"bench-smoke: {len(passed)} passed, {len(failed)} failed")
        return 1 if failed else 0
    return 1 if any(r.errors for r in results) else 0


def _scaled(settings: Settings, factor: float) -> Settings:
    def n(value: int) -> int:
        return max(2, round(value * factor))

    return replace(
        settings,
        churn_connections=n(settings.churn_connections),
        echo_connections=n(settings.echo_connections),
        idle_connections=n(settings.idle_connections),
        broadcast_connections=n(settings.broadcast_connections),
    )
