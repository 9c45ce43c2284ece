"""``python -m bench.scale``: how wsession's cost grows with N idle connections on one worker.

For each N (default 1k, 10k, 50k, 100k) a fresh bare-Starlette server and a fresh wsession server
(``bench.scale_apps``, one uvicorn worker each) run side by side; client processes
(``bench.scale_client``) hold N idle WebSocket connections to each, opened in alternating slices
so drift on a shared machine hits both alike. Measured per variant and N:

- RSS per connection (server's own RSS after ``gc.collect()`` + ``malloc_trim``, minus the
  baseline taken after a 20-connection warm-up, over N) and GC-tracked objects per connection;
- server CPU per connect (``/proc`` schedstat of the server while a slice of 250 connections
  opens, over the slice; lower quartile of the slices of the connect phase);
- registry lookup, ``count()``, send by id and group join: mean server CPU ns per operation,
  timed inside the server (``GET /ctl/ops``; fastest of a few rounds; wall time in the JSON);
- broadcast per recipient: the server's send loop (timed inside) and the server's CPU from the
  request until the clients counted every frame (``/proc``), over N; fastest of a few rounds;
- after every client closed: RSS and objects against the baseline (a leak shows as growth).

Every server has its own process group and dies with this process (``PR_SET_PDEATHSIG``); every
wait is bounded; Ctrl-C, SIGTERM and errors stop everything. Only 127.0.0.x is used.

One process needs one file descriptor per connection: the harness raises RLIMIT_NOFILE itself,
but only up to the hard limit, which only a privileged user can raise. An N that does not fit
under the hard limit is skipped and said so, and the largest N that fits is measured instead.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .procs import cpu_ns, group_members, machine_busy_ns, raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bare", "wsession")
FULL_NS = (1_000, 10_000, 50_000, 100_000)
SMOKE_NS = (200, 1_000)
FD_RESERVE = 256  # descriptors a process needs besides its connections
CLIENT_MAX = 15_000  # connections per client process (ports and memory stay modest)
OPS_CALLS_MAX = 12
QUIET_CORES = 0.3  # other processes' CPU (in cores) under which an ops call counts as quiet
SLICE = 250  # connections opened per turn, alternating between the servers
# Left after close per connection, beyond which it is a leak. Blocks move a little with N
# by themselves (free lists, caches: ~0.3 per connection for bare as for wsession).
LEAK_OBJECTS = 0.05
LEAK_BLOCKS = 1.0
WARMUP = 20  # small: memory it leaves in the allocator's free lists is reused by the first N
SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 10))


class ScaleError(RuntimeError):
    """A server or client misbehaved, or a bounded wait ran out."""


# -- processes ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=8)
    for _ in range(100):  # bounded: 5 s
        if not group_members(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> bytes:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ScaleError(f"{what}: no answer within {timeout:g}s")
        if proc.poll() is not None:
            raise ScaleError(f"{what} exited ({proc.returncode})")
        readable, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if readable:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise ScaleError(f"{what}: end of output")
            line += chunk
    return line


class Server:
    """One ``bench.scale_apps`` server: its own process group, its port, its control API."""

    def __init__(self, variant: str, log_dir: Path, fds: int, env: dict[str, str]) -> None:
        self.variant = variant
        self._log = (log_dir / f"server-{variant}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.scale_apps", "--variant", variant),
                *("--parent", str(os.getpid()), "--fds", str(fds)),
            ],
            cwd=ROOT,
            env={**_env(), **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.port = 0

    def wait_ready(self, timeout: float = 30) -> None:
        line = _read_line(self.proc, timeout, f"server {self.variant}")
        if not line.startswith(b"PORT "):
            raise ScaleError(f"server {self.variant} printed {line!r}")
        self.port = int(line.split()[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ScaleError):
                self.get("/ctl/mem")
                return
            time.sleep(0.05)
        raise ScaleError(f"server {self.variant} did not answer within {timeout:g}s")

    def request(self, method: str, path: str, body: bytes = b"", timeout: float = 120) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise ScaleError(f"{self.variant} {path}: {response.status} {data[:200]!r}")
        return json.loads(data)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def cpu(self) -> int:
        return cpu_ns([self.proc.pid])

    def stop(self) -> None:
        _stop_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Client:
    """One ``bench.scale_client`` process, driven a JSON line at a time."""

    def __init__(self, index: int, log_dir: Path, fds: int, timeout: float) -> None:
        self.index = index
        self.timeout = timeout
        self.held = 0
        self._log = (log_dir / f"client-{index}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "bench.scale_client", "--parent", str(os.getpid())),
                *("--sources", ",".join(SOURCES), "--fds", str(fds), "--timeout", str(timeout)),
            ],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self) -> Any:
        return json.loads(_read_line(self.proc, self.timeout + 30, f"client {self.index}"))

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "quit"})
        _stop_group(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


def _all(clients: list[Client], commands: list[dict[str, Any] | None]) -> list[Any]:
    """Send each client its command (None: nothing), then collect the answers: they run at once."""
    for client, command in zip(clients, commands, strict=True):
        if command is not None:
            client.send(command)
    return [
        client.answer() if command is not None else None
        for client, command in zip(clients, commands, strict=True)
    ]


# -- one N ---------------------------------------------------------------------------------


@dataclass
class Point:
    """What one variant measured at one N."""

    variant: str
    n: int
    rss_per_conn_kib: float = math.nan
    objects_per_conn: float = math.nan
    connect_cpu_us: float = math.nan
    connect_rate: float = math.nan
    lookup_ns: float = math.nan
    count_ns: float = math.nan
    send_ns: float = math.nan
    join_ns: float = math.nan
    bcast_loop_ns: float = math.nan
    bcast_cpu_ns: float = math.nan
    rss_after_close_kib: float = math.nan
    objects_after_close: float = math.nan
    blocks_after_close: float = math.nan  # pymalloc blocks (str/bytes too), minus baseline
    baseline_rss_mib: float = math.nan
    wall_ns: dict[str, float] = field(default_factory=dict)  # the ops as wall time
    hot_ns: dict[str, float] = field(default_factory=dict)  # the ops on 64 ids, cache-hot
    ops_calls: tuple[int, int] = (0, 0)  # ops calls made, and how many while others were quiet
    connect_cpu_slices_us: list[float] = field(default_factory=list)
    types_per_conn: dict[str, float] = field(default_factory=dict)  # GC objects by type
    types_after_close: dict[str, int] = field(default_factory=dict)  # objects that stayed
    modules_after_close: list[str] = field(default_factory=list)  # imported since the baseline
    errors: list[str] = field(default_factory=list)


@dataclass
class Options:
    ns: tuple[int, ...]
    ops_k: int
    rounds: int
    ops_calls: int
    broadcasts: int
    out: Path
    plots: bool
    timeout: float
    deadline: float = math.inf  # time.monotonic() past which the run stops (--budget)
    server_env: dict[str, str] = field(default_factory=dict)


def _spread(count: int, clients: list[Client], capacity: int) -> list[int]:
    """Split ``count`` new connections over ``clients`` by the room each has left."""
    shares = [0] * len(clients)
    left = count
    while left > 0:  # bounded: each pass places at least one connection or raises
        placed = False
        for i, client in enumerate(clients):
            if left and client.held + shares[i] < capacity:
                shares[i] += 1
                left -= 1
                placed = True
        if not placed:
            raise ScaleError("client processes are full")
    return shares


def _open(server: Server, clients: list[Client], count: int, capacity: int) -> int:
    """Open ``count`` connections to ``server``; return the server CPU (ns) it took."""
    shares = _spread(count, clients, capacity)
    before = server.cpu()
    answers = _all(
        clients,
        [
            {"cmd": "open", "port": server.port, "count": share} if share else None
            for share in shares
        ],
    )
    spent = server.cpu() - before
    for client, share, answer in zip(clients, shares, answers, strict=True):
        if answer is None:
            continue
        client.held += answer["opened"]
        if answer["opened"] != share:
            raise ScaleError(
                f"{server.variant}: client {client.index} opened {answer['opened']} of "
                f"{share} ({answer['error']})"
            )
    return spent


def _close(server: Server, clients: list[Client], timeout: float) -> None:
    answers = _all(clients, [{"cmd": "close", "port": server.port} for _ in clients])
    for client, answer in zip(clients, answers, strict=True):
        client.held -= answer["closed"]
    deadline = time.monotonic() + timeout
    while server.get("/ctl/mem")["live"]:  # bounded by the deadline
        if time.monotonic() > deadline:
            raise ScaleError(f"{server.variant}: connections still live {timeout:g}s after close")
        time.sleep(0.2)


def _frames(clients: list[Client], port: int) -> int:
    answers = _all(clients, [{"cmd": "frames"} for _ in clients])
    return sum(int(a["frames"].get(str(port), 0)) for a in answers)


def _broadcast(server: Server, clients: list[Client], n: int, timeout: float) -> tuple[int, int]:
    """One broadcast; (send loop ns, server CPU ns until every client counted its frame)."""
    start_frames = _frames(clients, server.port)
    before = server.cpu()
    answer = server.request("POST", "/ctl/broadcast", b"b" * 32)
    if answer["sent"] != n:
        raise ScaleError(f"{server.variant}: broadcast reached {answer['sent']} of {n}")
    deadline = time.monotonic() + timeout
    while _frames(clients, server.port) - start_frames < n:  # bounded by the deadline
        if time.monotonic() > deadline:
            raise ScaleError(f"{server.variant}: broadcast frames missing after {timeout:g}s")
        time.sleep(0.05)
    return int(answer["loop_ns"]), server.cpu() - before


def measure_n(n: int, opts: Options, fds: int, log_dir: Path) -> list[Point]:
    """Both variants at ``n`` connections each, fresh processes, every process stopped after."""
    points = {v: Point(v, n) for v in VARIANTS}
    capacity = min(CLIENT_MAX, fds - FD_RESERVE)
    client_count = max(2, math.ceil(len(VARIANTS) * (n + WARMUP) / capacity))
    servers: list[Server] = []
    clients: list[Client] = []
    try:
        servers = [Server(v, log_dir, fds, opts.server_env) for v in VARIANTS]
        clients = [Client(i, log_dir, fds, opts.timeout) for i in range(client_count)]
        for server in servers:
            server.wait_ready()
        base: dict[str, Any] = {}
        for server in servers:  # warm-up: first-use costs out of the baseline
            _open(server, clients, WARMUP, capacity)
            _close(server, clients, opts.timeout)
            base[server.variant] = server.get("/ctl/mem")
            points[server.variant].baseline_rss_mib = base[server.variant]["rss"] / 2**20
        per_conn: dict[str, list[float]] = {v: [] for v in VARIANTS}
        wall = dict.fromkeys(VARIANTS, 0.0)
        opened = 0
        slice_size = min(SLICE, n)
        while opened < n:  # alternating slices
            if time.monotonic() > opts.deadline:
                raise ScaleError("the run's time budget (--budget) ran out while connecting")
            size = min(slice_size, n - opened)
            for server in servers:
                started = time.perf_counter()
                per_conn[server.variant].append(_open(server, clients, size, capacity) / size)
                wall[server.variant] += time.perf_counter() - started
            opened += size
        for server in servers:
            point = points[server.variant]
            mem = server.get("/ctl/mem")
            if mem["live"] != n:
                raise ScaleError(f"{server.variant} tracks {mem['live']} of {n} connections")
            point.rss_per_conn_kib = (mem["rss"] - base[server.variant]["rss"]) / n / 1024
            point.objects_per_conn = (mem["objects"] - base[server.variant]["objects"]) / n
            # Lower quartile over slices: a slice that another process's burst slowed down
            # (the machine is shared) does not decide it.
            slices = per_conn[server.variant]
            low = statistics.quantiles(slices, n=4)[0] if len(slices) > 1 else slices[0]
            point.connect_cpu_us = low / 1000
            point.connect_cpu_slices_us = [round(c / 1000, 1) for c in per_conn[server.variant]]
            before = base[server.variant]["types"]
            grown = {t: (c - before.get(t, 0)) / n for t, c in mem["types"].items()}
            kept = [(t, round(c, 2)) for t, c in grown.items() if c >= 0.5]
            point.types_per_conn = dict(sorted(kept, key=lambda i: -i[1]))
            point.connect_rate = n / wall[server.variant]
        k = min(opts.ops_k, n)
        best: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        ours = [server.proc.pid for server in servers] + [c.proc.pid for c in clients]
        calls = 0
        quiet = 0
        # Alternating calls; the fastest of all rounds counts. Other jobs on this shared
        # machine slow the CPU down for us too (shared caches, hyperthreads), so calls go on
        # (up to OPS_CALLS_MAX) until opts.ops_calls of them ran while others were quiet.
        while quiet < opts.ops_calls and calls < OPS_CALLS_MAX:
            calls += 1
            busy, mine_before, started_ns = machine_busy_ns(), cpu_ns(ours), time.monotonic_ns()
            for server in servers:
                ops = server.get(f"/ctl/ops?k={k}&rounds={opts.rounds}")
                mine = best[server.variant]
                for key, value in ops.items():
                    mine[key] = min(mine.get(key, math.inf), value)
            others = machine_busy_ns() - busy - (cpu_ns(ours) - mine_before)
            if others / max(1, time.monotonic_ns() - started_ns) < QUIET_CORES:
                quiet += 1
        for variant in VARIANTS:
            points[variant].ops_calls = (calls, quiet)
        for variant, ops in best.items():
            point = points[variant]
            point.lookup_ns, point.count_ns = ops["lookup_ns"], ops["count_ns"]
            point.send_ns, point.join_ns = ops["send_ns"], ops["join_ns"]
            point.wall_ns = {key: value for key, value in ops.items() if "wall" in key}
            point.hot_ns = {
                key: value for key, value in ops.items() if "hot" in key and "wall" not in key
            }
        loops: dict[str, list[int]] = {v: [] for v in VARIANTS}
        cpus: dict[str, list[int]] = {v: [] for v in VARIANTS}
        for _ in range(opts.broadcasts):
            for server in servers:
                loop_ns, cpu = _broadcast(server, clients, n, opts.timeout)
                loops[server.variant].append(loop_ns)
                cpus[server.variant].append(cpu)
        for variant in VARIANTS:
            points[variant].bcast_loop_ns = min(loops[variant]) / n
            points[variant].bcast_cpu_ns = min(cpus[variant]) / n
        for server in servers:
            _close(server, clients, opts.timeout)
            mem = server.get("/ctl/mem")
            point = points[server.variant]
            point.rss_after_close_kib = (mem["rss"] - base[server.variant]["rss"]) / 1024
            point.objects_after_close = mem["objects"] - base[server.variant]["objects"]
            point.blocks_after_close = mem["blocks"] - base[server.variant]["blocks"]
            before = base[server.variant]["types"]
            grown = {t: c - before.get(t, 0) for t, c in mem["types"].items()}
            point.modules_after_close = sorted(
                set(mem["modules"]) - set(base[server.variant]["modules"])
            )
            point.types_after_close = dict(
                sorted(((t, c) for t, c in grown.items() if c > 0), key=lambda i: -i[1])[:8]
            )
    finally:
        for client in clients:
            client.stop()
        for server in servers:
            server.stop()
    return [points[v] for v in VARIANTS]


# -- reporting -----------------------------------------------------------------------------

METRICS: tuple[tuple[str, str, str], ...] = (
    ("rss_per_conn_kib", "RSS per connection", "KiB"),
    ("connect_cpu_us", "server CPU per connect", "µs"),
    ("lookup_ns", "registry lookup", "ns"),
    ("count_ns", "count()", "ns"),
    ("send_ns", "send by id", "ns"),
    ("join_ns", "group join", "ns"),
    ("bcast_cpu_ns", "broadcast server CPU per recipient", "ns"),
)
# Wall-clock figures: on a 2-core machine shared with the clients they include waiting for a
# core, so they are shown but not judged.
INFO_METRICS: tuple[tuple[str, str, str], ...] = (
    ("bcast_loop_ns", "broadcast send loop per recipient, wall", "ns"),
)
HOT_METRICS: tuple[tuple[str, str], ...] = (
    ("lookup_hot_ns", "registry lookup, cache-hot"),
    ("count_hot_ns", "count(), cache-hot"),
    ("send_hot_ns", "send by id, cache-hot"),
    ("join_hot_ns", "group join, cache-hot"),
)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def render(points: list[Point], skipped: dict[int, str], fds: tuple[int, int]) -> str:
    """The Markdown tables: one row per metric, columns N x variant; then the targets."""
    ns = sorted({p.n for p in points})
    by = {(p.variant, p.n): p for p in points}
    lines = [
        f"RLIMIT_NOFILE: soft {fds[0]:,}, hard {fds[1]:,} (the harness raised the soft limit "
        "to the hard one).",
        "",
    ]
    for n, why in sorted(skipped.items()):
        lines.append(f"- **N = {n:,} not measured**: {why}")
    if skipped:
        lines.append("")
    head = "| metric | " + " | ".join(f"{v} {n:,}" for n in ns for v in VARIANTS) + " |"
    lines += [head, "|---|" + "---:|" * (len(ns) * len(VARIANTS))]
    for key, label, unit in METRICS:
        cells = [_fmt(getattr(by[(v, n)], key)) for n in ns for v in VARIANTS]
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    for key, label, unit in INFO_METRICS:
        cells = [_fmt(getattr(by[(v, n)], key)) for n in ns for v in VARIANTS]
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    for key, label in HOT_METRICS:
        cells = [_fmt(by[(v, n)].hot_ns.get(key, math.nan)) for n in ns for v in VARIANTS]
        lines.append(f"| {label} (ns) | " + " | ".join(cells) + " |")
    extra = (
        ("objects_per_conn", "GC objects per connection", ""),
        ("connect_rate", "connects per second (wall, shared machine)", "/s"),
        ("baseline_rss_mib", "baseline RSS after warm-up", "MiB"),
        ("rss_after_close_kib", "RSS after all closed, minus baseline", "KiB"),
        ("objects_after_close", "GC objects after all closed, minus baseline", ""),
        ("blocks_after_close", "pymalloc blocks after all closed, minus baseline", ""),
    )
    for key, label, unit in extra:
        cells = [_fmt(getattr(by[(v, n)], key)) for n in ns for v in VARIANTS]
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | " + " | ".join(cells) + " |")
    hi = ns[-1]
    ws, bare = by[("wsession", hi)].types_per_conn, by[("bare", hi)].types_per_conn
    more = {t: ws.get(t, 0) - bare.get(t, 0) for t in {*ws, *bare}}
    shown = ", ".join(f"{t} {c:+.0f}" for t, c in sorted(more.items(), key=lambda i: -i[1]) if c)
    lines += ["", f"GC objects per connection, wsession minus bare at {hi:,}: {shown or 'none'}."]
    lines += ["", *targets(points)]
    return "\n".join(lines) + "\n"


def leaks(points: list[Point]) -> dict[str, tuple[float, float]]:
    """What stays after every connection closed, per connection of the largest N beyond the
    smallest: (GC objects, pymalloc blocks). 0 when what stays is a fixed amount (a lazy
    import); a leaked connection keeps dozens of each."""
    ns = sorted({p.n for p in points})
    by = {(p.variant, p.n): p for p in points}
    if len(ns) < 2:
        return {}
    lo, hi = ns[0], ns[-1]
    found = {}
    for v in VARIANTS:
        a, b = by[(v, lo)], by[(v, hi)]
        objects = (b.objects_after_close - a.objects_after_close) / (hi - lo)
        blocks = (b.blocks_after_close - a.blocks_after_close) / (hi - lo)
        found[v] = (objects, 0.0 if math.isnan(blocks) else blocks)
    return found


def _leaking(per_conn: tuple[float, float]) -> bool:
    objects, blocks = per_conn
    return objects > LEAK_OBJECTS or blocks > LEAK_BLOCKS


def targets(points: list[Point]) -> list[str]:
    """The issue's targets, judged on the smallest and largest N measured."""
    ns = sorted({p.n for p in points})
    if len(ns) < 2:
        return ["(one N only: no growth to judge)"]
    lo, hi = ns[0], ns[-1]
    by = {(p.variant, p.n): p for p in points}
    out = [f"Targets, {hi:,} against {lo:,} (per-operation cost within 10 %):", ""]
    for key, label, _ in METRICS[1:]:
        for variant in VARIANTS:
            a, b = getattr(by[(variant, lo)], key), getattr(by[(variant, hi)], key)
            ratio = b / a if a else math.nan
            verdict = "met" if ratio <= 1.10 else "MISSED"
            out.append(f"- {variant} {label}: {_fmt(a)} → {_fmt(b)} (x{ratio:.2f}) {verdict}")
    for key, label in HOT_METRICS:
        for variant in VARIANTS:
            a = by[(variant, lo)].hot_ns.get(key, math.nan)
            b = by[(variant, hi)].hot_ns.get(key, math.nan)
            ratio = b / a if a else math.nan
            out.append(
                f"- {variant} {label} (evidence, not a target): {_fmt(a)} → {_fmt(b)} "
                f"(x{ratio:.2f})"
            )
    for variant, per_conn in leaks(points).items():
        verdict = "LEAK" if _leaking(per_conn) else "no leak"
        out.append(
            f"- {variant} left after close, per connection of {hi:,} beyond {lo:,}: "
            f"{per_conn[0]:+.3f} GC objects (limit {LEAK_OBJECTS}), {per_conn[1]:+.3f} pymalloc "
            f"blocks (limit {LEAK_BLOCKS}): {verdict}"
        )
    ws, bare = by[("wsession", hi)], by[("bare", hi)]
    extra = ws.rss_per_conn_kib - bare.rss_per_conn_kib
    verdict = "met" if extra <= 1.5 else "MISSED"
    out.append(
        f"- idle RSS per connection at {hi:,}: wsession {ws.rss_per_conn_kib:.2f} KiB, bare "
        f"{bare.rss_per_conn_kib:.2f} KiB: bare + {extra:.2f} KiB (target <= + 1.5) {verdict}"
    )
    return out


