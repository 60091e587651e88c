"""End to end with the revenue meter: LuxOS simulators + SunSpec meter simulator + the real agent.

The meter simulator measures the miners' true power plus cooling (6 % of it at 30 °C) and
noise, over Modbus TCP. The agent reads it through the pymodbus driver. Assertions are on the
meter simulator's *true* site power (devices + cooling, without noise), i.e. what the utility
bills, and on the agent's audit, journal and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.control.config import parse_config
from agent.journal.store import Store
from agent.outputs.metrics import MetricsService
from agent.runtime.loop import Agent
from drivers.grid.base import GridEvent, ProgramKind
from drivers.grid.openadr import OpenAdrVen
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import SITE_TOP, Timing
from simulators.meter import MeterSimulator
from simulators.openadr_vtn import OpenAdrVtn
from simulators.price_server import PriceServer
from tests.servers import free_port
from tests.site_agent import build_agent, metrics_port
from tests.test_e2e_miners import S19, S21, site_dict, true_site_w, until

LIMIT_KW = 20.0  # all six miners at +1 draw 22.05 kW: the limit binds
MARGIN_KW = 0.3
FALLBACK_KW = 2.0


def metered_w(meter: MeterSimulator) -> float:
    """What the utility bills: devices + cooling + base load (the noise-free truth)."""
    value = meter.truth()["true_w"]
    assert isinstance(value, float)
    return value


@contextlib.asynccontextmanager
async def metered_site(
    tmp_path: Path, *, limit_kw: float = LIMIT_KW, air: dict[str, float] | None = None, **extra: Any
) -> AsyncIterator[tuple[Agent, LuxosFleet, MeterSimulator, Store]]:
    """``air["c"]``, when given, is the outdoor temperature the miners breathe (boards lag it
    by a 0.5 s time constant here, a minute on real hardware)."""
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    fleet = LuxosFleet(
        specs,
        timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1),
        ambient_c=None if air is None else (lambda: air["c"]),
        thermal_tau_s=None if air is None else 0.5,
    )
    meter = MeterSimulator(
        "127.0.0.1", 0, unit_id=1, device_power=lambda: true_site_w(fleet), max_site_w=60_000
    )
    meter.ambient_pinned_c = 30.0  # cooling = 4 % + 5 × 0.4 % = 6 % of the IT load
    async with (
        fleet,
        meter,
        PriceServer([20.0], interval_s=3600) as prices,
        Store.open(tmp_path / "journal.db") as store,
    ):
        data = site_dict(prices.url, min_off_s=0.5, limit_kw=limit_kw)
        data["site"]["safety_margin_kw"] = MARGIN_KW
        data["meter"] = {
            "host": "127.0.0.1",
            "port": meter.port,
            "unit_id": 1,
            "timeout_s": 0.5,
            "stale_after_s": 5,
            "poll_s": 0.2,
            "max_age_s": 1.5,
            "fallback_margin_kw": FALLBACK_KW,
            "max_residual_kw": 10,
            "trim_gain": 0.3,
            "max_trim_kw": 5,
            "max_trim_step_kw": 1,
        }
        data.update(extra)
        config = parse_config(data)
        agent = build_agent(config, store=store, metrics=True)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            yield agent, fleet, meter, store
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=8)


async def held(predicate: Any, seconds: float, what: str) -> None:
    """``predicate`` holds at every sample for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        assert predicate(), f"stopped holding: {what}"
        await asyncio.sleep(0.05)


