"""The outbound guarantees again, on real uvicorn with real clients (issue 11, issue 12 item 1).

tests/test_guarantees.py reproduces each race deterministically on a fake server; these check
that uvicorn's own send, flow control and close handshake give the same result.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from wsession import EndReason, SendResult, get_session

from .support import mount, read_until_closed, recorded, run_server

pytestmark = pytest.mark.anyio


def never_reads() -> object:
    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        await asyncio.Event().wait()

    return endpoint


async def read_numbered_until_closed(ws: ClientConnection, into: list[int]) -> Close | None:
    """Read frames numbered in their first 6 characters until the server closes."""
    async with asyncio.timeout(15):
        try:
            while True:
                into.append(int(str(await ws.recv())[:6]))
        except ConnectionClosed as closed:
            return closed.rcvd


async def test_slow_reader_gets_the_slow_consumer_close_after_its_data() -> None:
    # close_timeout: how long the slow reader has to reach the close frame, and how long this
    # app (it never reads, so it never hears the client's reply) lives on afterwards.
    manager, recorder = recorded(max_backlog=4, close_timeout=4)
    async with run_server(mount(never_reads(), manager)) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning
        sock.connect(("127.0.0.1", server.port))
        async with connect(f"{server.ws}/ws", sock=sock, max_queue=1, compression=None) as ws:
            sid = str(await ws.recv())
            payload = "x" * 65536
            results: list[SendResult] = []
            async with asyncio.timeout(20):
                for i in range(2000):  # bounded; the policy fires long before
                    results.append(await manager.send(sid, f"{i:06d}{payload}"))
                    if results[-1] is SendResult.GONE:
                        break
                    await asyncio.sleep(0)  # let the writer run between sends
            assert results[-1] is SendResult.GONE and manager.stats.slow_consumers == 1
            # The client was slow, not dead: it reads on and learns why it was closed.
            received: list[int] = []
            frame = await read_numbered_until_closed(ws, received)
            assert frame is not None and frame.code == 1013
            assert received == list(range(len(received)))  # in order, none lost before it
        await recorder.wait_ended(1, timeout=15)
    assert recorder.ended[0][1:3] == (EndReason.SERVER_CLOSED, 1013)


async def test_kick_before_accept_reaches_the_client_with_its_code() -> None:
    accept = asyncio.Event()

    async def slow_accept(ws: WebSocket) -> None:
        await accept.wait()
        await ws.accept()
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            pass

    manager, recorder = recorded(close_timeout=20)
    connected = asyncio.Event()
    manager.on_connect(lambda session: connected.set())
    async with run_server(mount(slow_accept, manager)) as server:
        opening = asyncio.ensure_future(connect(f"{server.ws}/ws"))
        await asyncio.wait_for(connected.wait(), 5)  # registration follows without an await
        (sid,) = manager.local
        assert await manager.close(sid, 4000, "kicked")
        ws = await asyncio.wait_for(opening, 5)
        frame = await read_until_closed(ws, timeout=5)
        assert frame is not None and (frame.code, frame.reason) == (4000, "kicked")
        accept.set()
        await recorder.wait_ended(1)
    assert recorder.ended[0][1:4] == (EndReason.SERVER_CLOSED, 4000, "kicked")


async def test_app_still_sending_when_kicked_sees_a_plain_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[BaseException] = []

    async def chatty(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(get_session(ws).id)
        try:
            for i in range(1_000_000):  # bounded
                await ws.send_text(json.dumps(i))
                await asyncio.sleep(0)
        except Exception as exc:
            seen.append(exc)

    manager, recorder = recorded(close_timeout=5)
    async with run_server(mount(chatty, manager)) as server:
        async with connect(f"{server.ws}/ws") as ws:
            sid = str(await ws.recv())
            await ws.recv()
            assert await manager.close(sid, 4000, "kicked")
            frame = await read_until_closed(ws)
            assert frame is not None and frame.code == 4000
        await recorder.wait_ended(1)
    assert len(seen) == 1 and isinstance(seen[0], WebSocketDisconnect), seen
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
