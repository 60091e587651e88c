"""Command validation and the default handler, without a broker (runs everywhere)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from agent.domain import ActiveEvent
from agent.mqtt import (
    OVERRIDE_EVENT_ID,
    Curtail,
    OperatorCommands,
    Refresh,
    Rejected,
    Release,
    SetMode,
    parse_command,
)
from agent.policy import event_limit_w
from agent.state import AgentState
from drivers.grid.base import ProgramKind
from tests.sample_state import NOW, sample_state

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
        ("release", b"\xff\xfe", "malformed"),
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


@dataclass
class Board:
    events: dict[str, ActiveEvent] = field(default_factory=dict)


@dataclass
class Target:
    """The three things OperatorCommands touches on the real Agent, as plain objects."""

    state: AgentState
    coordinator: Board = field(default_factory=Board)
    wake_control: asyncio.Event = field(default_factory=asyncio.Event)


async def test_operator_commands_drive_the_override_event_and_mode() -> None:
    target = Target(sample_state())
    handle = OperatorCommands(target, clock=lambda: NOW)
    until = NOW + timedelta(hours=1)
    result = await handle(Curtail("c1", "alice", 12.0, until))
    assert result.accepted
    active = target.coordinator.events[OVERRIDE_EVENT_ID]
    assert active.event.kind is ProgramKind.OVERRIDE
    assert active.event.end == until
    assert active.event.program == "operator:alice"
    assert event_limit_w(active) == 12_000.0
    assert active.baseline_w == 18_898.0
    assert target.state.mode == "curtail"
    assert target.wake_control.is_set()

    target.wake_control.clear()
    assert (await handle(Release("c2", "bob"))).accepted
    assert OVERRIDE_EVENT_ID not in target.coordinator.events
    assert target.state.mode == "auto"
    assert target.wake_control.is_set()
    refused = await handle(Release("c3", "bob"))
    assert not refused.accepted
    assert "no operator curtailment" in refused.reason

    assert (await handle(SetMode("c4", "bob", "manual"))).accepted
    assert target.state.mode == "manual"
    # A curtailment in manual mode keeps the operator's mode.
    assert (await handle(Curtail("c5", "alice", 5.0, until))).accepted
    assert target.state.mode == "manual"
    target.wake_control.clear()
    assert (await handle(Refresh("c6", "alice"))).accepted
    assert target.wake_control.is_set()
