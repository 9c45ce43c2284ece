"""``python -m example_app.cluster`` (``make run-cluster``): two workers of the example app on
one Redis, so people on different workers see and message each other.

Uses ``WSESSION_REDIS_URL`` when set; otherwise starts a private ``redis-server`` on a free port
in a temporary folder. Workers listen on ``PORT`` and ``PORT + 1`` (default 8000, 8001).
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening on port {port}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the cluster like Ctrl-C does


def main() -> None:
    """Start Redis (unless given) and two uvicorn workers; stop them all on Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    started: list[subprocess.Popen[bytes]] = []
    redis_url = os.environ.get("WSESSION_REDIS_URL")
    try:
        if not redis_url:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("redis-server not found: apt-get install redis-server")
            redis_port = _free_port()
            folder = tempfile.mkdtemp(prefix="wsession-redis-")
            redis = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    folder,
                ],
                stdout=subprocess.DEVNULL,
            )
            started.append(redis)
            _wait_for_port(redis_port, redis, "redis-server")
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        base = int(os.environ.get("PORT", "8000"))
        env = {**os.environ, "WSESSION_REDIS_URL": redis_url}
        for port in (base, base + 1):
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "example_app.app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
            )
            started.append(worker)
            _wait_for_port(port, worker, f"worker on port {port}")
        print(f"Redis: {redis_url}", flush=True)
        for port in (base, base + 1):
            print(f"worker: http://127.0.0.1:{port}/", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while all(p.poll() is None for p in started):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in reversed(started):
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
