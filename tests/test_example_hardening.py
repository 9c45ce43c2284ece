"""The example app under hostile or clumsy input (issue 12): frames it cannot use, cross-site
requests, oversized bodies and messages, spoofed X-Forwarded-For, refused-handshake log noise,
Redis error text, and a bounded shutdown. Real uvicorn, real clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from example_app import create_app
from example_app.__main__ import SHUTDOWN_MARGIN
from example_app.procs import free_port, start_worker, stop, wait_for_port

from .redis_support import RedisServer
from .support import Server, next_of, read_until_closed, run_server

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
FOREIGN = "http://evil.example"


@asynccontextmanager
async def example(env: Mapping[str, str] | None = None, **config: object) -> AsyncIterator[Server]:
    """The example app (configured by ``env`` instead of os.environ) on a real uvicorn."""
    async with run_server(create_app(environ=dict(env or {})), **config) as server:
        yield server


async def join_as(server: Server, name: str) -> tuple[ClientConnection, str]:
    ws = await connect(f"{server.ws}/ws?name={name}")
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws, str(welcome["id"])


async def echo_works(ws: ClientConnection, text: str = "still here") -> None:
    await ws.send(json.dumps({"type": "echo", "text": text}))
    assert (await next_of(ws, "echo"))["text"] == text


# -- item 2: frames and bodies the example cannot use ---------------------------------------------


async def test_binary_frame_is_closed_with_1003_and_the_server_goes_on() -> None:
    async with example() as server:
        ws, _ = await join_as(server, "bin")
        await ws.send(b"\x00\x01binary")
        close = await read_until_closed(ws)
        assert close is not None and close.code == 1003, close
        other, _ = await join_as(server, "after")
        await echo_works(other)
        await other.close()


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        ('{"type": "echo", "text": ' + "[" * 5000 + "]" * 5000 + "}", "RecursionError depth"),
        ('{"type": "echo", "text": ' + "[" * 100 + "]" * 100 + "}", "deeper than the cap"),
        ('{"type": "broadcast", "text": NaN}', "NaN"),
        ('{"type": "echo", "text": "\\ud800"}', "lone surrogate"),
        ("not json", "not JSON"),
        ("[1, 2]", "not an object"),
    ],
)
async def test_unusable_json_gets_an_error_message_and_the_connection_stays(
    raw: str, what: str
) -> None:
    async with example() as server:
        ws, _ = await join_as(server, "json")
        await ws.send(raw)
        error = await next_of(ws, "error")
        assert isinstance(error["error"], str) and error["error"], what
        await echo_works(ws)
        await ws.close()


async def test_invalid_utf8_text_frame_is_closed_1007_by_the_protocol_layer() -> None:
    async with example() as server:
        ws, _ = await join_as(server, "utf8")
        await ws.send(b"\xff\xfe", text=True)  # a text frame that is not UTF-8
        close = await read_until_closed(ws)
        assert close is not None and close.code == 1007, close


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"text": "\\ud800"}',
        b'{"text": NaN}',
        b"\xff\xfe not utf-8",
    ],
)
async def test_api_send_answers_400_with_json_for_bodies_it_cannot_use(body: bytes) -> None:
    async with example() as server:
        ws, sid = await join_as(server, "target")
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{server.http}/api/send/{sid}",
                content=body,
                headers={"content-type": "application/json"},
            )
        assert response.status_code == 400, response.text
        assert isinstance(response.json()["error"], str)
        await echo_works(ws)
        await ws.close()


# -- item 3: the demo API cannot be driven cross-site ---------------------------------------------


async def test_cross_site_posts_are_refused_403() -> None:
    async with example() as server:
        ws, sid = await join_as(server, "victim")
        async with httpx.AsyncClient() as http:
            attempts = [
                http.post(
                    f"{server.http}/api/kick/{sid}",
                    content=b"x",
                    headers={"origin": FOREIGN, "content-type": "text/plain"},
                ),
                http.post(f"{server.http}/api/kick/{sid}", headers={"origin": FOREIGN}),
                http.post(f"{server.http}/api/kick/{sid}", headers={"origin": "null"}),
                http.post(
                    f"{server.http}/api/send/{sid}",
                    json={"text": "forged"},
                    headers={"origin": FOREIGN},
                ),
            ]
            for attempt in attempts:
                response = await attempt
                assert response.status_code == 403, response.text
                assert isinstance(response.json()["error"], str)
        await echo_works(ws)  # neither kicked nor sent to
        await ws.close()


async def test_same_origin_and_allowed_origins_may_post() -> None:
    env = {"WSESSION_ALLOWED_ORIGINS": "same-origin, https://admin.example"}
    async with example(env) as server:
        ws, sid = await join_as(server, "friend")
        async with httpx.AsyncClient() as http:
            own = f"http://127.0.0.1:{server.port}"
            sent = await http.post(
                f"{server.http}/api/send/{sid}", json={"text": "hi"}, headers={"origin": own}
            )
            assert sent.status_code == 200, sent.text
            assert (await next_of(ws, "dm"))["text"] == "hi"
            kicked = await http.post(
                f"{server.http}/api/kick/{sid}", headers={"origin": "https://admin.example"}
            )
            assert kicked.status_code == 200, kicked.text
        close = await read_until_closed(ws)
        assert close is not None and close.code == 4000


async def test_post_bodies_must_be_json_415() -> None:
    async with example() as server:
        ws, sid = await join_as(server, "typed")
        async with httpx.AsyncClient() as http:
            for path in (f"/api/send/{sid}", f"/api/kick/{sid}"):
                for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
                    headers = {"content-type": content_type} if content_type else {}
                    response = await http.post(
                        f"{server.http}{path}", content=b'{"text": "x"}', headers=headers
                    )
                    assert response.status_code == 415, (path, content_type, response.text)
            # A charset parameter is still JSON.
            ok = await http.post(
                f"{server.http}/api/send/{sid}",
                content=b'{"text": "typed"}',
                headers={"content-type": "application/json; charset=utf-8"},
            )
            assert ok.status_code == 200, ok.text
        assert (await next_of(ws, "dm"))["text"] == "typed"
        await ws.close()


# -- item 8: size caps ----------------------------------------------------------------------------


async def raw_post(port: int, head: str, body: bytes = b"", timeout: float = 5) -> bytes:
    """Send a hand-made HTTP request (perhaps with less body than it declares); return the
    status line and headers of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_declared_oversized_body_is_answered_413_without_reading_it() -> None:
    async with example() as server:
        head = (
            "POST /api/send/nobody HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n"
        )
        # 1 KiB of a declared 50 MB: the answer must come without the other 49.99 MB.
        answer = await raw_post(server.port, head, b"{" + b" " * 1023)
        assert answer.startswith(b"HTTP/1.1 413"), answer