def _log_x(ax: Any, ns: list[int]) -> None:
    """Log x axis, ticks at the measured Ns, labelled 1k, 10k, ..."""
    ax.set_xscale("log")
    ax.set_xticks(ns, [f"{n / 1000:g}k" if n >= 1000 else str(n) for n in ns])
    ax.minorticks_off()


def plot(points: list[Point], out: Path) -> list[Path]:
    """Two PNGs, log-x: memory per connection, and per-operation cost, against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({p.n for p in points})
    by = {(p.variant, p.n): p for p in points}
    style = {"bare": ("tab:gray", "o", "--"), "wsession": ("tab:blue", "s", "-")}
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for variant in VARIANTS:
        color, marker, line = style[variant]
        ax.plot(
            ns,
            [by[(variant, n)].rss_per_conn_kib for n in ns],
            color=color,
            marker=marker,
            linestyle=line,
            label=variant,
        )
    _log_x(ax, ns)
    ax.set_ylim(0, 1.2 * max(p.rss_per_conn_kib for p in points))
    ax.set_xlabel("idle connections on one worker (N, log scale)")
    ax.set_ylabel("server RSS per connection (KiB)")
    ax.set_title("Memory per idle connection against N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "scale-memory.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    panels = METRICS[1:]
    hot = {key.removesuffix("_hot_ns") + "_ns": key for key, _ in HOT_METRICS}
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.2), dpi=110)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (key, label, unit) in zip(axes.flat, panels, strict=False):
        for variant in VARIANTS:
            color, marker, line = style[variant]
            ax.plot(
                ns,
                [getattr(by[(variant, n)], key) for n in ns],
                color=color,
                marker=marker,
                linestyle=line,
                label=variant,
            )
            if key in hot:
                ax.plot(
                    ns,
                    [by[(variant, n)].hot_ns.get(hot[key], math.nan) for n in ns],
                    color=color,
                    marker=marker,
                    linestyle=":",
                    alpha=0.5,
                    markersize=4,
                    label=f"{variant}, cache-hot ids",
                )
        _log_x(ax, ns)
        ax.set_ylim(bottom=0)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[1].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center", title="dotted: same 64 ids again")
    fig.supxlabel("idle connections on one worker (N, log scale)")
    fig.suptitle("Cost per operation against N (flat = independent of N)")
    fig.tight_layout()
    path = out / "scale-ops.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


# -- main ------------------------------------------------------------------------------------


def plan(wanted: tuple[int, ...], hard: int) -> tuple[list[int], dict[int, str]]:
    """The Ns that fit under the hard fd limit; those that do not, with why; plus the largest
    N that fits (rounded down to a thousand) when some were skipped."""
    room = hard - FD_RESERVE
    run = [n for n in wanted if n <= room]
    skipped = {
        n: f"the hard RLIMIT_NOFILE is {hard:,} and one worker needs N + {FD_RESERVE} "
        "descriptors (raise it with `ulimit -Hn` as root, or in limits.conf / systemd's "
        "LimitNOFILE, then rerun)"
        for n in wanted
        if n > room
    }
    largest = room // 1000 * 1000
    if skipped and largest > max(run, default=0):
        run.append(largest)
    return sorted(run), skipped


def _conntrack_max() -> int | None:
    try:
        return int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="N = 200 and 1,000, no plots")
    parser.add_argument("--n", type=int, action="append", help="an N to measure (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--plots-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--replot", type=Path, help="only redraw the plots from a scale.json")
    parser.add_argument(
        "--leak-selftest",
        action="store_true",
        help="make the wsession server leak on purpose: the run must end with exit code 1",
    )
    parser.add_argument("--ops", type=int, default=2000, help="operations per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per ops call")
    parser.add_argument(
        "--ops-calls", type=int, default=3, help="quiet ops calls wanted per variant (max 12)"
    )
    parser.add_argument("--broadcasts", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per step")
    parser.add_argument(
        "--budget", type=float, default=840.0, help="seconds for the whole run (default 14 min)"
    )
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())["points"]
        fields = Point.__dataclass_fields__
        again = [Point(**{k: v for k, v in p.items() if k in fields}) for p in saved]
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        for path in plot(again, args.plots_dir):
            print(f"wrote {path}")
        return 0
    wanted = tuple(args.n) if args.n else (SMOKE_NS if args.smoke else FULL_NS)
    opts = Options(
        ns=wanted,
        ops_k=args.ops if not args.smoke else 500,
        rounds=args.rounds if not args.smoke else 2,
        ops_calls=args.ops_calls if not args.smoke else 1,
        broadcasts=args.broadcasts if not args.smoke else 1,
        out=args.out,
        plots=not (args.no_plots or args.smoke),
        timeout=args.timeout,
        server_env={"BENCH_SCALE_LEAK": "1"} if args.leak_selftest else {},
        deadline=time.monotonic() + args.budget,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = hard if hard != resource.RLIM_INFINITY else 1 << 20
    raise_fd_limit(fds)
    ns, skipped = plan(wanted, fds)
    for n, why in skipped.items():
        print(f"WARNING: N = {n:,} cannot run here: {why}", file=sys.stderr)
    if skipped and ns:
        print(f"measuring the largest N that fits instead: {ns[-1]:,}", file=sys.stderr)
    if not ns:
        print("no N fits under the file-descriptor limit", file=sys.stderr)
        return 2
    tracked = _conntrack_max()
    if tracked is not None and 2 * len(VARIANTS) * ns[-1] > 0.9 * tracked:
        # Each loopback connection is two tracked flows when netfilter tracks loopback.
        print(
            f"WARNING: net.netfilter.nf_conntrack_max is {tracked:,}; {ns[-1]:,} connections "
            "to each of two servers may fill the table (connects then time out)",
            file=sys.stderr,
        )
    log_dir = ROOT / ".cache" / "bench-scale-logs"  # git-ignored; servers' and clients' stderr
    log_dir.mkdir(parents=True, exist_ok=True)
    points: list[Point] = []
    started = time.monotonic()
    try:
        with _sigterm_as_exit():
            for n in ns:
                if time.monotonic() > opts.deadline:
                    print(f"time budget spent: N = {n:,} and above not run", file=sys.stderr)
                    break
                t0 = time.monotonic()
                print(f"N = {n:,}: both servers ...", file=sys.stderr, flush=True)
                points += measure_n(n, opts, fds, log_dir)
                took = time.monotonic() - t0
                print(f"N = {n:,}: done in {took:.0f}s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: every server and client was stopped", file=sys.stderr)
        return 130
    text = render(points, skipped, (soft, fds))
    print(text)
    for point in points:
        if point.types_after_close:
            print(
                f"{point.variant} {point.n:,}: left after close: {point.types_after_close}; "
                f"modules imported meanwhile: {point.modules_after_close}"
            )
    if not args.smoke:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "scale.md").write_text(text)
        (opts.out / "scale.json").write_text(
            json.dumps(
                {
                    "points": [asdict(p) for p in points],
                    "skipped": {str(n): why for n, why in skipped.items()},
                    "rlimit_nofile": [soft, fds],
                    "seconds": round(time.monotonic() - started),
                },
                indent=1,
            )
        )
    if opts.plots:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        for path in plot(points, args.plots_dir):
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"total {time.monotonic() - started:.0f}s", file=sys.stderr)
    leaking = [v for v, per_conn in leaks(points).items() if _leaking(per_conn)]
    if leaking:
        print(f"LEAK: objects left after close grow with N for {leaking}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
