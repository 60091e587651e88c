"""The node side of the protocol without a broker: admission, journal, acks, silence rules.

The :class:`~agent.runtime.node.NodeLink` is driven through its message handlers with real
encoded payloads (the same bytes Mosquitto would deliver) and a controlled clock; what it
publishes is read back from its outbox and decoded with the protocol's own parsers.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.control.config import load_config, parse_config
from agent.control.domain import Plan
from agent.control.node_protocol import (
    AckResult,
    ControllerBeat,
    NodeAck,
    NodeCommand,
    decode_ack,
    encode_beat,
    encode_command,
    topics,
)
from agent.runtime.node import ENVELOPE_EVENT, NodeLink, load_journal
from drivers.bus.base import Bus

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
EPOCH = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class NoBus:
    """The link is driven through its handlers here; it never opens a session."""

    def session(self) -> Any:
        raise AssertionError("no session in these tests")


def config(tmp: Path, direction: str = "shed") -> Any:
    return parse_config(
        {
            "site": {"id": "s", "interconnect_limit_kw": 100},
            "prices": {"realtime": {"type": "constant", "value": 0}},
            "node": {
                "id": "n1",
                "fail_after_s": 60,
                "fail_direction": direction,
                "journal_path": str(tmp / "node.json"),
            },
        }
    )


def link(tmp: Path, clock: Clock, direction: str = "shed") -> NodeLink:
    bus: Bus = NoBus()  # type: ignore[assignment]
    node = NodeLink(config(tmp, direction), bus, clock=clock)
    node.floor_w = 500.0
    return node


def cmd(
    seq: int, envelope_w: float, at: datetime, *, event: bool = False, epoch: int = EPOCH
) -> bytes:
    return encode_command(
        NodeCommand(epoch, seq, at, at + timedelta(seconds=30), envelope_w, 100.0, event)
    )


def plan(limit_w: float, at: datetime) -> Plan:
    return Plan(
        at=at,
        limit_w=limit_w,
        planned_power_w=limit_w,
        effective_price_usd_per_mwh=1,
        value_usd_per_h=0,
        cost_usd_per_h=0,
    )


def acks(node: NodeLink) -> list[NodeAck]:
    out = []
    while not node.outbox.empty():
        topic, payload, _ = node.outbox.get_nowait()
        if topic == topics("s", "n1")["ack"]:
            out.append(decode_ack(payload, "n1"))
    return out


def cap_kw(node: NodeLink) -> float:
    (event,) = node.events()
    assert event.event_id == ENVELOPE_EVENT
    assert event.max_site_kw is not None
    return event.max_site_kw


def test_a_command_is_applied_acked_once_and_its_duplicate_gets_the_same_ack(
    tmp_path: Path,
) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    node.handle_command(cmd(1, 2000, T0))
    assert cap_kw(node) == 2.0
    node.handle_command(cmd(1, 2000, T0))  # QoS 1 redelivery before the ack: nothing new
    assert acks(node) == []
    node.observe_plan(plan(2000, T0))
    (first,) = acks(node)
    assert (first.seq, first.result) == (1, AckResult.APPLIED)
    node.handle_command(cmd(1, 2000, T0))  # redelivered after a broker restart
    (again,) = acks(node)
    assert again == first  # the same ack, and not applied a second time
    assert node.ledger.seq == 1


def test_replays_stale_and_old_epochs_are_refused_and_change_nothing(tmp_path: Path) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    node.handle_command(cmd(5, 2000, T0))
    node.observe_plan(plan(2000, T0))
    acks(node)
    node.handle_command(cmd(4, 9000, T0))  # a replay of an older grant
    node.handle_command(cmd(9, 9000, T0, epoch=EPOCH - 1))  # a previous controller's
    clock.now = T0 + timedelta(seconds=45)
    node.handle_command(cmd(6, 9000, T0))  # arrives after its validity window
    refused = acks(node)
    assert [a.result for a in refused] == [AckResult.REFUSED] * 3
    assert "replay" in refused[0].reason
    assert "epoch" in refused[1].reason
    assert "stale" in refused[2].reason
    assert cap_kw(node) == 2.0  # still the applied envelope


def test_a_restarted_node_comes_back_to_its_journaled_envelope_and_refuses_replays(
    tmp_path: Path,
) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    node.handle_command(cmd(3, 1500, T0, event=True))
    journaled = load_journal(tmp_path / "node.json")
    assert journaled is not None
    assert journaled[0].seq == 3
    # kill -9: a new process with the same journal, a few seconds later.
    clock.now = T0 + timedelta(seconds=5)
    again = link(tmp_path, clock)
    assert cap_kw(again) == 1.5  # no early restore to full power
    again.handle_command(cmd(3, 9000, T0))
    again.handle_command(cmd(2, 9000, T0))
    assert [a.result for a in acks(again)] == [AckResult.REFUSED, AckResult.REFUSED]
    assert cap_kw(again) == 1.5


def test_a_node_that_loses_its_controller_holds_then_sheds_after_its_fail_time(
    tmp_path: Path,
) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    node.handle_command(cmd(1, 3000, T0))
    clock.now = T0 + timedelta(seconds=40)  # past validity, within fail_after_s
    assert cap_kw(node) == 3.0  # holds the last envelope, never above it
    clock.now = T0 + timedelta(seconds=61)
    assert cap_kw(node) == 0.5  # fail direction shed: down to its floor
    # The controller's beat brings it back to its grant.
    node.handle_beat(encode_beat(ControllerBeat(EPOCH, clock.now)))
    assert cap_kw(node) == 3.0


def test_a_fresh_node_runs_unlimited_until_its_fail_time_counted_from_its_start(
    tmp_path: Path,
) -> None:
    clock = Clock()
    node = link(tmp_path, clock)  # never heard a controller, nothing journaled
    clock.now = T0 + timedelta(seconds=59)
    assert cap_kw(node) == 100.0  # its own interconnect: no envelope yet, not its floor
    assert node.state.value == "holding"
    clock.now = T0 + timedelta(seconds=61)
    assert cap_kw(node) == 0.5  # then its fail direction
    assert node.state.value == "failsafe"


def test_inside_an_event_a_node_stays_shed_whatever_its_fail_direction(tmp_path: Path) -> None:
    clock = Clock()
    node = link(tmp_path, clock, direction="hold")
    node.handle_command(cmd(1, 800, T0, event=True))
    clock.now = T0 + timedelta(hours=2)
    assert cap_kw(node) == 0.8


def test_hostile_commands_are_refused_with_one_line_and_change_nothing(tmp_path: Path) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    for payload in (b"{", b"[]" * 40_000, b'{"v": 2, "type": "cmd"}', b'{"v":1,"type":"cmd"}'):
        node.handle_command(payload)
    assert node.refused == 4
    assert node.last is None
    assert acks(node) == []


def test_the_example_node_config_loads_with_its_node_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "node-mqtt-password").write_text("node-pass\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "example-node.yaml")
    assert cfg.node is not None
    assert cfg.node.id == cfg.node.broker.username == "gpu-07"
    assert cfg.node.broker.password is not None
    assert cfg.node.broker.password.get_secret_value() == "node-pass"
    assert cfg.gpu_nodes[0].driver == "nvml"


def test_a_command_is_acked_after_the_first_cycle_that_planned_under_it(tmp_path: Path) -> None:
    clock = Clock()
    node = link(tmp_path, clock)
    clock.now = T0 + timedelta(seconds=1)
    node.handle_command(cmd(1, 2000, T0))
    node.observe_plan(plan(2000, T0))  # a cycle whose snapshot predates the command
    assert acks(node) == []
    # A stuck device: the next cycle cannot get under the envelope; the ack says so at once,
    # and telemetry (not an ack timeout) shows the shortfall to the controller.
    over = Plan(
        at=clock.now,
        limit_w=2000,
        planned_power_w=3500,
        effective_price_usd_per_mwh=1,
        value_usd_per_h=0,
        cost_usd_per_h=0,
    )
    node.observe_plan(over)
    (ack,) = acks(node)
    assert ack.result is AckResult.APPLIED
    assert "cannot get under" in ack.reason
