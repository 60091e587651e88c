"""The MQTT bridge against a real Mosquitto: publishing, commands and acks, broker outages.

The operator side of every test is a second real MQTT client (our own transport,
``drivers.bus.mqtt``) logged in as user ``operator``; the agent logs in as ``agent``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.control.commands import Command, CommandResult, Curtail, Refresh, Release, SetMode
from agent.control.config import MqttConfig
from agent.outputs.mqtt import MqttBridge
from agent.runtime.state import AgentState
from drivers.bus.base import BusError, BusMessage, BusSettings
from drivers.bus.mqtt import MqttBus
from tests.sample_state import NOW, sample_state
from tests.servers import Mosquitto

pytestmark = pytest.mark.mqtt

TOKEN = "op-token-123"
PREFIX = "site-agent/west-1"
ROOT = Path(__file__).resolve().parent.parent


def mqtt_config(broker: Mosquitto, **extra: Any) -> MqttConfig:
    data: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "username": "agent",
        "password": "agent-secret",
        "command_tokens": {"operator": TOKEN},
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
        "command_timeout_s": 2.0,
    }
    data.update(extra)
    return MqttConfig.model_validate(data)


@dataclass
class Runtime:
    """Records what the bridge hands the runtime and answers ``refuse`` or ok; decides nothing.

    These tests are about the wire (parsing, acks, retained topics, reconnects). What the real
    runtime does with a command (modes, limits, dedupe in the journal) is tested through the
    real Agent in tests/test_mqtt_agent.py and tests/test_integrity.py.
    """

    state: AgentState
    received: list[Command] = field(default_factory=list)
    refuse: str | None = None

    async def handle(self, command: Command) -> CommandResult:
        self.received.append(command)
        if self.refuse is not None:
            return CommandResult.refuse(self.refuse)
        return CommandResult.ok()

    def count_rejected(self, source: str, reason: str) -> None:
        self.state.rejected[(source, reason)] += 1


class Operator:
    """A real MQTT client that watches ``P/#`` and sends commands."""

    def __init__(self, broker: Mosquitto, user: str = "operator", password: str = "") -> None:
        self.bus = MqttBus(
            BusSettings(
                broker.host,
                broker.port,
                client_id=f"test-{user}-{time.monotonic_ns()}",
                username=user,
                password=password or broker.users[user],
            )
        )
        self.inbox: list[BusMessage] = []
        self.arrived = asyncio.Event()

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[Operator]:
        async with self.bus.session() as session:
            self.session = session
            await session.subscribe(f"{PREFIX}/#", qos=1)
            task = asyncio.create_task(self._pump())
            try:
                yield self
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _pump(self) -> None:
        async for m in self.session.messages():
            self.inbox.append(m)
            self.arrived.set()

    async def next(self, suffix: str, timeout_s: float = 15.0, **match: Any) -> Any:
        """Take the oldest JSON (or text) payload on ``P/suffix`` whose fields contain ``match``.

        Messages on other topics stay in the inbox for later calls.
        """
        topic = f"{PREFIX}/{suffix}"
        async with asyncio.timeout(timeout_s):
            while True:
                for i, m in enumerate(self.inbox):
                    if m.topic != topic:
                        continue
                    try:
                        value = json.loads(m.payload)
                    except ValueError:
                        value = m.payload.decode()
                    if all(isinstance(value, dict) and value.get(k) == v for k, v in match.items()):
                        del self.inbox[i]
                        return value
                self.arrived.clear()
                await self.arrived.wait()

    async def send(self, name: str, payload: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        await self.session.publish(f"{PREFIX}/command/{name}", data, qos=1)

    async def command(self, name: str, cid: str, **fields: Any) -> dict[str, Any]:
        body = {"id": cid, "operator": "operator", "token": TOKEN, **fields}
        await self.send(name, body)
        ack: dict[str, Any] = await self.next("ack", id=cid)
        return ack


@asynccontextmanager
async def running(bridge: MqttBridge) -> AsyncIterator[MqttBridge]:
    task = asyncio.create_task(bridge.run())
    try:
        async with asyncio.timeout(5):
            await bridge.connected.wait()
        yield bridge
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    # Polling is right here: the conditions are plain attributes of the object under test.
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def make_bridge(broker: Mosquitto, **extra: Any) -> tuple[MqttBridge, Runtime]:
    state = sample_state()
    runtime = Runtime(state)
    bridge = MqttBridge(
        mqtt_config(broker, **extra),
        state,
        runtime.handle,
        count_rejected=runtime.count_rejected,
        interconnect_limit_w=500_000.0,
        clock=lambda: NOW,
    )
    return bridge, runtime


async def test_state_plan_events_and_telemetry_arrive(mosquitto: Mosquitto) -> None:
    bridge, _ = make_bridge(mosquitto)
    async with Operator(mosquitto).connected() as op, running(bridge):
        assert await op.next("status") == "online"
        bridge.publish_cycle()
        state = await op.next("state")
        assert state["site_id"] == "west-1"
        assert state["site_power_w"] == 18_898.0
        assert state["limit_w"] == 14_000.0
        assert state["interconnect_limit_w"] == 500_000.0
        assert state["price_usd_per_mwh"] == 812.5
        assert state["miners"] == {"running": 2, "sleeping": 1, "faulted": 1}
        assert state["faults"] == {"m-004": "ignored sleep command"}
        events = await op.next("events")
        assert events["events"][0]["event_id"] == "ev-1"
        assert events["events"][0]["target_w"] == 14_000.0
        assert events["events"][0]["shortfall_w"] == 4_898.0
        plan = await op.next("plan")
        assert plan["actions"][0]["reason"] == "price 812.5 above breakeven 131"
        assert plan["binding"] == ["event:ev-1"]
        miner = await op.next("telemetry/miner/m-001")
        assert miner["power_w"] == 3510.0
        assert miner["state"] == "running"
        node = await op.next("telemetry/gpu_node/g-01")
        assert node["power_w"] == 4800.0
        assert {j["class"] for j in node["jobs"]} == {"sla", "filler"}

    # State is retained: a client that connects later still gets it, and the clean shutdown
    # above left "offline" as the status.
    async with Operator(mosquitto).connected() as late:
        assert await late.next("status") == "offline"
        assert (await late.next("state"))["site_id"] == "west-1"


async def test_commands_are_handed_over_and_acked(mosquitto: Mosquitto) -> None:
    bridge, runtime = make_bridge(mosquitto)
    async with Operator(mosquitto).connected() as op, running(bridge):
        ack = await op.command("set_mode", "c1", mode="manual")
        assert ack == {
            "id": "c1",
            "command": "set_mode",
            "status": "accepted",
            "reason": "",
            "at": "2023-09-06T20:00:00Z",
        }
        assert runtime.received == [SetMode("c1", "operator", "manual")]

        until = (NOW + timedelta(hours=1)).isoformat()
        ack = await op.command("curtail", "c2", target_kw=250.5, until=until)
        assert ack["status"] == "accepted"
        assert runtime.received[-1] == Curtail("c2", "operator", 250.5, NOW + timedelta(hours=1))

        # The runtime's refusal reaches the operator with its reason, and is counted.
        runtime.refuse = "target above the interconnect limit (500 kW)"
        ack = await op.command("curtail", "c3", target_kw=900, until=until)
        assert ack["status"] == "rejected"
        assert ack["reason"] == "target above the interconnect limit (500 kW)"
        runtime.refuse = None

        assert (await op.command("release", "c4"))["status"] == "accepted"
        assert runtime.received[-1] == Release("c4", "operator")

        ack = await op.command("refresh", "c5")
        assert ack["status"] == "accepted"
        assert isinstance(runtime.received[-1], Refresh)
        assert (await op.next("state"))["site_id"] == "west-1"  # refresh republished the state

        # A redelivered (same id) command is answered again but not handed over twice.
        n = len(runtime.received)
        ack = await op.command("set_mode", "c1", mode="manual")
        assert ack["status"] == "accepted"
        assert len(runtime.received) == n
        # The same id from another operator is never answered with the first one's result.
        bridge._tokens["bob"] = "bob-token"
        body = {"id": "c1", "operator": "bob", "token": "bob-token", "mode": "auto"}
        await op.send("set_mode", body)
        ack = await op.next("ack", id="c1")
        assert ack["status"] == "rejected"
        assert "another operator" in ack["reason"]
        assert len(runtime.received) == n
    assert runtime.state.rejected[("mqtt", "refused")] == 1
    assert runtime.state.rejected[("mqtt", "duplicate_id")] == 1


BAD_COMMANDS: list[tuple[str, str, bytes | dict[str, Any], str, str]] = [
    # (command topic, expected metric code, payload, expected ack id, text in the reason)
    ("set_mode", "malformed", b"{not json", "", "not JSON"),
    ("set_mode", "malformed", b'["a list"]', "", "JSON object"),
    ("set_mode", "too_large", b'{"id": "big", "pad": "' + b"x" * 20_000 + b'"}', "", "larger"),
    ("set_mode", "unauthorized", {"id": "b3", "mode": "manual"}, "b3", "token"),
    (
        "set_mode",
        "unauthorized",
        {"id": "b4", "operator": "operator", "token": "wrong", "mode": "manual"},
        "b4",
        "not authorised",
    ),
    (
        "set_mode",
        "unauthorized",
        {"id": "b5", "operator": "mallory", "token": TOKEN, "mode": "manual"},
        "b5",
        "not authorised",
    ),
    (
        "reboot",
        "unknown_command",
        {"id": "b6", "operator": "operator", "token": TOKEN},
        "b6",
        "unknown command",
    ),
    (
        "set_mode",
        "invalid",
        {"id": "b7", "operator": "operator", "token": TOKEN, "mode": "turbo"},
        "b7",
        "mode",
    ),
    (
        "set_mode",
        "invalid",
        {"id": "b8", "operator": "operator", "token": TOKEN, "mode": "manual", "force": True},
        "b8",
        "force",
    ),
    (
        "curtail",
        "invalid",
        {
            "id": "b9",
            "operator": "operator",
            "token": TOKEN,
            "target_kw": -5,
            "until": "2099-01-01T00:00:00Z",
        },
        "b9",
        "target_kw",
    ),
    (
        "curtail",
        "invalid",
        {
            "id": "b10",
            "operator": "operator",
            "token": TOKEN,
            "target_kw": 5,
            "until": "2099-01-01T00:00:00",
        },
        "b10",
        "time zone",
    ),
    (
        "curtail",
        "expired",
        {
            "id": "b11",
            "operator": "operator",
            "token": TOKEN,
            "target_kw": 5,
            "until": "2020-01-01T00:00:00Z",
        },
        "b11",
        "not in the future",
    ),
]


async def test_bad_commands_are_rejected_with_a_reason_and_change_nothing(
    mosquitto: Mosquitto,
) -> None:
    bridge, runtime = make_bridge(mosquitto)
    rejected_before = runtime.state.rejected.copy()
    async with Operator(mosquitto).connected() as op, running(bridge):
        for name, _, payload, cid, text in BAD_COMMANDS:
            if isinstance(payload, bytes):
                await op.send(name, None, raw=payload)
            else:
                await op.send(name, payload)
            ack = await op.next("ack")
            assert ack["status"] == "rejected", (name, payload)
            assert ack["id"] == (cid or None)
            assert text in ack["reason"], (ack, text)
            assert TOKEN not in json.dumps(ack)  # the secret is never echoed
    assert runtime.received == []
    expected: dict[str, int] = {}
    for _, code, *_ in BAD_COMMANDS:
        expected[code] = expected.get(code, 0) + 1
    for code, count in expected.items():
        key = ("mqtt", code)
        assert runtime.state.rejected[key] - rejected_before[key] == count, code


async def test_broker_acl_keeps_other_users_off_the_command_topics(tmp_path: Path) -> None:
    acl = (ROOT / "configs" / "mosquitto.acl").read_text()  # the shipped ACL
    users = {"agent": "agent-secret", "operator": "operator-secret", "viewer": "viewer-secret"}
    broker = Mosquitto(tmp_path, users=users, acl=acl)
    broker.start()
    try:
        bridge, runtime = make_bridge(broker)
        async with AsyncExitStack() as stack:
            op = await stack.enter_async_context(Operator(broker).connected())
            viewer = await stack.enter_async_context(Operator(broker, "viewer").connected())
            await stack.enter_async_context(running(bridge))
            body = {"id": "v1", "operator": "operator", "token": TOKEN, "mode": "manual"}
            await viewer.send("set_mode", body)  # the broker drops it: viewer may not write
            ack = await op.command("set_mode", "o1", mode="manual")  # operator may
            assert ack["status"] == "accepted"
        assert [c.id for c in runtime.received] == ["o1"]
    finally:
        broker.stop()


async def test_broker_outage_reconnect_republish_and_no_lost_command(
    mosquitto: Mosquitto,
) -> None:
    bridge, runtime = make_bridge(mosquitto, queue_size=50)
    async with running(bridge):
        bridge.publish_cycle()
        async with Operator(mosquitto).connected() as op:
            assert (await op.next("state"))["site_id"] == "west-1"

        mosquitto.stop()
        await wait_until(lambda: not bridge.connected.is_set())

        # Control goes on: publishing while the broker is down neither blocks nor raises, and
        # telemetry is bounded (oldest dropped).
        took_s = []
        for cycle in range(100):
            runtime.state.cycles = 1000 + cycle
            t0 = time.perf_counter()
            bridge.publish_cycle()
            took_s.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
        # A publish that waited on the dead broker would do so every time; the scheduler of a
        # busy machine may pause any one call, so the 90th percentile is what must be short.
        assert sorted(took_s)[89] < 0.05, sorted(took_s)[-10:]
        assert bridge.dropped_telemetry > 0
        assert len(bridge._telemetry) == 50

        mosquitto.start()  # same port, and no persistence: the broker forgot everything
        await wait_until(lambda: bridge.connections >= 2)
        async with Operator(mosquitto).connected() as op:
            # The retained state was republished, with the newest values from the outage.
            assert await op.next("status") == "online"
            state = await op.next("state")
            assert state["cycles"] == 1099
            assert (await op.next("plan"))["binding"] == ["event:ev-1"]
            # A QoS 1 command sent after the reconnect is not lost.
            ack = await op.command("set_mode", "after-outage", mode="manual")
            assert ack["status"] == "accepted"
        assert runtime.received == [SetMode("after-outage", "operator", "manual")]


async def test_agent_starts_while_broker_is_down(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    bridge, _ = make_bridge(mosquitto)
    task = asyncio.create_task(bridge.run())
    try:
        bridge.publish_cycle()  # nothing to publish to; must still return at once
        await asyncio.sleep(0.5)
        assert not bridge.connected.is_set()
        mosquitto.start()
        async with asyncio.timeout(5):
            await bridge.connected.wait()
        async with Operator(mosquitto).connected() as op:
            assert (await op.next("state"))["site_id"] == "west-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


AGENT_SCRIPT = """
import asyncio, sys
from agent.control.config import MqttConfig
from agent.control.commands import CommandResult
from agent.outputs.mqtt import MqttBridge
from agent.runtime.state import AgentState
from datetime import datetime, UTC

async def main():
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), username="agent",
                     password="agent-secret")
    async def handler(cmd):
        return CommandResult.ok()
    state = AgentState("west-1", datetime.now(UTC))
    bridge = MqttBridge(cfg, state, handler, count_rejected=lambda _source, _reason: None)
    task = asyncio.create_task(bridge.run())
    await bridge.connected.wait()
    print("connected", flush=True)
    await task

asyncio.run(main())
"""


async def test_last_will_says_offline_when_the_agent_dies(mosquitto: Mosquitto) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        str(mosquitto.port),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        async with Operator(mosquitto).connected() as op:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.strip() == b"connected"
            assert await op.next("status") == "online"
            proc.send_signal(signal.SIGKILL)  # no clean disconnect: the broker sends the will
            assert await op.next("status") == "offline"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_wrong_agent_password_is_a_bus_error(mosquitto: Mosquitto) -> None:
    bus = MqttBus(BusSettings(mosquitto.host, mosquitto.port, "x", "agent", "wrong"))
    with pytest.raises(BusError, match=r"authori|refused|password"):
        async with bus.session():
            pass
