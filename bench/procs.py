"""Reading other processes from /proc (CPU time, RSS, process trees) and raising fd limits.

CPU time comes from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds actually run on a CPU,
summed over the process's threads) rather than ``stat``'s utime+stime, whose 10 ms clock ticks
are too coarse for a phase that costs a few hundred milliseconds. Both count the same thing:
time the process spent on a CPU, user and kernel.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

PROC = Path("/proc")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3, ``state``, comes first)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        fields = _stat_fields(other)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(other)
    found: list[int] = []
    todo = [pid]
    while todo:  # bounded: each pid is visited once, the tree is finite
        for child in children.pop(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: a server and, with several workers, its workers."""
    return [pid, *descendants(pid)]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(pid)
    return members


def is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cpu_ns(pids: list[int]) -> int:
    """CPU time (user + system, ns) the live threads of ``pids`` have used so far."""
    total = 0
    for pid in pids:
        task_dir = PROC / str(pid) / "task"
        try:
            tids = list(task_dir.iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            try:
                total += int((tid / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return total


def cpu_ticks_ns(pids: list[int]) -> int:
    """utime + stime of ``pids`` from /proc/<pid>/stat (10 ms resolution): a cross-check."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total * 1_000_000_000 // _CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of ``pids`` (bytes), from /proc/<pid>/statm."""
    total = 0
    for pid in pids:
        try:
            resident = int((PROC / str(pid) / "statm").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        total += resident * _PAGE_KIB * 1024
    return total


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def machine_busy_ns() -> int:
    """CPU time all processes on this machine have used (user, nice, system, irq, softirq,
    steal; ns), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) * 1_000_000_000 // _CLK_TCK
