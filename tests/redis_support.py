"""A private redis-server per test run (never the machine's shared one on 6379)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from example_app.procs import free_port, redis_binary, start_redis, stop, wait_for_port

INSTALL_HINT = "redis-server is not installed (apt-get install redis-server)"

__all__ = [
    "RedisClusterServer",
    "RedisServer",
    "any_redis",
    "direct_client",
    "free_port",
    "key_prefix",
    "own_redis_server",
    "redis_cluster",
    "redis_server",
]


class RedisServer:
    """A redis-server process on a free port in a temporary folder; restartable."""

    is_cluster = False

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


class RedisClusterServer:
    """A Redis Cluster of ``masters`` private redis-server processes (no replicas) on free
    loopback ports, each in its own folder; ``url`` names one node (clients find the others)."""

    is_cluster = True

    def __init__(self, binary: str, folder: Path, masters: int = 3) -> None:
        self.binary = binary
        self.folder = folder
        self.ports = [free_port() for _ in range(masters)]
        # The cluster bus ports are given explicitly: port + 10000 may not be free.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 20) -> None:
        """Start the nodes, split the 16384 slots between them, introduce them to each other,
        and return once every node reports ``cluster_state:ok``."""
        import redis

        for n, port in enumerate(self.ports):
            folder = self.folder / f"node{n}"
            folder.mkdir(exist_ok=True)
            self.procs.append(_start_node(self.binary, port, self.bus_ports[n], folder))
        clients: list[Any] = [redis.Redis(port=p, socket_timeout=5) for p in self.ports]
        try:
            share = 16384 // len(self.ports)
            for n, client in enumerate(clients):
                last = 16383 if n == len(clients) - 1 else (n + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", n * share, last)
                if n:
                    client.execute_command(
                        "CLUSTER MEET", "127.0.0.1", self.ports[0], self.bus_ports[0]
                    )
            deadline = time.monotonic() + timeout
            while not all(_cluster_ok(c, len(clients)) for c in clients):  # bounded below
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def proc_holding(self, key: str) -> subprocess.Popen[bytes]:
        """The process of the node that owns ``key``'s slot."""
        import redis

        client: Any = redis.Redis(port=self.ports[0], decode_responses=True, socket_timeout=5)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return self.procs[self.ports.index(int(owner[1]))]
        finally:
            client.close()
        raise LookupError(f"no node holds slot {slot}")

    def move_slot_of(self, key: str) -> tuple[int, int]:
        """Reshard: move ``key``'s slot, keys and all, to another node (the steps of
        ``redis-cli --cluster reshard`` for one slot). Returns the (old, new) owner ports."""
        import redis

        def client(port: int) -> Any:
            return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

        first = client(self.ports[0])
        slot = int(first.execute_command("CLUSTER KEYSLOT", key))
        old = next(
            int(owner[1])
            for start, end, owner, *_ in first.execute_command("CLUSTER SLOTS")
            if int(start) <= slot <= int(end)
        )
        first.close()
        new = next(p for p in self.ports if p != old)
        source, target = client(old), client(new)
        try:
            ids = {p: str(client(p).execute_command("CLUSTER MYID")) for p in self.ports}
            target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[old])
            source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[new])
            for _ in range(10_000):  # bounded: each round moves up to 100 keys
                keys = source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                source.execute_command("MIGRATE", "127.0.0.1", new, "", 0, 5000, "KEYS", *keys)
            for port in self.ports:
                node = client(port)
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[new])
                node.close()
        finally:
            source.close()
            target.close()
        return old, new

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        self.procs = []


def _start_node(binary: str, port: int, bus_port: int, folder: Path) -> subprocess.Popen[bytes]:
    """One cluster-enabled redis-server on 127.0.0.1:``port``, keeping nothing on disk but its
    cluster config; returns once it listens."""
    proc = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)),
            *("--save", "", "--appendonly", "no", "--cluster-enabled", "yes"),
            *("--cluster-port", str(bus_port), "--cluster-config-file", "nodes.conf"),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc, "redis-server (cluster node)")
    return proc


def _cluster_ok(client: Any, masters: int) -> bool:
    info = client.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
    fields = {str(k): str(v) for k, v in info.items()}
    return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(masters)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One private 3-master Redis Cluster for the run; tests keep apart by key prefix."""
    cluster = RedisClusterServer(require_redis_binary(), tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis(request: pytest.FixtureRequest) -> RedisServer | RedisClusterServer:
    """A private single Redis (this test's own), or the run's private Redis Cluster."""
    fixture = "redis_cluster" if request.param == "redis-cluster" else "own_redis_server"
    server: RedisServer | RedisClusterServer = request.getfixturevalue(fixture)
    return server


def key_prefix(server: RedisServer | RedisClusterServer, prefix: str) -> str:
    """How the registry writes ``prefix`` in its key names there (a hash tag on a cluster)."""
    return f"{{{prefix}}}" if server.is_cluster else prefix


def direct_client(server: RedisServer | RedisClusterServer) -> Any:
    """A client of ``server`` for a test to look at keys (a cluster client on a cluster)."""
    if server.is_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(server.url, decode_responses=True)
    from redis.asyncio import Redis

    return Redis.from_url(server.url, decode_responses=True)
