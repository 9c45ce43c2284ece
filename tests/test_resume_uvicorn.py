"""Resumption on a real uvicorn server with real clients (issue 14): the example app's contract.

A client's TCP connection is reset in the middle of continuous numbered traffic; it reconnects
with its token and the last ``seq`` it processed and must see every message exactly once, in
order. The server sometimes notices the reset only after the client is back: the resume then
takes the session over from the old connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from example_app import create_app

from .support import reset_connection, run_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOTAL = 300


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        return json.loads(await ws.recv())  # type: ignore[no-any-return]


async def open_ws(base: str, query: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{base}/ws?{query}", open_timeout=10)
    hello = await recv_json(ws)
    assert hello["type"] == "welcome"
    return ws, hello


@pytest.mark.parametrize("drop_after", [1, 120])
async def test_a_reset_connection_resumes_with_no_gap_and_no_duplicate(drop_after: int) -> None:
    app = create_app(environ={"WSESSION_PRESENCE_INTERVAL": "60"})
    manager = app.state.sessions
    async with run_server(app) as server:
        ws, hello = await open_ws(server.ws, "name=alice")
        sid, token = hello["id"], hello["resume"]
        assert hello["resumed"] is False and token

        async def produce() -> None:
            for i in range(TOTAL):
                await manager.send(sid, {"type": "dm", "from": "server", "text": str(i)})
                if i % 10 == 0:
                    await asyncio.sleep(0)  # let the server's writes interleave with the sends

        producer = asyncio.create_task(produce())
        seen: list[tuple[int, str]] = []
        while len(seen) < drop_after:
            message = await recv_json(ws)
            seen.append((message["seq"], message["text"]))
        reset_connection(ws)  # TCP reset: no close frame
        last = seen[-1][0]
        ws, again = await open_ws(server.ws, f"name=alice&resume={token}&last={last}")
        assert again["resumed"] is True and again["id"] == sid
        assert again["resume"] != token
        assert again["replay"] >= 0  # those already sent when the welcome was built
        synced = 0
        while len(seen) - synced < TOTAL:
            message = await recv_json(ws)
            if message["type"] == "presence_sync":  # after a resume, numbered too
                synced += 1
                seen.append((message["seq"], ""))
                continue
            seen.append((message["seq"], message["text"]))
        await producer
        assert synced == 1
        assert [s for s, _ in seen] == list(range(1, TOTAL + 2))  # no gap, no duplicate
        assert [t for _, t in seen if t] == [str(i) for i in range(TOTAL)]
        async with httpx.AsyncClient(base_url=server.http) as http:
            stats = (await http.get("/api/stats")).json()
            assert stats["resumed_total"] == 1 and stats["connected_total"] == 1
            listed = (await http.get("/api/sessions")).json()["sessions"]
            assert [(s["id"], s["state"]) for s in listed] == [(sid, "open")]
        await ws.close()


async def test_detached_state_and_the_stats_identity_in_the_http_api() -> None:
    app = create_app(environ={"WSESSION_PRESENCE_INTERVAL": "60"})
    manager = app.state.sessions
    ended, gone = asyncio.Event(), asyncio.Event()
    manager.on_detach(lambda s: gone.set())
    manager.on_disconnect(lambda s: ended.set())
    async with run_server(app) as server, httpx.AsyncClient(base_url=server.http) as http:
        stay, _ = await open_ws(server.ws, "name=stay")
        drop, hello = await open_ws(server.ws, "name=drop")
        clean, _ = await open_ws(server.ws, "name=clean")
        await clean.close()
        reset_connection(drop)
        async with asyncio.timeout(10):
            await gone.wait()  # the dropped one detached
            await ended.wait()  # the clean one ended
        assert hello["id"] in manager.detached and len(manager.local) == 1
        states = {s["id"]: s["state"] for s in (await http.get("/api/sessions")).json()["sessions"]}
        assert states[hello["id"]] == "detached"
        assert sorted(states.values()) == ["detached", "open"]
        stats = (await http.get("/api/stats")).json()
        assert (stats["live"], stats["detached"]) == (1, 1)
        assert stats["connected_total"] == (
            stats["disconnected_total"] + stats["live"] + stats["detached"]
        )
        # Off: WSESSION_RESUME_WINDOW=0 gives no token, and a drop ends the session.
        await stay.close()


async def test_resumption_can_be_turned_off_in_the_example() -> None:
    app = create_app(environ={"WSESSION_RESUME_WINDOW": "0"})
    async with run_server(app) as server:
        ws, hello = await open_ws(server.ws, "name=bob")
        assert hello["resume"] is None and hello["resumed"] is False
        await ws.send(json.dumps({"type": "echo", "text": "x"}))
        echo = await recv_json(ws)
        assert echo == {"type": "echo", "text": "x"}  # no "seq" without resumption
        await ws.close()
