"""The light node simulator and the agent agree on the wire: each decodes what the other writes.

The simulator implements the protocol from the README, not from ``agent/``; these tests hold the
two implementations to one another in both directions, including the refusals.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from agent.control.node_protocol import (
    AckResult,
    NodeCommand,
    decode_ack,
    decode_views,
    encode_command,
    grant_for,
)
from simulators.nodes import gpu_host, miner_partition

EPOCH = 1_700_000_000_000


def command(seq: int, envelope_w: float, *, epoch: int = EPOCH, age_s: float = 0) -> bytes:
    at = datetime.now(UTC) - timedelta(seconds=age_s)
    return encode_command(
        NodeCommand(epoch, seq, at, at + timedelta(seconds=30), envelope_w, 400.0)
    )


def test_the_agent_decodes_the_simulators_views_as_a_rising_merit_ladder() -> None:
    node = miner_partition("part-001", 500)
    views = decode_views(node.views(), "part-001")
    assert views.devices == 500
    assert views.floor_w == 500 * 30.0
    assert views.max_w == views.points[-1].power_w
    per_w = [
        (b.value_usd_per_h - a.value_usd_per_h) / (b.power_w - a.power_w)
        for a, b in zip(views.points, views.points[1:], strict=False)
    ]
    assert per_w == sorted(per_w, reverse=True)  # best value per watt first
    assert decode_views(gpu_host("gpu-001").views(), "gpu-001").kind.value == "gpu"


def test_the_simulator_applies_the_agents_command_and_the_agent_reads_its_ack() -> None:
    node = miner_partition("part-001", 500)
    views = decode_views(node.views(), "part-001")
    envelope = views.points[3].power_w
    ack = decode_ack(node.command(command(1, envelope)) or b"", "part-001")
    assert (ack.seq, ack.result) == (1, AckResult.APPLIED)
    assert node.target_w() == grant_for(views, envelope)[0]
    again = node.command(command(1, envelope))
    assert again is not None
    assert decode_ack(again, "part-001") == ack  # the same ack, applied once
    assert node.applied == [(EPOCH, 1)]


def test_the_simulator_refuses_what_the_agents_node_refuses() -> None:
    node = gpu_host("gpu-001")
    node.command(command(5, 3000))
    cases = [
        command(4, 100),  # a replay
        command(9, 100, epoch=EPOCH - 1),  # an older controller
        command(6, 100, age_s=60),  # stale
        json.dumps({**json.loads(command(7, 100)), "v": 2}).encode(),  # another version
    ]
    results = [decode_ack(node.command(c) or b"", "gpu-001") for c in cases]
    assert [r.result for r in results] == [AckResult.REFUSED] * 4
    assert "v2" in results[3].reason
    assert node.applied == [(EPOCH, 5)]
