"""Processes the example runs beside itself: a private redis-server and uvicorn workers.

Shared by ``make run-cluster``, the multi-process tests and ``bench.redis_latency``, so there is
one way to start them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15) -> None:
    """Return once ``port`` accepts connections; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by the deadline
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not start listening on port {port}")


def redis_binary() -> str | None:
    """The system's ``redis-server`` (Debian package ``redis-server``), if installed."""
    return shutil.which("redis-server")


def start_redis(binary: str, port: int, folder: Path | str) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:``port`` keeping nothing on disk; returns once it listens."""
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc, "redis-server")
    return proc


def start_worker(port: int, env: dict[str, str], *, quiet: bool = True) -> subprocess.Popen[bytes]:
    """One process of the example app on 127.0.0.1:``port`` (not yet listening), started by
    its own launcher (``python -m example_app``), so it runs with the launcher's caps."""
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    if quiet:
        env["WSESSION_LOG_LEVEL"] = "warning"
    argv = [sys.executable, "-m", "example_app"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL if quiet else None)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Terminate ``proc`` and wait for it (kill it if it does not stop in time)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