async def test_streamed_body_over_the_configured_cap_is_413() -> None:
    async with example({"WSESSION_MAX_BODY": "1000"}) as server:
        ws, sid = await join_as(server, "capped")

        async def chunks(size: int) -> AsyncIterator[bytes]:
            text = json.dumps({"text": "y" * size}).encode()
            for i in range(0, len(text), 100):
                yield text[i : i + 100]

        # Sent whole, so the server's early answer is not lost to a reset of a client that is
        # still writing (stopping to read is the point; such a client may see a reset).
        text = json.dumps({"text": "y" * 2000}).encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (text[:1500], text[1500:]))
        head = (
            f"POST /api/send/{sid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        answer = await raw_post(server.port, head, chunked + b"0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        async with httpx.AsyncClient() as http:
            headers = {"content-type": "application/json"}
            url = f"{server.http}/api/send/{sid}"
            small = await http.post(url, content=chunks(900), headers=headers)
            assert small.status_code == 200, small.text
        assert (await next_of(ws, "dm"))["text"] == "y" * 900
        await ws.close()


async def test_oversized_websocket_message_is_closed_1009_by_the_app() -> None:
    # run_server leaves uvicorn's own 16 MiB limit: the app's check must catch it.
    async with example({"WSESSION_MAX_MESSAGE": "4096"}) as server:
        ws, _ = await join_as(server, "big")
        await echo_works(ws, "z" * 3000)
        await ws.send(json.dumps({"type": "echo", "text": "z" * 5000}))
        close = await read_until_closed(ws)
        assert close is not None and close.code == 1009, close
        assert close.reason.startswith("messages are limited"), close


async def test_long_names_are_refused_403() -> None:
    async with example() as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}/ws?name={'n' * 1000}")
        assert refused.value.response.status_code == 403


# -- item 8, the launcher (python -m example_app) -------------------------------------------------


