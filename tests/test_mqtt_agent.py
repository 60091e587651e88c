"""The MQTT bridge on the running agent: control goes on while the broker is down.

Real loop (coordinator, policy, actuator) against LuxOS simulators and the price server, the
bridge as a runtime service publishing after every cycle, and a real Mosquitto stopped and
restarted mid-run.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.control.commands import Command, CommandResult
from agent.control.config import AgentConfig, MqttConfig
from agent.outputs.mqtt import MqttBridge
from agent.runtime.inbox import CommandInbox
from agent.runtime.state import AgentState
from drivers.bus.base import BusSettings
from drivers.bus.mqtt import MqttBus
from tests.obs_site import S19, Outputs, running_site, until
from tests.servers import Mosquitto

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

TOKEN = "agent-test-token"


async def latest_retained(broker: Mosquitto, topic: str) -> dict[str, Any]:
    """Connect afresh and read the retained message of ``topic``."""
    bus = MqttBus(
        BusSettings(broker.host, broker.port, "reader", "operator", broker.users["operator"])
    )
    async with bus.session() as s, asyncio.timeout(5):
        await s.subscribe(topic, qos=1)
        async for m in s.messages():
            data: dict[str, Any] = json.loads(m.payload)
            return data
    raise AssertionError("no message")


async def test_control_continues_while_the_broker_is_down(mosquitto: Mosquitto) -> None:
    bridges: list[MqttBridge] = []
    commands: list[Command] = []

    def outputs(_config: AgentConfig, state: AgentState, inbox: CommandInbox) -> Outputs:
        async def handle(command: Command) -> CommandResult:
            commands.append(command)
            return await inbox.submit(command)  # the runtime's own handler, in the loop

        config = MqttConfig.model_validate(
            {
                "enabled": True,
                "host": mosquitto.host,
                "port": mosquitto.port,
                "username": "agent",
                "password": "agent-secret",
                "command_tokens": {"operator": TOKEN},
                "reconnect_initial_s": 0.1,
                "reconnect_max_s": 0.5,
            }
        )
        bridge = MqttBridge(config, state, handle, count_rejected=inbox.reject)
        bridges.append(bridge)
        return Outputs([bridge], [lambda *_: bridge.publish_cycle()])

    state_topic = "site-agent/obs/state"
    async with running_site(20.0, outputs) as (agent, fleet, server):
        bridge = bridges[0]
        async with asyncio.timeout(10):
            await bridge.connected.wait()
        await until(lambda: agent.state.cycles >= 3, 10, "three cycles")
        state = await latest_retained(mosquitto, state_topic)
        assert state["miners"] == {"running": 4}

        mosquitto.stop()
        await until(lambda: not bridge.connected.is_set(), 5, "bridge sees the outage")
        cycles_at_outage = agent.state.cycles
        # A price spike during the outage: the agent still acts on it.
        server.prices[0] = 100.0
        await until(lambda: all(fleet.truth(a)["sleeping"] for a in S19), 15, "S19s asleep")
        await until(lambda: agent.state.cycles > cycles_at_outage + 3, 5, "cycles go on")

        mosquitto.start()
        await until(lambda: bridge.connections >= 2, 10, "bridge reconnected")
        await until(lambda: agent.state.actions[("sleep", "ok")] == 2, 5, "sleeps verified")
        await asyncio.sleep(0.5)  # a cycle or two after the verification, published

        # The broker forgot everything (no persistence); what it holds now is fresh state.
        state = await latest_retained(mosquitto, state_topic)
        assert state["miners"] == {"running": 2, "sleeping": 2}
        assert state["price_usd_per_mwh"] == 100.0
        assert state["cycles"] > cycles_at_outage
        telemetry = await latest_retained(mosquitto, "site-agent/obs/plan")
        assert telemetry["effective_price_usd_per_mwh"] == 100.0

        # And a command sent after the reconnect reaches the runtime and is acked.
        bus = MqttBus(
            BusSettings(mosquitto.host, mosquitto.port, "op", "operator", "operator-secret")
        )
        async with bus.session() as op:
            await op.subscribe("site-agent/obs/ack", qos=1)
            body = {"id": "m1", "operator": "operator", "token": TOKEN, "mode": "manual"}
            await op.publish("site-agent/obs/command/set_mode", json.dumps(body).encode(), qos=1)
            async with asyncio.timeout(5):
                async for m in op.messages():
                    ack = json.loads(m.payload)
                    break
        assert ack["id"] == "m1"
        assert ack["status"] == "accepted"
        assert agent.state.mode == "manual"
        # Manual mode, as the real runtime applies it: a price fall that would wake the S19s
        # commands nothing; the devices stay as they are.
        actions = dict(agent.state.actions)
        server.prices[0] = 20.0
        await until(
            lambda: agent.coordinator.price is not None and agent.coordinator.price.value == 20.0,
            5,
            "the price fall seen",
        )
        cycles = agent.state.cycles
        await until(lambda: agent.state.cycles >= cycles + 8, 10, "eight manual cycles")
        assert dict(agent.state.actions) == actions
        assert all(fleet.truth(a)["sleeping"] for a in S19)


async def test_operator_curtail_over_mqtt_sheds_real_miners(mosquitto: Mosquitto) -> None:
    bridges: list[MqttBridge] = []

    def outputs(_config: AgentConfig, state: AgentState, inbox: CommandInbox) -> Outputs:
        config = MqttConfig.model_validate(
            {
                "enabled": True,
                "host": mosquitto.host,
                "port": mosquitto.port,
                "username": "agent",
                "password": "agent-secret",
                "command_tokens": {"operator": TOKEN},
                "reconnect_initial_s": 0.1,
            }
        )
        bridge = MqttBridge(config, state, inbox.submit, count_rejected=inbox.reject)
        bridges.append(bridge)
        return Outputs([bridge], [lambda *_: bridge.publish_cycle()])

    def site_w(fleet: Any) -> float:
        return sum(float(fleet.truth(a)["power_w"]) for a in fleet.addresses)

    bus = MqttBus(BusSettings(mosquitto.host, mosquitto.port, "op", "operator", "operator-secret"))
    async with running_site(20.0, outputs) as (agent, fleet, _server), bus.session() as op:
        await op.subscribe("site-agent/obs/ack", qos=1)
        acks = op.messages()

        async def command(name: str, **fields: Any) -> dict[str, Any]:
            body = {"id": f"{name}-1", "operator": "operator", "token": TOKEN, **fields}
            await op.publish(f"site-agent/obs/command/{name}", json.dumps(body).encode(), qos=1)
            async with asyncio.timeout(10):
                ack: dict[str, Any] = json.loads((await anext(acks)).payload)
            return ack

        # Commands sent before the agent subscribed would reach nobody: wait for it.
        async with asyncio.timeout(10):
            await bridges[0].connected.wait()
        await until(lambda: site_w(fleet) > 12_000, 15, "all four miners running")
        until_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        ack = await command("curtail", target_kw=8, until=until_at)
        assert ack["status"] == "accepted", ack
        # The simulators' true draw (a meter's view) falls under the operator's target: the
        # two least efficient miners (S19j Pro) are shed.
        await until(lambda: site_w(fleet) <= 8_000, 15, "site under 8 kW")
        assert all(fleet.truth(a)["sleeping"] for a in S19)
        plan = agent.state.plan
        assert plan is not None
        assert plan.binding == ("event:override-curtail-1",)

        ack = await command("release")
        assert ack["status"] == "accepted"
        await until(lambda: not any(fleet.truth(a)["sleeping"] for a in S19), 15, "restored")
        assert agent.state.mode == "auto"
        # Releasing again: nothing to release, refused with the reason.
        body = {"id": "release-2", "operator": "operator", "token": TOKEN}
        await op.publish("site-agent/obs/command/release", json.dumps(body).encode(), qos=1)
        async with asyncio.timeout(10):
            ack = json.loads((await anext(acks)).payload)
        assert ack == {**ack, "status": "rejected", "reason": "no operator override is in force"}
        # The refusal is counted by the agent itself (the bridge reports it through the inbox).
        await until(lambda: agent.state.rejected[("mqtt", "refused")] == 1, 5, "refusal counted")
