"""``python -m example_app.cluster`` (``make run-cluster``): two workers of the example app on
one Redis, so people on different workers see and message each other.

Uses ``WSESSION_REDIS_URL`` when set; otherwise starts a private ``redis-server`` on a free port
in a temporary folder. Workers listen on ``PORT`` and ``PORT + 1`` (default 8000, 8001).
Ctrl-C (or SIGTERM) stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

from .procs import free_port, redis_binary, start_redis, start_worker, stop, wait_for_port


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the cluster like Ctrl-C does


def main() -> None:
    """Start Redis (unless given) and two uvicorn workers; stop them all on Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    started: list[subprocess.Popen[bytes]] = []
    redis_url = os.environ.get("WSESSION_REDIS_URL")
    try:
        if not redis_url:
            binary = redis_binary()
            if binary is None:
                raise SystemExit("redis-server not found: apt-get install redis-server")
            redis_port = free_port()
            started.append(start_redis(binary, redis_port, tempfile.mkdtemp(prefix="wsession-")))
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        base = int(os.environ.get("PORT", "8000"))
        env = {**os.environ, "WSESSION_REDIS_URL": redis_url}
        for port in (base, base + 1):
            started.append(start_worker(port, env, quiet=False))
            wait_for_port(port, started[-1], f"worker on port {port}")
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
        for proc in reversed(started):  # workers before the Redis they use
            stop(proc)


if __name__ == "__main__":
    main()
