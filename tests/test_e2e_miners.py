"""End to end: LuxOS simulators ← pyasic driver ← agent ← HTTP price feed, all over real sockets.

The agent runs its real loop (coordinator, policy, actuator) against simulated miners that
unmodified pyasic talks to on 127.x addresses, and reads prices from the real HTTP price server.
Assertions are on the simulators' *true* state (what a power meter would see), not on what the
agent believes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from agent.control.config import AgentConfig, parse_config
from agent.control.domain import SLEEP, ActiveEvent
from agent.runtime.loop import Agent
from drivers.grid.base import GridEvent, ProgramKind
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import S19J_PRO, FaultKind, Timing
from simulators.luxos_model import S21 as S21_MODEL
from simulators.price_server import PriceServer
from tests.loopback import ip
from tests.site_agent import build_agent, metrics_port

S19 = [ip(0, i) for i in (1, 2, 3)]
S21 = [ip(1, i) for i in (1, 2, 3)]

MODELS = {"S19jPro": S19J_PRO.site_config(), "S21": S21_MODEL.site_config()}


def site_config(price_url: str, *, min_off_s: float = 1.5, limit_kw: float = 40) -> AgentConfig:
    return parse_config(site_dict(price_url, min_off_s=min_off_s, limit_kw=limit_kw))


def site_dict(price_url: str, *, min_off_s: float = 1.5, limit_kw: float = 40) -> dict[str, Any]:
    return {
        "site": {"id": "e2e", "interconnect_limit_kw": limit_kw},
        "control": {
            "interval_s": 0.25,
            "poll_interval_s": 0.2,
            "poll_jitter_s": 0.02,
            "device_timeout_s": 2,
            "retries": 1,
            "verify_after_s": 1.5,
            "hysteresis_usd_per_mwh": 2,
            "min_on_s": 0.5,
            "min_off_s": min_off_s,
        },
        "economics": {"pool_fee": 0.02, "hashprice": {"usd_per_ph_day": 55}},
        "metrics": {"port": 0},
        "miner_models": MODELS,
        "miners": [
            {"id": "s19", "address": S19[0], "model": "S19jPro", "count": 3},
            {"id": "s21", "address": S21[0], "model": "S21", "count": 3},
        ],
        "prices": {
            "realtime": {
                "type": "http_json",
                "url": f"{price_url}/price",
                "value_path": "data.0.price",
                "time_path": "data.0.time",
                "poll_interval_s": 0.2,
                "timeout_s": 1,
            },
            "max_age_s": 30,
        },
    }


@contextlib.asynccontextmanager
async def running_site(
    price: float, **config_kw: Any
) -> AsyncIterator[tuple[Agent, LuxosFleet, PriceServer]]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    fleet = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    server = PriceServer([price], interval_s=3600)
    async with fleet, server:
        config = site_config(server.url, **config_kw)
        agent = build_agent(config, metrics=True)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            yield agent, fleet, server
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.05)


def truth(fleet: LuxosFleet, address: str) -> dict[str, Any]:
    return fleet.truth(address)


def watts(truth_row: dict[str, object]) -> float:
    """The true power in one simulator truth row."""
    value = truth_row["power_w"]
    assert isinstance(value, float | int)
    return float(value)


def true_site_w(fleet: LuxosFleet) -> float:
    return sum(float(fleet.truth(a)["power_w"]) for a in fleet.addresses)


def asleep(fleet: LuxosFleet, address: str) -> bool:
    return bool(truth(fleet, address)["sleeping"])


async def test_spike_sleeps_inefficient_miners_and_drop_restores_them_after_min_off() -> None:
    async with running_site(20.0) as (agent, fleet, server):
        # Cheap power: everything mines, at the top profile (every step beats 20 $/MWh).
        await until(
            lambda: all(truth(fleet, a)["profile"] == "+1" for a in S19 + S21),
            10,
            "all miners at +1",
        )
        # 100 $/MWh is above the S19j Pro's breakeven (~76) and below the S21's (~128).
        server.prices[0] = 100.0
        await until(lambda: all(asleep(fleet, a) for a in S19), 10, "S19s asleep")
        slept_at = asyncio.get_running_loop().time()
        assert not any(asleep(fleet, a) for a in S21), "S21s must keep mining"
        # The S21s step down to their most efficient profile: the upper steps earn < 100 $/MWh.
        await until(lambda: all(truth(fleet, a)["profile"] == "-2" for a in S21), 10, "S21s at -2")
        plan = agent.state.plan
        assert plan is not None
        assert plan.effective_price_usd_per_mwh == 100.0
        counts = agent.state.actions
        await until(lambda: counts[("sleep", "ok")] == 3, 15, "three sleeps confirmed")
        # The agent's own view agrees with the simulators' truth (telemetry confirmed it).
        await until(lambda: not agent.pending(), 15, "commands verified")
        assert agent.state.faults == {}
        # Price falls again: the S19s come back, but not before the minimum off time (1.5 s).
        server.prices[0] = 20.0
        await until(lambda: not any(asleep(fleet, a) for a in S19), 10, "S19s awake")
        woke_after = asyncio.get_running_loop().time() - slept_at
        assert woke_after >= 1.5
        wakes = [r for r in agent.state.actions.items() if r[0] == ("wake", "ok")]
        assert wakes == [(("wake", "ok"), 3)]


async def test_miner_ignoring_commands_is_faulted_and_another_is_shed() -> None:
    async with running_site(20.0, limit_kw=40) as (agent, fleet, _server):
        await until(
            lambda: all(truth(fleet, a)["profile"] == "+1" for a in S19 + S21), 10, "all at +1"
        )
        stubborn = S19[0]
        fleet.set_fault(stubborn, FaultKind.IGNORE)
        # The grid asks for at most 12 kW. The policy sheds the S19s first; one of them
        # acknowledges the sleep command but keeps mining.
        now = datetime.now(UTC)
        event = GridEvent(
            event_id="dr-1",
            source="test",
            program="test-dr",
            kind=ProgramKind.EMERGENCY,
            start=now - timedelta(seconds=1),
            end=now + timedelta(hours=1),
            max_site_kw=12.0,
        )
        agent.coordinator.events["dr-1"] = ActiveEvent(event, baseline_w=true_site_w(fleet))
        agent.wake_control.set()
        await until(lambda: "s19-001" in agent.state.faults, 10, "stubborn miner faulted")
        assert "accepted but not applied" in agent.state.faults["s19-001"]
        assert agent.state.actions[("sleep", "not_applied")] >= 1
        assert not asleep(fleet, stubborn)
        # The next cycles compensate: the measured site load ends under the target, with the
        # stubborn miner still drawing its ~3.4 kW, so the S21s give up more than they would have.
        await until(lambda: true_site_w(fleet) <= 12_000, 10, "site under 12 kW")
        s21_w = sum(float(truth(fleet, a)["power_w"]) for a in S21)
        assert s21_w <= 12_000 - float(truth(fleet, stubborn)["power_w"])
        # The fault is visible to the operator on /metrics.
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics_port(agent)}/metrics")).text
        assert 'site_agent_miner_state{miner="s19-001",state="faulted"} 1.0' in text
        assert 'site_agent_actions_total{kind="sleep",result="not_applied"}' in text
        assert 'site_agent_miners{state="faulted"} 1.0' in text
        plan = agent.state.plan
        assert plan is not None
        assert plan.binding == ("event:dr-1",)
        assert plan.miner_points["s19-001"] == SLEEP  # still what it was told
        assert plan.planned_power_w <= 12_000


async def test_stop_is_clean_and_fast_even_with_a_hung_miner() -> None:
    async with running_site(20.0) as (agent, fleet, _server):
        await until(lambda: agent.state.cycles >= 2, 10, "two cycles")
        fleet.set_fault(S21[0], FaultKind.HANG)
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        started = loop.time()
    # running_site's exit set the stop event and waited (at most 5 s) for the agent to finish.
    assert loop.time() - started < 5


async def test_a_miner_restored_by_hand_during_an_event_is_shed_again() -> None:
    async with running_site(20.0) as (agent, fleet, _server):
        await until(lambda: true_site_w(fleet) > 21_000, 10, "all mining")
        now = datetime.now(UTC)
        event = GridEvent(
            event_id="ers-1",
            source="test",
            program="ers",
            kind=ProgramKind.EMERGENCY,
            start=now - timedelta(seconds=1),
            end=now + timedelta(hours=1),
            max_site_kw=12.0,
        )
        agent.coordinator.events["ers-1"] = ActiveEvent(event, baseline_w=true_site_w(fleet))
        agent.wake_control.set()
        await until(lambda: all(asleep(fleet, a) for a in S19), 10, "S19s shed")
        await until(
            lambda: agent.state.actions[("sleep", "ok")] >= 3 and not agent.pending(),
            5,
            "the sleeps verified",
        )
        # A technician wakes one S19 with its own tools (plain pyasic, not the agent).
        from drivers.miners.pyasic_driver import PyasicMiner

        tech = PyasicMiner.luxos(S19[1], asyncio.Semaphore(1))
        await tech.wake()
        await until(lambda: not asleep(fleet, S19[1]), 15, "the miner is woken by hand")
        # OFF is a level: the agent sees the drift in telemetry and sheds it again.
        await until(lambda: asleep(fleet, S19[1]), 10, "the miner shed again")
        await until(lambda: true_site_w(fleet) <= 12_000, 3, "site back under 12 kW")
        assert agent.state.actions[("sleep", "ok")] >= 4


async def test_a_miner_that_never_answers_counts_at_nameplate() -> None:
    async with running_site(20.0) as (agent, fleet, _server):
        await until(lambda: agent.state.cycles >= 1, 10, "first cycle")
        fleet.set_fault(S21[2], FaultKind.HANG)
        await until(lambda: _unknown(agent, "s21-003"), 15, "no fresh reading of s21-003")
        snap = agent.state.snapshot
        assert snap is not None
        view = next(m for m in snap.miners if m.device_id == "s21-003")
        assert view.measured_power_w is None
        plan = agent.state.plan
        assert plan is not None
        assert plan.miner_points["s21-003"] == view.commanded  # left alone: no action for it
        assert not any(a.device_id == "s21-003" for a in plan.actions)
        # The plan's own sum counts it at the S21 nameplate (4000 W), not at its last reading
        # or its profile: every other miner at the power of the point the plan gives it.
        others_w = sum(
            m.point(plan.miner_points[m.device_id]).power_w
            for m in snap.miners
            if m.device_id != "s21-003"
        )
        assert plan.planned_power_w == pytest.approx(others_w + 4000)


def _unknown(agent: Agent, device_id: str) -> bool:
    snap = agent.state.snapshot
    if snap is None:
        return False
    view = next(m for m in snap.miners if m.device_id == device_id)
    return view.measured_power_w is None
