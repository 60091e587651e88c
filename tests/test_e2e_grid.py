"""End to end with real grid signal sources: an openleadr VTN and a Mosquitto broker.

The agent runs with the LuxOS simulators and the HTTP price server (as in test_e2e_miners) and
gets its events from a real OpenADR 2.0b VTN, or from an MQTT curtailment topic with a
heartbeat. Assertions are on the simulators' true power.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.control.config import parse_config
from agent.runtime.loop import Agent
from drivers.grid.openadr import OpenAdrVen
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.openadr_vtn import OpenAdrVtn
from simulators.price_server import PriceServer
from tests.servers import Mosquitto, free_port
from tests.site_agent import build_agent
from tests.test_e2e_miners import S19, S21, site_dict, true_site_w, truth, until

ERS = "oadr://ercot/ers"
RAMP_KW_PER_MIN = 240.0  # 4 kW/s: restoring ~22 kW takes several seconds


@contextlib.asynccontextmanager
async def site(grid: dict[str, Any]) -> AsyncIterator[tuple[Agent, LuxosFleet]]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    fleet = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    async with fleet, PriceServer([20.0], interval_s=3600) as prices:
        data = site_dict(prices.url, min_off_s=0.5)
        data["site"]["ramp_up_kw_per_min"] = RAMP_KW_PER_MIN
        data["grid"] = grid
        config = parse_config(data)
        agent = build_agent(config)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: true_site_w(fleet) > 21_000, 15, "all miners at +1")
            yield agent, fleet
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


async def wake_times(fleet: LuxosFleet, limit_s: float) -> list[float]:
    """Seconds (from now) at which each sleeping miner was first seen awake."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    woke: dict[str, float] = {}
    while len(woke) < len(fleet.addresses) and loop.time() - t0 < limit_s:
        for a in fleet.addresses:
            if a not in woke and not truth(fleet, a)["sleeping"]:
                woke[a] = loop.time() - t0
        await asyncio.sleep(0.02)
    assert len(woke) == len(fleet.addresses), f"only {len(woke)} miners woke in {limit_s} s"
    return sorted(woke.values())


async def test_openadr_event_is_met_by_its_start_and_restore_is_ramped() -> None:
    port = free_port()
    grid = {
        "openadr": {
            "vtn_url": f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
            "ven_name": "site-1",
            "programs": {ERS: {"name": "ers", "kind": "emergency", "fail": "curtail"}},
            "report_sampling_s": 1,
            "register_retry_min_s": 0.2,
            "register_retry_max_s": 0.5,
        }
    }
    async with OpenAdrVtn(port=port, poll_s=1) as vtn, site(grid) as (agent, fleet):
        ven = next(s for s in agent.components.grid_sources if isinstance(s, OpenAdrVen))
        await until(lambda: ven.registered, 10, "VEN registered")
        loop = asyncio.get_running_loop()
        start = datetime.now(UTC) + timedelta(seconds=3)
        vtn.push_event(
            "site-1",
            start=start,
            duration=timedelta(seconds=6),
            value=5.0,  # LOAD_DISPATCH setpoint: site load at most 5 kW
            market_context=ERS,
        )
        # Before the window opens the site keeps mining: the target is a level in its window.
        await until(lambda: "evt" in " ".join(agent.coordinator.events), 15, "event received")
        assert true_site_w(fleet) > 21_000
        # By the start plus one second (the program's response time here) the site is under.
        await asyncio.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))
        met_by = loop.time() + 1.0
        await until(lambda: true_site_w(fleet) <= 5_000, 3, "site under the 5 kW target")
        assert loop.time() <= met_by
        plan = agent.state.plan
        assert plan is not None
        assert plan.binding[0].startswith("event:")
        # The VTN received the VEN's telemetry of the site load.
        await until(lambda: any(r.value <= 5_000 for r in vtn.reports), 4, "VTN sees the shed")
        # After the window the site is restored, gradually: at 4 kW/s with ~3-4 kW per miner,
        # waking all six takes several seconds, not one cycle.
        await asyncio.sleep(
            max(0.0, (start + timedelta(seconds=6) - datetime.now(UTC)).total_seconds())
        )
        times = await wake_times(fleet, 20)
        assert times[-1] - times[0] >= 2.0, f"restore storm: miners woke at {times}"


@pytest.mark.mqtt
async def test_mqtt_heartbeat_loss_curtails_and_its_return_restores(mosquitto: Mosquitto) -> None:
    grid = {
        "mqtt_curtail": {
            "host": mosquitto.host,
            "port": mosquitto.port,
            "username": "agent",
            "password": "agent-secret",
            "heartbeat_max_age_s": 1.0,
            "programs": {"ers": {"kind": "emergency", "fail": "curtail"}},
            "default_program": "ers",
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 0.5,
        }
    }
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, username="operator", password="operator-secret"
    ) as grid_operator:

        async def beat(seconds: float) -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                await grid_operator.publish("grid/heartbeat", "{}", qos=0)
                await asyncio.sleep(0.2)

        await beat(0.1)
        async with site(grid) as (agent, fleet):
            await beat(1.0)
            assert true_site_w(fleet) > 21_000, "a live heartbeat changes nothing"
            # The heartbeat stops: the program fails to "curtail", a full shed.
            await until(lambda: true_site_w(fleet) < 500, 6, "site shed on heartbeat loss")
            assert agent.state.plan is not None
            assert "signal-lost" in agent.state.plan.binding[0]
            # It returns: the synthesized event ends and the site is restored, ramped.
            beating = asyncio.create_task(beat(30))
            try:
                times = await wake_times(fleet, 20)
                assert times[-1] - times[0] >= 2.0, f"restore storm: miners woke at {times}"
            finally:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating


@pytest.mark.mqtt
async def test_rejected_grid_messages_are_audited_and_change_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from agent.journal.store import Store
    from agent.runtime.events import EventBook
    from drivers.grid.mqtt_curtail import MqttCurtailSettings, MqttCurtailSource

    settings = MqttCurtailSettings.model_validate(
        {
            "host": mosquitto.host,
            "port": mosquitto.port,
            "username": "agent",
            "password": "agent-secret",
            "heartbeat_max_age_s": 600,
            "programs": {"ers": {"kind": "emergency", "fail": "hold"}},
            "default_program": "ers",
        }
    )
    source = MqttCurtailSource(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        await until(lambda: source.connected, 10, "grid source connected")
        async with (
            Store.open(tmp_path / "journal.db") as store,
            aiomqtt.Client(
                mosquitto.host, mosquitto.port, username="operator", password="operator-secret"
            ) as grid_operator,
        ):
            events: dict[str, Any] = {}
            book = EventBook([source], store, events)
            now = datetime.now(UTC)
            for payload in (
                "{not json",
                json.dumps({"event_id": "x", "state": "on", "max_site_kw": float("nan")}),
                json.dumps({"event_id": "y", "state": "on", "kind": "alien", "max_site_kw": 5}),
            ):
                await grid_operator.publish("grid/curtail", payload, qos=1)
            await until(lambda: len(source.rejected) >= 3, 15, "three rejections")
            await book.sync(now, 20_000.0)
            assert events == {}  # nothing is in force
            rows = [r for r in await store.audit_rows() if r.result == "rejected"]
            assert len(rows) == 3
            assert all(r.source == f"grid:{source.name}" for r in rows)
            assert all(r.reason for r in rows)
            await book.sync(now, 20_000.0)  # audited once, not on every sync
            assert len([r for r in await store.audit_rows() if r.result == "rejected"]) == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
