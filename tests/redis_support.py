"""A private redis-server per test run (never the machine's shared one on 6379)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from example_app.procs import free_port, redis_binary, start_redis, stop

INSTALL_HINT = "redis-server is not installed (apt-get install redis-server)"

__all__ = ["RedisServer", "free_port", "own_redis_server", "redis_server"]


class RedisServer:
    """A redis-server process on a free port in a temporary folder; restartable."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_redis(self.binary, self.port, self.folder)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def require_redis_binary() -> str:
    binary = redis_binary()
    if binary is None:
        if os.environ.get("WSESSION_REQUIRE_REDIS") == "1":
            pytest.fail(INSTALL_HINT + "; WSESSION_REQUIRE_REDIS=1 forbids skipping")
        pytest.skip(INSTALL_HINT)
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the run; tests keep apart by key prefix."""
    server = RedisServer(require_redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test (which may restart it)."""
    server = RedisServer(require_redis_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
