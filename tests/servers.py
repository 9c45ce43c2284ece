"""Launchers for the server matrix: uvicorn, hypercorn, daphne and granian as subprocesses.

Each server is started with the invocation the README's Compatibility section recommends, on a
free 127.0.0.1 port, in its own process group (so its workers are stopped with it). A missing
server is an error, never a skip: the dev extra pins all four.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("uvicorn", "hypercorn", "daphne", "granian")
"""Every server the matrix runs, by the name of its Python package."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_argv(server: str, app: str, port: int) -> list[str]:
    """The command that serves ``app`` (``module:attribute``) with ``server`` on ``port``.

    These are the invocations the README recommends: hypercorn with ``-w 0`` (the app runs in
    the process that receives SIGTERM, so wsession can drain; with workers the signal never
    reaches the app), granian's ASGI interface with one worker, daphne and uvicorn as they are.
    """
    py = [sys.executable, "-m"]
    if server == "uvicorn":
        return [*py, "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--timeout-graceful-shutdown", "30"]  # fmt: skip
    if server == "hypercorn":
        return [*py, "hypercorn", app, "--bind", f"127.0.0.1:{port}", "-w", "0",
                "--log-level", "warning", "--graceful-timeout", "30"]  # fmt: skip
    if server == "daphne":
        return [*py, "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0", app]
    if server == "granian":
        return [*py, "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--log-level", "warning", app]  # fmt: skip
    raise ValueError(f"unknown server {server!r}; expected one of {SERVERS}")


@dataclass
class ServerProcess:
    """A server running ``app`` in a subprocess: its port, process and captured output."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    output: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        """What the server printed so far (stdout and stderr together)."""
        return self.output.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server's main process (not its group: as a supervisor would)."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or ``None`` if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Kill the whole process group (the server and any worker it started)."""
        with suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _answers(port: int) -> bool:
    """True once the server answers an HTTP request (any status) on ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


@contextmanager
def serve(
    server: str,
    app: str,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    start_timeout: float = 20.0,
    extra_args: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run ``app`` under ``server`` until the block ends; then stop it and its process group.

    ``extra_args`` are appended to the recommended invocation (a later option wins), for tests
    of other invocations.

    The block's end sends SIGTERM and allows 10 s before SIGKILL; a test that checks shutdown
    itself signals and waits first.

    Raises:
        RuntimeError: the server exited or did not answer within ``start_timeout`` seconds
            (the message carries its output).
    """
    port = free_port()
    output = tmp_path / f"{server}-{port}.log"
    sink: IO[bytes] = output.open("wb")
    proc = subprocess.Popen(
        [*server_argv(server, app, port), *extra_args],
        cwd=ROOT,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    running = ServerProcess(server, port, proc, output)
    try:
        deadline = time.monotonic() + start_timeout
        while not _answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start on port {port}:\n{running.log()}")
            time.sleep(0.05)  # polls the port until the server answers
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if running.wait(10) is None:
                running.kill()
        else:
            running.kill()  # the main process exited: make sure no worker outlived it
        sink.close()
