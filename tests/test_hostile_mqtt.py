"""Hostile MQTT commands through a real Mosquitto to the real bridge.

Each attack (nested thousands deep, duplicate keys, NaN, invalid UTF-8, oversize, a boolean
target, no token) is answered with a rejected ack naming what was wrong, counted under its
reason, reaches no handler, is audited, and leaves the bridge serving: the next valid command is
accepted. A flood of garbage is audited at a bounded rate (and still counted in full).
"""

from __future__ import annotations

import json

import pytest

from agent.outputs.mqtt import MqttBridge
from tests.sample_state import NOW, sample_state
from tests.servers import Mosquitto
from tests.test_mqtt import TOKEN, Operator, Runtime, mqtt_config, running, wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.hostile]

ATTACKS: list[tuple[bytes, str, str]] = [
    # (payload, metric reason, words in the ack's reason)
    (b"[" * 10_000, "too_deep", "nested deeper than 8 levels"),
    (b"{" * 4 + b"}" * 4, "malformed", "payload is not JSON"),
    (
        b'{"id": "d1", "operator": "operator", "operator": "mallory", "token": "x"}',
        "duplicate_key",
        "duplicate key 'operator'",
    ),
    (b'{"id": "n1", "operator": "operator", "token": NaN}', "not_finite", "token: expected"),
    (b'{"id": "u1", "operator": "\xff"}', "not_utf8", "is not UTF-8"),
    (b'{"pad": "' + b"x" * 20_000 + b'"}', "too_large", "larger than the 16,384-byte limit"),
    (
        json.dumps(
            {
                "id": "b1",
                "operator": "operator",
                "token": TOKEN,
                "target_kw": True,
                "until": "2099-01-01T00:00:00Z",
            }
        ).encode(),
        "invalid",
        "target_kw",
    ),
    (
        json.dumps({"id": "t1", "target_kw": 1, "until": "2099-01-01T00:00:00Z"}).encode(),
        "unauthorized",
        "operator and token are required",
    ),
]


async def test_hostile_commands_are_refused_and_the_bridge_keeps_serving(
    mosquitto: Mosquitto,
) -> None:
    audited: list[tuple[str, str]] = []

    def audit(source: str, action: str, reason: str) -> None:
        assert source == "mqtt"
        audited.append((action, reason))

    runtime = Runtime(sample_state())
    bridge = MqttBridge(
        mqtt_config(mosquitto),
        runtime.state,
        runtime.handle,
        count_rejected=runtime.count_rejected,
        interconnect_limit_w=500_000.0,
        clock=lambda: NOW,
        audit_rejection=audit,
    )
    async with Operator(mosquitto).connected() as op, running(bridge):
        assert await op.next("status") == "online"
        for k, (payload, reason, words) in enumerate(ATTACKS):
            before = runtime.state.rejected[("mqtt", reason)]
            await op.send("curtail", None, raw=payload)
            ack = await op.next("ack", status="rejected")
            assert words in ack["reason"], (k, ack)
            assert "\n" not in ack["reason"]
            assert TOKEN not in ack["reason"]
            assert runtime.state.rejected[("mqtt", reason)] == before + 1, k
            assert runtime.received == []  # nothing reached the runtime
            assert bridge.connected.is_set()
            assert audited[-1][0] == "command:curtail"
            assert audited[-1][1].startswith(f"{reason}: "), audited[-1]
        assert len(audited) == len(ATTACKS)
        # Still serving: a valid command is executed and acknowledged.
        ack = await op.command("curtail", "ok-1", target_kw=100, until="2099-01-01T00:00:00Z")
        assert ack["status"] == "accepted"
        handed = runtime.received[-1]  # handed over to the runtime (which decides, not the test)
        assert handed.id == "ok-1"
        assert getattr(handed, "target_kw", None) == 100


async def test_a_flood_of_garbage_is_audited_at_a_bounded_rate(mosquitto: Mosquitto) -> None:
    audited: list[tuple[str, str]] = []

    def audit(source: str, action: str, reason: str) -> None:
        assert source == "mqtt"
        audited.append((action, reason))

    runtime = Runtime(sample_state())
    bridge = MqttBridge(
        mqtt_config(mosquitto),
        runtime.state,
        runtime.handle,
        count_rejected=runtime.count_rejected,
        clock=lambda: NOW,
        audit_rejection=audit,
    )
    async with Operator(mosquitto).connected() as op, running(bridge):
        for _ in range(200):
            await op.send("curtail", None, raw=b"[" * 100 + b"]" * 100)
        await wait_until(lambda: runtime.state.rejected[("mqtt", "too_deep")] == 200)
    assert 20 <= len(audited) < 40  # the burst, plus about one a second
    assert bridge.unaudited_rejections == 200 - len(audited)
