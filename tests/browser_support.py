"""Browser-test helpers: find the system Chromium, and run the example app in a thread.

Playwright's sync API runs its own event loop in the test's thread, so the server runs in a
thread of its own, on a socket bound here (port 0, the OS picks) and kept across restarts.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

# The real binaries, not the /usr/bin wrapper scripts (Debian's chromium packages).
CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
)
# Playwright already passes --headless and most of the quiet-down flags; these keep the
# browser off the network and fit a container where we run as root (no sandbox).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str | None:
    """The Chromium binary to drive: ``$WSESSION_CHROMIUM`` if set, else the system one."""
    override = os.environ.get("WSESSION_CHROMIUM")
    candidates = (override,) if override else CHROMIUM_CANDIDATES
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _bind(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class ThreadedServer:
    """A uvicorn server in a background thread, on a port that stays ours across restarts.

    ``stop()`` ends the server but keeps the port bound (not listening), so browsers that
    reconnect meanwhile are refused at once, and ``start()`` serves a fresh app there again.
    """

    def __init__(self, app_factory: Callable[[], Any]) -> None:
        self._app_factory = app_factory
        self._sock: socket.socket | None = _bind()
        self.port: int = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Serve a new app from the factory; return once uvicorn accepts connections."""
        assert self._thread is None, "already running"
        sock = self._sock or _bind(self.port)
        self._sock = sock
        config = uvicorn.Config(
            self._app_factory(),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        self._server, self._error = server, None

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # handed to the test thread by stop()
                self._error = exc

        self._thread = threading.Thread(target=serve, name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:  # uvicorn offers no start event; this polls its flag
            if not self._thread.is_alive():
                self._thread = None
                raise RuntimeError(f"uvicorn stopped before it started: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop(keep_port=False)
                raise TimeoutError(f"uvicorn did not start within {timeout}s")
            time.sleep(0.01)

    def stop(self, *, keep_port: bool = True, timeout: float = 15.0) -> None:
        """Shut the server down (graceful: its lifespan drains sessions) and join the thread.

        With ``keep_port`` the port is bound again at once so ``start()`` can reuse it.
        """
        thread, server = self._thread, self._server
        if thread is not None and server is not None:
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5)
                raise RuntimeError(f"uvicorn did not stop within {timeout}s")
        self._thread = self._server = None
        if self._sock is not None:
            self._sock.close()  # uvicorn closed it already when it served; closing is idempotent
            self._sock = None
        if keep_port:
            self._sock = _bind(self.port)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("the uvicorn thread failed") from error
