"""``python -m bench.server --app bench.apps:bare_app``: serve one variant under uvicorn.

Binds 127.0.0.1 on a port the OS picks, prints ``PORT <n>`` on stdout, then serves with
uvicorn's defaults (uvloop, httptools, websockets-sansio) and one worker unless ``--workers``
says otherwise. The process dies with the runner that started it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

import uvicorn
from uvicorn.supervisors import Multiprocess

from .procs import raise_fd_limit

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM us when the runner dies, however it dies."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _snapshots_on_sigusr1(directory: Path) -> None:
    """For bench.profile: trace allocations; SIGUSR1 dumps a snapshot to ``snap-<n>``."""
    tracemalloc.start(12)
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        partial = directory / f".snap-{taken}"
        tracemalloc.take_snapshot().dump(str(partial))
        partial.rename(directory / f"snap-{taken}")
        taken += 1

    signal.signal(signal.SIGUSR1, dump)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--app", required=True, help="module:factory of the ASGI app")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--parent", type=int, default=os.getppid())
    args = parser.parse_args(argv)

    _die_with_parent(args.parent)
    raise_fd_limit()
    if snapshots := os.environ.get("BENCH_TRACEMALLOC_DIR"):
        _snapshots_on_sigusr1(Path(snapshots))
    config = uvicorn.Config(
        args.app,
        host="127.0.0.1",
        port=0,
        factory=True,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    sock = config.bind_socket()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