async def scrape(agent: Agent) -> dict[str, float]:
    service = next(s for s in agent.components.services if isinstance(s, MetricsService))
    await until(service.started.is_set, 5, "metrics listening")
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port(agent)}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metered_load_stays_under_the_limit_and_a_lost_meter_falls_back(
    tmp_path: Path,
) -> None:
    limit_w = LIMIT_KW * 1000
    async with metered_site(tmp_path) as (agent, fleet, meter, store):
        # The trim learns the cooling the devices do not report, and the *metered* load settles
        # under the limit (a device-sum agent would run the devices at the limit: 6 % over).
        await until(
            lambda: agent.meter_watch.trim_w > 800 and metered_w(meter) <= limit_w,
            20,
            "metered load under the limit with the cooling learned",
        )
        await held(lambda: metered_w(meter) <= limit_w, 3, "metered load <= limit")
        devices = true_site_w(fleet)
        assert metered_w(meter) / devices == pytest.approx(1.06, rel=0.002)
        snap = agent.state.snapshot
        assert snap is not None
        assert snap.measured_site_power_w is not None
        assert snap.measured_site_power_w == pytest.approx(metered_w(meter), rel=0.01)
        assert snap.device_power_w is not None
        assert snap.measured_site_power_w > snap.device_power_w * 1.04
        # The trim is the cooling: about 6 % of the devices, learned without a cooling model.
        assert agent.meter_watch.trim_w == pytest.approx(0.06 * devices, rel=0.25)
        m = await scrape(agent)
        assert m["site_agent_meter_up"] == 1
        assert m['site_agent_site_power_mode{source="meter"}'] == 1
        assert m["site_agent_site_power_watts"] == pytest.approx(metered_w(meter), rel=0.01)
        assert m["site_agent_meter_trim_watts"] > 800

        # The meter goes silent: after max_age_s the agent plans on devices + the margin.
        meter.set_fault("silent")
        await until(
            lambda: agent.state.meter is not None and agent.state.meter.source == "fallback",
            6,
            "fallback to devices + margin",
        )
        await held(lambda: metered_w(meter) <= limit_w, 3, "metered load <= limit in fallback")
        plan = agent.state.plan
        assert plan is not None
        assert "meter not trusted" in plan.summary
        m = await scrape(agent)
        assert m["site_agent_meter_up"] == 0
        assert m['site_agent_site_power_mode{source="fallback"}'] == 1
        assert m["site_agent_meter_fallback_actions_total"] >= 1
        assert m["site_agent_meter_rejected_inputs_total"] >= 1
        rows = [r for r in await store.audit_rows() if r.source == "meter"]
        fallback = [r for r in rows if r.action == "meter_fallback"]
        assert fallback, rows
        assert "devices + cooling + 2 kW" in fallback[-1].reason
        assert "no answer" in fallback[-1].reason or "old" in fallback[-1].reason

        # It answers again: trusted, and the audit says so.
        meter.clear()
        await until(
            lambda: agent.state.meter is not None and agent.state.meter.trusted,
            6,
            "meter trusted again",
        )
        await until(
            lambda: metered_w(meter) <= limit_w, 10, "metered under the limit after recovery"
        )

        # An implausible meter (reads 50 kW while the devices draw ~18): not acted on. (Beyond
        # three times the interconnect the driver itself refuses it.)
        meter.override("WphB", 0x8000)  # no per-phase figures, so the driver cannot tell
        meter.override("W", 5000)  # 5,000 × 10 W
        await until(
            lambda: agent.state.meter is not None and agent.state.meter.source == "fallback",
            6,
            "fallback on an implausible meter",
        )
        assert agent.state.meter is not None
        assert agent.state.meter.reason is not None
        assert "off by more than 10 kW" in agent.state.meter.reason
        await held(lambda: true_site_w(fleet) > 10_000, 1, "no mass shed on a wild meter")
        audit = [r.action for r in await store.audit_rows() if r.source == "meter"]
        assert audit.count("meter_fallback") >= 2
        assert "meter_trusted" in audit