@contextmanager
def launched(env: Mapping[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The example's launcher (``python -m example_app``, via procs) on a free port."""
    port = free_port()
    proc = start_worker(port, {**os.environ, **env})
    try:
        wait_for_port(port, proc, "the example's launcher")
        yield proc, port
    finally:
        stop(proc)


async def test_launcher_caps_websocket_messages_at_the_protocol_layer() -> None:
    with launched({"WSESSION_MAX_MESSAGE": "4096"}) as (_, port):
        ws = await connect(f"ws://127.0.0.1:{port}/ws?name=big")
        await ws.recv()
        await ws.send("q" * 8192)
        close = await read_until_closed(ws)
    assert close is not None and close.code == 1009, close
    # uvicorn's ws_max_size stopped it, not the app's own check (which says "messages are...").
    assert not close.reason.startswith("messages"), close


# -- item 9: X-Forwarded-For is ignored unless a proxy is named -----------------------------------


async def admitted_with_forwarded_for(port: int, count: int) -> tuple[int, list[int]]:
    clients: list[ClientConnection] = []
    refused: list[int] = []
    try:
        for i in range(count):
            url = f"ws://127.0.0.1:{port}/ws?name=p{i}"
            try:
                ws = await connect(url, additional_headers={"X-Forwarded-For": f"203.0.113.{i}"})
            except InvalidStatus as exc:
                refused.append(exc.response.status_code)
            else:
                await ws.recv()
                clients.append(ws)
        return len(clients), refused
    finally:
        for ws in clients:
            await ws.close()


async def test_launcher_ignores_forwarded_for_unless_a_proxy_is_named() -> None:
    with launched({"WSESSION_MAX_PER_IP": "2"}) as (_, port):
        admitted, refused = await admitted_with_forwarded_for(port, 5)
    assert (admitted, refused) == (2, [429, 429, 429])
    env = {"WSESSION_MAX_PER_IP": "2", "WSESSION_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with launched(env) as (_, port):  # now the header names the client: 5 distinct IPs
        admitted, refused = await admitted_with_forwarded_for(port, 5)
    assert (admitted, refused) == (5, [])


# -- item 6: shutdown is bounded ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_shutdown_is_bounded_with_clients_that_never_read() -> None:
    drain = 2.0
    env = {"WSESSION_DRAIN_TIMEOUT": str(drain), "WSESSION_MAX_BODY": "200000"}
    with launched(env) as (proc, port):
        stuck: list[ClientConnection] = []
        for i in range(5):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning
            sock.connect(("127.0.0.1", port))
            ws = await connect(
                f"ws://127.0.0.1:{port}/ws?name=stuck{i}", sock=sock, max_queue=1, compression=None
            )
            stuck.append(ws)  # never read from again: their buffers fill up
        talker = await connect(f"ws://127.0.0.1:{port}/ws?name=talker", compression=None)
        await talker.recv()
        text = "b" * 60_000
        for _ in range(120):  # 7 MB to each silent client, far beyond its socket buffers
            await talker.send(json.dumps({"type": "broadcast", "text": text}))
            await next_of(talker, "broadcast", timeout=10)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, drain + SHUTDOWN_MARGIN + 6)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {time.monotonic() - started:.1f}s after SIGTERM")
        took = time.monotonic() - started
        for ws in [*stuck, talker]:
            ws.transport.abort()  # the server is gone; drop what the clients still hold
    print(f"exited {took:.2f}s after SIGTERM (drain_timeout {drain}s)")
    # The drain, then uvicorn's graceful window, then a little for lifespan shutdown and exit.
    assert took < drain + SHUTDOWN_MARGIN + 1.5, took


# -- item 10: refused handshakes do not log errors ------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_refused_handshakes_log_no_error() -> None:
    collect = Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")
    try:
        async with example({"WSESSION_MAX_PER_IP": "1"}) as server:
            uvicorn_log.addHandler(collect)  # after uvicorn configured its loggers
            statuses = []
            for url in [f"{server.ws}/ws?name=", f"{server.ws}/ws"] * 3:
                with pytest.raises(InvalidStatus) as refused:
                    await connect(url)
                statuses.append(refused.value.response.status_code)
            ws, _ = await join_as(server, "first")
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"{server.ws}/ws?name=second")  # per-IP limit
            statuses.append(refused.value.response.status_code)
            await ws.close()
        # The server has stopped: every connection task has finished and logged.
    finally:
        uvicorn_log.removeHandler(collect)
    assert statuses == [403] * 6 + [429]
    errors = [r.getMessage() for r in collect.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_the_quiet_filter_keeps_the_line_when_no_denial_was_sent() -> None:
    """An app that really returns without a handshake is still reported."""
    from example_app.log_noise import HandshakeNoiseFilter

    record = logging.LogRecord(
        "uvicorn.error",
        logging.ERROR,
        __file__,
        1,
        "ASGI callable returned without completing handshake.",
        None,
        None,
    )
    assert HandshakeNoiseFilter().filter(record) is True


# -- item 13: Redis error text stays in the server log --------------------------------------------


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_redis_outage_reaches_clients_as_temporarily_unavailable(
    own_redis_server: RedisServer,
) -> None:
    env = {
        "WSESSION_REDIS_URL": own_redis_server.url,
        "WSESSION_REDIS_PREFIX": f"hardening-{os.getpid()}-{time.monotonic_ns()}",
        "WSESSION_HEARTBEAT": "0.2",
    }
    async with example(env) as server:
        ws, _ = await join_as(server, "outage")
        own_redis_server.stop()
        await ws.send(json.dumps({"type": "dm", "to": "somewhere-else", "text": "x"}))
        error = await next_of(ws, "error", timeout=20)
        assert error["error"] == "temporarily unavailable", error
        assert str(own_redis_server.port) not in json.dumps(error)
        async with httpx.AsyncClient() as http:
            stats = await http.get(f"{server.http}/api/stats", timeout=20)
        assert stats.status_code == 503
        assert str(own_redis_server.port) not in stats.text
        await echo_works(ws)
        await ws.close()
