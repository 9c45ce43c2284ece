"""A lean WebSocket and HTTP load client on raw asyncio protocols (run it on uvloop).

No client library: every frame the client sends is built once (masked with a fixed key, which
servers must accept) and written as bytes; received frames are only counted. That keeps the
client's CPU per operation well below the server's, so the server is what the phases measure.
Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import Callable
from typing import Any, cast

HOST = "127.0.0.1"

_MASK = os.urandom(4)
_MAX_HEADER = 16384

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def _masked(payload: bytes) -> bytes:
    return bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    return header + _MASK + _masked(payload)


CLOSE_FRAME = client_frame(OP_CLOSE, struct.pack("!H", 1000))


def handshake_request(port: int, path: str) -> bytes:
    """The opening handshake of RFC 6455 (no extensions, no subprotocol)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class HandshakeFailed(ConnectionError):
    """The server answered the handshake with something other than 101."""


OnMessage = Callable[["WSConn"], None]


def _ignore(conn: WSConn) -> None:
    return None


class WSConn(asyncio.Protocol):
    """One client connection: handshake, then frames counted and passed to ``on_message``.

    ``on_message(conn)`` runs for each text or binary frame, inside ``data_received``: a phase
    answers there (writes the next frame) without a task or a future per message.
    """

    __slots__ = (
        "_buf",
        "close_received",
        "lost",
        "on_message",
        "open",
        "opened",
        "request",
        "transport",
    )

    def __init__(self, request: bytes, on_message: OnMessage = _ignore) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.open = False
        self.close_received = False
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEADER:
                    self._fail(HandshakeFailed("handshake response too long"))
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail(HandshakeFailed(bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")))
                return
            del buf[: end + 4]
            self.open = True
            self.opened.set_result(None)
        self._frames(buf)

    def _frames(self, buf: bytearray) -> None:
        size = len(buf)
        pos = 0
        while size - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == OP_CLOSE:
                self.close_received = True
            elif opcode == OP_PING:
                assert self.transport is not None
                self.transport.write(client_frame(OP_PONG, bytes(buf[start:end])))
            elif opcode != OP_PONG:
                self.on_message(self)
            pos = end
        if pos:
            del buf[:pos]

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        assert self.transport is not None
        self.transport.abort()

    def send(self, frame: bytes) -> None:
        """Write a prebuilt frame."""
        assert self.transport is not None
        self.transport.write(frame)

    def start_close(self) -> None:
        """Send a close frame; the server answers and closes TCP, which resolves ``lost``."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_ws(port: int, path: str, on_message: OnMessage = _ignore) -> WSConn:
    """Connect and complete the handshake (the caller bounds the time)."""
    loop = asyncio.get_running_loop()
    request = handshake_request(port, path)
    _, conn = await loop.create_connection(lambda: WSConn(request, on_message), HOST, port)
    try:
        await conn.opened
    except BaseException:
        conn.abort()
        raise
    return conn


async def close_all(conns: list[WSConn], timeout: float) -> int:
    """Close ``conns`` politely and wait for the server to drop them; abort stragglers.

    Returns how many had to be aborted.
    """
    for conn in conns:
        conn.start_close()
    pending = [c.lost for c in conns if not c.lost.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    aborted = 0
    for conn in conns:
        if not conn.lost.done():
            conn.abort()
            aborted += 1
    return aborted


async def open_many(
    port: int, path: str, count: int, concurrency: int, on_message: OnMessage, timeout: float
) -> list[WSConn]:
    """Open ``count`` connections, ``concurrency`` handshakes at a time, within ``timeout``."""
    conns: list[WSConn] = []
    started = 0

    async def opener() -> None:
        nonlocal started
        while started < count:
            started += 1
            conns.append(await open_ws(port, path, on_message))

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(opener() for _ in range(min(concurrency, count))))
    except BaseException:
        for conn in conns:
            conn.abort()
        raise
    return conns


class Http:
    """A keep-alive HTTP/1.1 client for the control endpoints (reconnects when needed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        """Send one request; return the status and the JSON body (``None`` if not JSON)."""
        for attempt in range(2):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
            assert self._reader is not None
            try:
                self._writer.write(
                    f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await self._reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
                continue  # the server closed an idle keep-alive connection: reconnect once
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            data = await self._reader.readexactly(length)
            try:
                return status, json.loads(data) if data else None
            except ValueError:
                return status, None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None
