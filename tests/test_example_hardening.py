"""The example app under hostile or clumsy input (issue 12): frames it cannot use, cross-site
requests, oversized bodies and messages, spoofed X-Forwarded-For, refused-handshake log noise,
Redis error text, and a bounded shutdown. Real uvicorn, real clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from example_app import create_app

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


# -- item 2: frames and bodies the example cannot use ----------------------------------------


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


# -- item 3: the demo API cannot be driven cross-site ----------------------------------------


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