async def test_an_event_is_judged_on_the_meter(tmp_path: Path) -> None:
    # With the cooling model configured and the ambient read from the meter's model 307, the
    # model itself predicts the 6 % and the trim stays small.
    cooling = {"base_frac": 0.04, "per_degree_frac": 0.004, "reference_c": 25}
    async with metered_site(tmp_path, cooling=cooling, ambient={"source": "meter"}) as (
        agent,
        fleet,
        meter,
        store,
    ):
        await until(lambda: agent.state.meter is not None and agent.state.meter.trusted, 10, "m")
        await until(lambda: metered_w(meter) <= LIMIT_KW * 1000, 20, "under the limit")
        assert agent.state.meter is not None
        assert agent.state.meter.ambient_c == 30.0
        await until(lambda: abs(agent.meter_watch.trim_w) < 400, 10, "the model explains the meter")
        now = datetime.now(UTC)
        event = GridEvent(
            event_id="ers-1",
            source="operator:test",
            program="operator-override",
            kind=ProgramKind.OVERRIDE,
            start=now,
            end=now + timedelta(minutes=10),
            max_site_kw=12.0,
        )
        await agent.event_book.add_override(event, "test", "e2e")
        target_w = 12_000.0
        await until(lambda: metered_w(meter) <= target_w, 10, "metered load under the event")
        # Devices alone would be allowed up to 12 kW: the meter-judged plan leaves room for
        # cooling, so the devices sit clearly below the target.
        await held(lambda: metered_w(meter) <= target_w, 2, "metered load <= event target")
        assert true_site_w(fleet) <= (target_w - MARGIN_KW * 1000) / 1.06 + 50
        rows = await store.compliance("ers-1")
        assert rows, "compliance journaled"
        # Compliance is settled on the meter: what it records is the metered load, which is
        # above the device sum by the cooling.
        await until(
            lambda: (
                agent.state.snapshot is not None
                and agent.state.snapshot.device_power_w is not None
                and agent.state.snapshot.measured_site_power_w is not None
                and agent.state.snapshot.measured_site_power_w
                > agent.state.snapshot.device_power_w * 1.04
            ),
            5,
            "snapshot site power is the meter",
        )
        m = await scrape(agent)
        shortfall = (
            'site_agent_grid_event_shortfall_watts{event_id="ers-1",program="operator-override"}'
        )
        assert m[shortfall] == 0
        assert m["site_agent_cooling_power_watts"] > 0
        assert m["site_agent_ambient_celsius"] == 30.0


def profiles(fleet: LuxosFleet, addresses: list[str]) -> list[object]:
    return [fleet.truth(a)["profile"] for a in addresses]


