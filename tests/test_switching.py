"""Switching costs, one model: what the policy decides with is what the settlement charges.

Waking a miner loses hashing and draws extra energy, sleeping one draws extra energy,
suspending a job loses the work since its checkpoint (and an SLA contract's penalty), resuming
one spends its reload time. :mod:`agent.control.site` is the only place these are computed; the
policy prices every action with them (``Action.switch_lost_usd``, ``switch_energy_wh``) and
the backtest's settlement books them when it carries the action out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.backtest.data import TraceJob
from agent.backtest.engine import build_site, run_policy, simple_market
from agent.control.config import AgentConfig, parse_config
from agent.control.domain import ActionKind, Plan, Snapshot
from agent.control.policy import decide
from agent.control.site import (
    checkpoint_age_s,
    commit_horizon_s,
    resume_cost,
    sleep_cost,
    suspend_cost,
    wake_cost,
)
from drivers.jobs.base import JobClass

T0 = datetime(2023, 7, 1, tzinfo=UTC)


def site_config(
    wake_lost_s: float = 300.0,
    wake_wh: float = 50.0,
    sleep_wh: float = 10.0,
    resume_s: float = 120.0,
    ckpt_s: float = 1800.0,
) -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "t", "interconnect_limit_kw": 200},
            "control": {"hysteresis_usd_per_mwh": 0, "min_on_s": 0, "min_off_s": 0},
            "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 48}},
            "prices": {"realtime": {"type": "constant", "value": 0}},
            "miner_models": {
                "M": {
                    "standby_w": 20,
                    "profiles": [
                        {"name": "eco", "power_w": 2500, "hashrate_ths": 90},
                        {"name": "run", "power_w": 3000, "hashrate_ths": 100},
                    ],
                    "wake_lost_s": wake_lost_s,
                    "wake_energy_wh": wake_wh,
                    "sleep_energy_wh": sleep_wh,
                }
            },
            "miners": [{"id": "m", "address": "10.1.0.1", "model": "M", "count": 4}],
            "gpu_nodes": [
                {
                    "id": "g",
                    "gpus": 8,
                    "min_cap_w": 200,
                    "max_cap_w": 700,
                    "idle_w": 70,
                    "host_overhead_w": 1000,
                }
            ],
            "ai": {
                "sla": {
                    "usd_per_gpu_hour": 2.5,
                    "penalty_usd": 500,
                    "resume_s": resume_s,
                    "checkpoint_interval_s": ckpt_s,
                },
                "preemptible": {
                    "usd_per_gpu_hour": 2.0,
                    "resume_s": resume_s,
                    "checkpoint_interval_s": ckpt_s,
                },
                "filler": {
                    "usd_per_gpu_hour": 0.6,
                    "resume_s": resume_s,
                    "checkpoint_interval_s": ckpt_s,
                },
            },
        }
    )


def test_costs_by_hand() -> None:
    cfg = site_config()
    model = cfg.miner_models["M"]
    run = next(p for p in (model.profiles) if p.name == "run")
    from agent.control.domain import OperatingPoint

    # 100 TH/s at 48 $/PH/day: 0.2 $/h; 300 s lost: 0.0166... $; 50 Wh extra.
    wake = wake_cost(cfg, model, OperatingPoint("run", run.power_w, run.hashrate_ths), 48.0)
    assert wake.lost_usd == pytest.approx(0.2 * 300 / 3600)
    assert wake.energy_wh == 50.0
    assert wake.usd(100.0) == pytest.approx(0.2 * 300 / 3600 + 0.005)
    assert sleep_cost(model).energy_wh == 10.0
    # 4 GPUs at 2 $/GPU-h, full cap: 8 $/h; 45 minutes run, checkpoints every 30: 15 min lost.
    age = checkpoint_age_s(2700.0, 0.0, None, 1800.0)
    assert age == 900.0
    assert suspend_cost(0.0, 8.0, age).lost_usd == pytest.approx(2.0)
    # A known checkpoint wins over the contract's period; never counted before the run began.
    assert checkpoint_age_s(2700.0, 0.0, 2600.0, 1800.0) == 100.0
    assert checkpoint_age_s(2700.0, 1000.0, 500.0, 1800.0) == 1700.0
    assert checkpoint_age_s(2700.0, 0.0, None, 0.0) == 2700.0  # never checkpoints
    # SLA: penalty plus the work.
    assert suspend_cost(500.0, 8.0, age).lost_usd == pytest.approx(502.0)
    assert resume_cost(cfg.ai.preemptible, 4, 2.0).lost_usd == pytest.approx(4 * 2.0 * 120 / 3600)
    # A switch commits the site for at least one 15-minute settlement interval.
    assert commit_horizon_s(15.0, 300.0) == 900.0
    assert commit_horizon_s(15.0, 1800.0) == 1800.0


def recording(plans: list[Plan]) -> Any:
    def run(snapshot: Snapshot, config: AgentConfig, now: datetime) -> Plan:
        plan = decide(snapshot, config, now)
        plans.append(plan)
        return plan

    return run


job_st = st.tuples(
    st.sampled_from([JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER]),
    st.integers(1, 4),  # GPUs
    st.integers(0, 6),  # start interval
    st.integers(1, 12),  # length in intervals
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prices=st.lists(
        st.one_of(st.floats(-50, 60), st.floats(60, 90), st.floats(200, 30_000)),
        min_size=4,
        max_size=14,
    ),
    jobs=st.lists(job_st, max_size=4),
    wake_lost_s=st.sampled_from([0.0, 120.0, 600.0]),
    resume_s=st.sampled_from([0.0, 60.0, 600.0]),
    ckpt_s=st.sampled_from([0.0, 600.0, 1800.0]),
    events=st.booleans(),
)
def test_policy_and_settlement_charge_the_same_switching_costs(
    prices: list[float],
    jobs: list[tuple[JobClass, int, int, int]],
    wake_lost_s: float,
    resume_s: float,
    ckpt_s: float,
    events: bool,
) -> None:
    cfg = site_config(wake_lost_s=wake_lost_s, resume_s=resume_s, ckpt_s=ckpt_s)
    if events:
        # A mandatory cap from the third interval: SLA jobs may be shed too.
        from agent.backtest.engine import occupancy, with_events
        from drivers.grid.base import FailDirection, GridEvent, ProgramKind

        ev = GridEvent(
            event_id="e",
            source="test",
            program="p",
            kind=ProgramKind.EMERGENCY,
            start=T0.replace(minute=30),
            end=T0.replace(hour=2),
            max_site_kw=1.5,
            shed_kw=None,
            payment_usd_per_mwh=0.0,
            penalty_usd_per_mwh=0.0,
            fail=FailDirection.CURTAIL,
        )
    site = build_site(cfg, 2)
    n = len(prices)
    trace, used = [], 0
    for k, (cls, gpus, start, length) in enumerate(jobs):
        if used + gpus > 8 or start >= n:
            continue
        used += gpus
        trace.append(TraceJob(f"j{k}", cls, gpus, 0, start, min(n, start + length)))
    market = simple_market(prices, 48.0, start=T0)
    if events:
        market = with_events(market, [ev], site, occupancy(site, trace, n))
    plans: list[Plan] = []
    led = run_policy(site, market, trace, recording(plans))
    acts = [a for p in plans for a in p.actions]
    planned_lost = sum(a.switch_lost_usd for a in acts)
    planned_wh = sum(a.switch_energy_wh for a in acts)
    booked_lost = led.lost_work_usd + led.sla_penalty_usd + led.switching_lost_usd
    assert planned_lost == pytest.approx(booked_lost, rel=1e-9, abs=1e-9)
    assert planned_wh / 1e6 == pytest.approx(led.switching_energy_mwh, rel=1e-9, abs=1e-12)
    # Every switch the plans made is priced (a switch with a cost configured is never free).
    for a in acts:
        if a.kind is ActionKind.WAKE and wake_lost_s:
            assert a.switch_lost_usd > 0
        if a.kind is ActionKind.SLEEP:
            assert a.switch_energy_wh == 10.0 * 2  # a block of two miners


def test_the_policy_rides_through_a_spike_that_switching_would_cost_more_than_it_saves() -> None:
    """Waking to eco (2.48 kW over sleep, 90 TH/s at 48 $/PH/day: 0.18 $/h) is worth 72.6
    $/MWh, eco to run 40 $/MWh. One settled interval at 80: without switching costs the miners
    sleep through it. When a sleep draws 200 Wh (0.016 $ at 80 $/MWh, spread over the 15-minute
    commitment: 0.064 $/h, +25.8 $/MWh to keep eco) and a wake loses 5 minutes of hashing,
    they ride it through at eco. (The first interval has no price yet: safe mode sleeps
    everything; 20 $/MWh wakes them again even at the wake's cost, a third of every step's
    value: 48.4 and 26.7 $/MWh.)"""
    free = site_config(wake_lost_s=0.0, wake_wh=0.0, sleep_wh=0.0)
    costly = site_config(wake_lost_s=300.0, wake_wh=0.0, sleep_wh=200.0)
    prices = [20.0, 20.0, 80.0, 20.0, 20.0]
    for cfg, slept in ((free, True), (costly, False)):
        cfg = cfg.model_copy(update={"gpu_nodes": []})
        site = build_site(cfg, 4)
        led = run_policy(site, simple_market(prices, 48.0, start=T0), [], decide)
        assert led.mining_w[1] == 12_000.0
        assert (min(led.mining_w[1:]) < 1000) is slept
        assert (led.switching_usd > 0) is not slept or cfg is free
