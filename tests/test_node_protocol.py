"""The node protocol's codec and rules: versioning, replay and staleness, idempotent acks,
the envelope a node holds when the controller is silent, and hostile payloads."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.node_protocol import (
    MAX_PAYLOAD_BYTES,
    AckResult,
    CommandLedger,
    LadderPoint,
    LostControllerRule,
    NodeAck,
    NodeCommand,
    NodeKind,
    NodeState,
    NodeViews,
    ProtocolError,
    admit,
    decode_ack,
    decode_command,
    decode_views,
    encode_ack,
    encode_command,
    encode_views,
    envelope_when_silent,
    grant_for,
    worst_case_w,
)

T0 = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def cmd(seq: int, *, epoch: int = 1000, at: datetime = T0, valid_s: float = 60, **kw: object):
    return NodeCommand(
        epoch=epoch,
        seq=seq,
        issued_at=at,
        valid_until=at + timedelta(seconds=valid_s),
        envelope_w=kw.pop("envelope_w", 50_000.0),  # type: ignore[arg-type]
        price_usd_per_mwh=kw.pop("price", 40.0),  # type: ignore[arg-type]
        event=bool(kw.pop("event", False)),
        reason="test",
    )


def views(**kw: object) -> NodeViews:
    base: dict[str, object] = {
        "node_id": "gpu-a",
        "kind": NodeKind.GPU,
        "seq": 7,
        "at": T0,
        "floor_w": 1_000.0,
        "max_w": 90_000.0,
        "measured_w": 60_000.0,
        "envelope_w": 80_000.0,
        "points": (LadderPoint(20_000, 40.0), LadderPoint(60_000, 100.0)),
        "devices": 8,
        "faults": ("gpu-a/3: off the bus",),
        "applied_epoch": 1000,
        "applied_seq": 3,
    }
    base.update(kw)
    return NodeViews(**base)  # type: ignore[arg-type]


def test_round_trips() -> None:
    v = views()
    assert decode_views(encode_views(v), "gpu-a") == v
    c = cmd(5, event=True)
    assert decode_command(encode_command(c)) == c
    a = NodeAck("gpu-a", 1000, 5, AckResult.APPLIED, "", T0, 50_000.0)
    assert decode_ack(encode_ack(a), "gpu-a") == a


def test_another_version_is_refused_naming_both() -> None:
    doc = json.loads(encode_command(cmd(1)))
    doc["v"] = 2
    with pytest.raises(ProtocolError, match="protocol v2 from controller, this peer speaks v1"):
        decode_command(json.dumps(doc).encode())


def test_views_on_another_nodes_topic_are_refused() -> None:
    with pytest.raises(ProtocolError, match="views from 'gpu-a' on the topic of 'gpu-b'"):
        decode_views(encode_views(views()), "gpu-b")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("envelope_w", -1, "expected 0 to"),
        ("envelope_w", True, "expected a number"),
        ("envelope_w", 1e300, "expected 0 to"),
        ("seq", 1.5, "expected an integer"),
        ("seq", 0, "outside"),
        ("valid_until", "2026-07-01T14:00:01+00:00", "validity window"),
        ("issued_at", "2026-07-01T12:00:00", "without a zone"),
        ("event", "yes", "true or false"),
        ("reason", "x" * 500, "at most 200"),
    ],
)
def test_bad_command_fields_are_refused(field: str, value: object, match: str) -> None:
    doc = json.loads(encode_command(cmd(1)))
    doc[field] = value
    with pytest.raises(ProtocolError, match=match):
        decode_command(json.dumps(doc).encode())


def test_oversized_deep_and_non_utf8_payloads_are_refused() -> None:
    with pytest.raises(ProtocolError, match="cmd is larger than the 65,536-byte limit"):
        decode_command(b'{"v":1,"pad":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}')
    with pytest.raises(ProtocolError, match="deeper"):
        decode_command(b'{"v":1,"a":' + b"[" * 50 + b"]" * 50 + b"}")
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_command(b'{"v":1,"type":"cmd","reason":"\xff"}')
    with pytest.raises(ProtocolError, match=r"NaN|finite"):
        decode_command(b'{"v":1,"type":"cmd","envelope_w":NaN}')


def test_ladder_must_not_fall_and_is_bounded() -> None:
    doc = json.loads(encode_views(views()))
    doc["points"] = [[60_000, 1.0], [20_000, 2.0]]
    with pytest.raises(ProtocolError, match="must not fall"):
        decode_views(json.dumps(doc).encode(), "gpu-a")
    doc["points"] = [[i, 0.0] for i in range(65)]
    with pytest.raises(ProtocolError, match="at most 64"):
        decode_views(json.dumps(doc).encode(), "gpu-a")


DECODERS = {
    "cmd": decode_command,
    "views": lambda b: decode_views(b, "gpu-a"),
    "ack": lambda b: decode_ack(b, "n"),
}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from(sorted(DECODERS)))
def test_random_bytes_never_escape_as_anything_but_protocol_errors(data: bytes, kind: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        DECODERS[kind](data)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("node-protocol: ")
    assert not text.startswith("node-protocol: node-protocol")


def test_admit_applies_new_refuses_replay_and_stale_and_answers_duplicates() -> None:
    ledger = CommandLedger()
    first = cmd(1)
    assert admit(first, ledger, T0, "n").apply
    ack = NodeAck("n", first.epoch, first.seq, AckResult.APPLIED, "", T0, first.envelope_w)
    ledger.epoch, ledger.seq = first.epoch, first.seq
    ledger.remember(ack)
    again = admit(first, ledger, T0 + timedelta(seconds=1), "n")
    assert not again.apply
    assert again.ack == ack
    ledger.acks.clear()  # as after a restart: only (epoch, seq) is journaled
    replay = admit(first, ledger, T0, "n")
    assert not replay.apply
    assert replay.refusal is not None
    assert "replay" in replay.refusal
    stale = admit(cmd(2, valid_s=10), ledger, T0 + timedelta(seconds=11), "n")
    assert not stale.apply
    assert stale.refusal is not None
    assert stale.refusal.startswith("stale")
    old_epoch = admit(cmd(9, epoch=999), ledger, T0, "n")
    assert not old_epoch.apply
    assert "older" in (old_epoch.refusal or "")
    new_controller = admit(cmd(1, epoch=2000), ledger, T0, "n")
    assert new_controller.apply  # a restarted controller starts a new epoch at seq 1


RULE_SHED = LostControllerRule(fail_after_s=120, fail_direction="shed")
RULE_HOLD = LostControllerRule(fail_after_s=120, fail_direction="hold")


def test_silent_controller_holds_then_fails_in_its_direction() -> None:
    last = cmd(3, envelope_w=40_000.0)
    held, state = envelope_when_silent(last, T0, T0 + timedelta(seconds=90), RULE_SHED, 1_000)
    assert (held, state) == (40_000.0, NodeState.HOLDING)  # past valid_until, before fail time
    failed, state = envelope_when_silent(last, T0, T0 + timedelta(seconds=121), RULE_SHED, 1_000)
    assert (failed, state) == (1_000.0, NodeState.FAILSAFE)
    kept, state = envelope_when_silent(last, T0, T0 + timedelta(seconds=121), RULE_HOLD, 1_000)
    assert (kept, state) == (40_000.0, NodeState.FAILSAFE)


def test_inside_an_event_a_silent_node_stays_shed_even_if_its_rule_is_hold() -> None:
    event = cmd(4, envelope_w=2_000.0, event=True)
    for rule in (RULE_SHED, RULE_HOLD):
        for after_s in (5, 90, 3600):
            env, _ = envelope_when_silent(event, T0, T0 + timedelta(seconds=after_s), rule, 1_000)
            assert env is not None
            assert env <= 2_000.0


@settings(max_examples=300, deadline=None)
@given(
    envelope=st.floats(0, 1e7),
    floor=st.floats(0, 1e6),
    silent_s=st.floats(0, 1e5),
    direction=st.sampled_from(["shed", "hold"]),
    event=st.booleans(),
)
def test_a_silent_node_never_goes_above_its_last_grant(
    envelope: float, floor: float, silent_s: float, direction: str, event: bool
) -> None:
    last = cmd(1, envelope_w=envelope, event=event)
    rule = LostControllerRule(fail_after_s=60, fail_direction=direction)
    env, _ = envelope_when_silent(last, T0, T0 + timedelta(seconds=silent_s), rule, floor)
    assert env is not None
    assert env <= envelope


def test_controller_counts_a_silent_node_at_its_last_worst_case() -> None:
    assert worst_case_w(views(max_w=90_000.0, measured_w=60_000.0), 120_000.0) == 90_000.0
    assert worst_case_w(None, 120_000.0) == 120_000.0  # never heard: configured nameplate


def test_grant_buys_the_last_ladder_point_under_the_envelope() -> None:
    v = views()
    assert grant_for(v, 70_000) == (60_000, 100.0)
    assert grant_for(v, 30_000) == (20_000, 40.0)
    assert grant_for(v, 500) == (1_000.0, 0.0)