async def test_a_hot_afternoon_derates_the_hottest_miners_first(tmp_path: Path) -> None:
    air = {"c": 25.0}
    thermal = {"miner": {"max_c": 66, "resume_c": 60, "step_s": 1.0}}
    async with metered_site(tmp_path, limit_kw=60.0, air=air, thermal=thermal) as (
        agent,
        fleet,
        meter,
        store,
    ):
        # A mild morning: every miner at its top profile (LuxOS boards ~52 °C, fans holding them).
        await until(lambda: profiles(fleet, S19 + S21) == [SITE_TOP] * 6, 15, "all at the top")
        await held(lambda: profiles(fleet, S19 + S21) == [SITE_TOP] * 6, 1.5, "no derate at 25 °C")
        # The afternoon heats up to 40 °C: the S21s (hotter boards, ~68 °C) cross 66 °C and step
        # down one point; at 'default' they settle in the hysteresis band. The S19s stay on top.
        air["c"] = meter.ambient_pinned_c = 40.0
        await until(lambda: profiles(fleet, S21) == ["default"] * 3, 10, "S21s derated")
        await held(
            lambda: (
                profiles(fleet, S21) == ["default"] * 3 and profiles(fleet, S19) == [SITE_TOP] * 3
            ),
            3,
            "one step down for the hottest, none for the others, no flapping",
        )
        hottest = [float(str(fleet.truth(a)["chip_c"])) for a in S21]
        cooler = [float(str(fleet.truth(a)["chip_c"])) for a in S19]
        assert min(hottest) > max(cooler)
        # The miners obey before the actuator journals their answers: wait for the rows.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            rows = await store.audit_rows()
            reasons = [r.reason for r in rows if "thermal derate" in r.reason]
            if len(reasons) >= 3:
                break
            assert asyncio.get_running_loop().time() < deadline, f"3 derates audited: {reasons}"
            await asyncio.sleep(0.05)
        assert all(f"{SITE_TOP} -> default" in r and "> 66 °C" in r for r in reasons), reasons
        m = await scrape(agent)
        assert m['site_agent_thermal_derated_devices{kind="miner"}'] == 3
        assert m['site_agent_thermal_derate_actions_total{kind="miner"}'] >= 3
        plan = agent.state.plan
        assert plan is not None
        assert "thermal derate: 3 miner(s)" in plan.summary
        # A hot spot at one S19's intake (+6 °C): it crosses the limit too, and only it.
        fleet.set_hot_spot(S19[0], 6.0)
        await until(lambda: profiles(fleet, S19)[0] != SITE_TOP, 10, "the hot-spot S19 derated")
        assert profiles(fleet, S19)[1:] == [SITE_TOP, SITE_TOP]
        # Evening: back to 25 °C; below resume_c the ceilings lift and the miners step back up.
        fleet.set_hot_spot(S19[0], 0.0)
        air["c"] = meter.ambient_pinned_c = 25.0
        await until(lambda: profiles(fleet, S19 + S21) == [SITE_TOP] * 6, 15, "all back at the top")
        await until(lambda: not agent.state.thermal_derated, 5, "no derate left")


async def test_an_openadr_event_is_judged_and_reported_on_the_meter(tmp_path: Path) -> None:
    port = free_port()
    ers = "oadr://ercot/ers"
    grid = {
        "openadr": {
            "vtn_url": f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
            "ven_name": "site-1",
            "programs": {ers: {"name": "ers", "kind": "emergency", "fail": "curtail"}},
            "report_sampling_s": 1,
            "register_retry_min_s": 0.2,
            "register_retry_max_s": 0.5,
        }
    }
    async with (
        OpenAdrVtn(port=port, poll_s=1) as vtn,
        metered_site(tmp_path, limit_kw=40.0, grid=grid) as (agent, fleet, meter, store),
    ):
        ven = next(s for s in agent.components.grid_sources if isinstance(s, OpenAdrVen))
        await until(lambda: ven.registered, 10, "VEN registered")
        await until(lambda: true_site_w(fleet) > 18_500, 15, "all miners mining")
        start = datetime.now(UTC) + timedelta(seconds=2)
        vtn.push_event(
            "site-1",
            start=start,
            duration=timedelta(seconds=30),
            value=12.0,  # LOAD_DISPATCH: site load at most 12 kW, at the meter
            market_context=ers,
        )
        await until(lambda: metered_w(meter) <= 12_000, 10, "metered load under 12 kW")
        await held(lambda: metered_w(meter) <= 12_000, 2, "metered load held under the event")
        # The devices alone sit well under 12 kW: room was left for the cooling the meter sees.
        assert true_site_w(fleet) < 12_000 / 1.05
        # What the VEN reports to the VTN is the meter's figure, not the device sum.
        await until(
            lambda: any(r.value > true_site_w(fleet) * 1.04 for r in vtn.reports[-3:]),
            6,
            "VTN receives the metered load",
        )
        # Once the site is steady under the event, the reports match the meter (sampled 1 s apart).
        await until(
            lambda: any(
                abs(r.value - metered_w(meter)) <= 0.03 * metered_w(meter) for r in vtn.reports[-2:]
            ),
            6,
            "a report equal to the metered load",
        )
        rows = await store.compliance(vtn_event_id(agent))
        assert rows, "compliance journaled on the meter"


def vtn_event_id(agent: Agent) -> str:
    return next(eid for eid in agent.coordinator.events if "evt" in eid)
