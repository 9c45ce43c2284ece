"""The parts of ``bench.example_churn`` that read the example's messages without decoding them
whole: they must keep up with the example's real wire format (``python -m bench.example_churn``
itself runs the harness end to end)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from bench.example_churn import _kind, _welcome_id, main
from example_app.app import create_app

pytestmark = pytest.mark.timeout(10)


def test_the_welcome_id_and_message_kinds_are_read_from_the_example_s_own_messages() -> None:
    env = {"WSESSION_PRESENCE_INTERVAL": "0.05"}
    client = TestClient(create_app(environ=env))
    with client, client.websocket_connect("/ws?name=alice") as first:
        first.receive_text()  # the welcome
        assert _kind(first.receive_text()) == "presence_diff/lobby"  # her own arrival
        with client.websocket_connect("/ws?name=bob") as ws:
            welcome = ws.receive_text()
            assert _welcome_id(welcome) == json.loads(welcome)["id"]
            assert _kind(welcome) == "welcome"  # others online: the list follows the head
            assert json.loads(welcome)["online"]
            ws.send_text(json.dumps({"type": "join", "group": "room1"}))
            kinds = [_kind(ws.receive_text()) for _ in range(4)]  # bounded
    # joined, the room's base, and one interval later bob's own arrival in the lobby and the
    # room (the lobby's diff may come before the join is handled)
    assert sorted(kinds) == [
        "joined",
        "presence_diff/lobby",
        "presence_diff/room",
        "presence_diff/room",
    ]


def test_a_message_that_is_not_a_welcome_is_refused() -> None:
    with pytest.raises(ValueError, match="not a welcome"):
        _welcome_id('{"type":"dm","id":"x","name":"n","text":"t"}')


@pytest.mark.timeout(60)
def test_connections_replaced_in_one_burst_spread_over_the_ten_rooms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Each arrival picks its room from its own number: reading the shared counter after the
    # handshake sent a whole burst of replacements into one room (one room per client process
    # grew by the churn rate every second, and its diffs and bases with it).
    argv = ["--clients=40", "--ramp=0.5", "--seconds=2", "--churn=20", "--talkers=2"]
    assert main([*argv, "--processes=1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["failed"] == 0
    joined = result["rooms_joined"]
    assert sum(joined.values()) == result["connections_made"] == 40 + 2 * 20
    assert sorted(joined) == [f"room{i}" for i in range(10)]
    assert max(joined.values()) - min(joined.values()) <= 1  # 8 each
