"""Command validation and the default handler, without a broker (runs everywhere)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from agent.control.commands import Curtail, Refresh, Release, SetMode
from agent.outputs.mqtt import Rejected, parse_command
from tests.sample_state import NOW

TOKENS = {"alice": "alice-token-1", "bob": "bob-token-2"}


def cmd(name: str, **fields: Any) -> bytes:
    return json.dumps(
        {"id": "x1", "operator": "alice", "token": "alice-token-1", **fields}
    ).encode()


def test_valid_commands_become_typed_commands() -> None:
    until = (NOW + timedelta(hours=2)).isoformat()
    c = parse_command("curtail", cmd("curtail", target_kw=120.5, until=until), TOKENS, NOW)
    assert c == Curtail("x1", "alice", 120.5, NOW + timedelta(hours=2))
    assert parse_command("release", cmd("release"), TOKENS, NOW) == Release("x1", "alice")
    assert parse_command("refresh", cmd("refresh"), TOKENS, NOW) == Refresh("x1", "alice")
    c = parse_command("set_mode", cmd("set_mode", mode="manual"), TOKENS, NOW)
    assert c == SetMode("x1", "alice", "manual")


@pytest.mark.parametrize(
    ("name", "payload", "code"),
    [
        ("release", b"\xff\xfe", "not_utf8"),
        ("release", b"42", "malformed"),
        ("release", b'{"id": "x1", "operator": "alice", "token": "bob-token-2"}', "unauthorized"),
        ("release", b'{"id": "x1", "operator": "alice", "token": 5}', "unauthorized"),
        ("release", b'{"id": "x1", "token": "alice-token-1"}', "unauthorized"),
        ("shutdown", cmd("shutdown"), "unknown_command"),
        ("release", cmd("release", id="has space"), "invalid"),
        ("release", cmd("release", id=""), "invalid"),
        ("curtail", cmd("curtail", target_kw="NaN", until="2099-01-01T00:00:00Z"), "invalid"),
        ("curtail", cmd("curtail", target_kw=10), "invalid"),
        ("set_mode", cmd("set_mode", mode="auto", extra=1), "invalid"),
        ("curtail", cmd("curtail", target_kw=10, until=NOW.isoformat()), "expired"),
    ],
)
def test_bad_commands_raise_rejected_with_a_code(name: str, payload: bytes, code: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_command(name, payload, TOKENS, NOW)
    assert info.value.code == code
    assert info.value.reason
    assert "alice-token-1" not in info.value.reason
