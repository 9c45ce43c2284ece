"""``python -m bench.scale_client``: one process holding many idle WebSocket connections.

Driven by ``bench.scale`` over stdin/stdout, one JSON object a line each way:

- ``{"cmd": "open", "port": P, "count": N}``: open N connections to 127.0.0.1:P (at most
  ``--concurrency`` handshakes in flight), answer ``{"opened": n, "failed": f, "error": e}``.
- ``{"cmd": "frames"}``: answer ``{"frames": {port: frames received}}``.
- ``{"cmd": "close", "port": P}``: close the connections to P politely, wait (bounded) for the
  server to drop them, abort stragglers; answer ``{"closed": n, "aborted": a}``.
- ``{"cmd": "quit"}`` or end of stdin: abort everything and exit.

A connection is a :class:`bench.client.WSConn` (a bare asyncio Protocol: handshake bytes out,
101 in, then frames only counted), so 20,000 of them cost the client a few tens of MB. Each
socket binds a source address out of ``--sources`` (127.0.0.x) with ``IP_BIND_ADDRESS_NO_PORT``,
so the kernel picks the port at connect time per 4-tuple: more than ~28,000 connections to one
server port need more than one source address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
from typing import Any

from .client import WSConn, close_all, handshake_request
from .procs import raise_fd_limit
from .server import _die_with_parent

HOST = "127.0.0.1"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Pool:
    """The connections of this process, by server port."""

    def __init__(self, sources: list[str], concurrency: int, timeout: float) -> None:
        self.sources = sources
        self.concurrency = concurrency
        self.timeout = timeout
        self.conns: dict[int, list[WSConn]] = {}
        self.frames: dict[int, int] = {}
        self._next_source = 0

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            source = self.sources[self._next_source % len(self.sources)]
            self._next_source += 1
            sock.bind((source, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open_one(self, port: int) -> WSConn:
        loop = asyncio.get_running_loop()
        frames = self.frames

        def counted(conn: WSConn) -> None:
            frames[port] += 1

        sock = self._socket()
        try:
            await loop.sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
        request = handshake_request(port, "/ws")
        _, conn = await loop.create_connection(lambda: WSConn(request, counted), sock=sock)
        try:
            await conn.opened
        except BaseException:
            conn.abort()
            raise
        return conn

    async def open(self, port: int, count: int) -> dict[str, Any]:
        conns = self.conns.setdefault(port, [])
        self.frames.setdefault(port, 0)
        started = opened = failed = 0
        error = ""

        async def opener() -> None:
            nonlocal started, opened, failed, error
            while started < count:  # bounded: each pass claims one of ``count``
                started += 1
                try:
                    conns.append(await self._open_one(port))
                    opened += 1
                except (OSError, ConnectionError) as exc:
                    failed += 1
                    error = f"{type(exc).__name__}: {exc}"

        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*(opener() for _ in range(min(self.concurrency, count))))
        except TimeoutError:
            error = f"timed out after {self.timeout}s"
        return {"opened": opened, "failed": count - opened, "error": error}

    async def close(self, port: int) -> dict[str, Any]:
        conns = self.conns.pop(port, [])
        aborted = await close_all(conns, timeout=self.timeout)
        return {"closed": len(conns), "aborted": aborted}

    def abort_all(self) -> None:
        for conns in self.conns.values():
            for conn in conns:
                conn.abort()
        self.conns.clear()


async def serve(pool: Pool) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():  # bounded by the controller's commands
            command = json.loads(line)
            cmd = command["cmd"]
            if cmd == "open":
                answer = await pool.open(int(command["port"]), int(command["count"]))
            elif cmd == "frames":
                answer = {"frames": pool.frames}
            elif cmd == "close":
                answer = await pool.close(int(command["port"]))
            elif cmd == "quit":
                break
            else:
                answer = {"error": f"unknown command {cmd!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        pool.abort_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_client")
    parser.add_argument("--sources", default="127.0.0.1", help="comma-separated 127.0.0.x")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per command")
    parser.add_argument("--fds", type=int, default=1 << 20, help="RLIMIT_NOFILE wanted")
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    raise_fd_limit(args.fds)
    sources = args.sources.split(",")
    for source in sources:
        if not source.startswith("127."):
            parser.error(f"loopback sources only, not {source}")
    pool = Pool(sources, args.concurrency, args.timeout)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(pool))


if __name__ == "__main__":
    main()
