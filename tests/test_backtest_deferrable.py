"""Deferrable training in the backtest: the trace's deferrable jobs, the day-ahead plan putting
their work into cheap hours, the deadline guard without a plan, and deadlines kept whatever
the prices (hypothesis), by the same policy and settlement as every other job.

The site is test_backtest's one miner plus one node of 8 H100s (700 W cap, 200 W minimum,
70 W idle, 1 kW host). A deferrable job of 8 GPUs earns the preemptible 2 USD/GPU-h while it
runs: about 3,175 USD/MWh of the 5 kW it adds, so the rule runs it at any ordinary price.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent.backtest.data import ClassMix, TraceJob, TraceSpec, job_trace
from agent.backtest.engine import (
    Market,
    Site,
    build_site,
    cheapest_runs,
    occupancy,
    run_always_on,
    run_oracle,
    run_policy,
    simple_market,
)
from agent.backtest.horizon import JOB_REPLAN_H, DayAheadPlanner
from agent.control.planner import deadline_reserve_s
from agent.control.policy import decide
from agent.control.site import min_throughput
from drivers.jobs.base import JobClass
from tests.test_backtest import T0, site_config

NODE = {
    "id": "n",
    "gpus": 8,
    "model": "H100-SXM",
    "min_cap_w": 200,
    "max_cap_w": 700,
    "idle_w": 70,
    "host_overhead_w": 1000,
}
IDLE_NODE_W = 1000 + 8 * 70


def gpu_site(**over: Any) -> Site:
    ai = {
        "preemptible": {"usd_per_gpu_hour": 2.0, "checkpoint_interval_s": 1800, "resume_s": 0},
        **over.pop("ai", {}),
    }
    return build_site(site_config(gpu_nodes=[NODE], ai=ai, **over), 1)


def deferrable(work_i: int, start_i: int = 0, end_i: int = 96, job_id: str = "d1") -> TraceJob:
    return TraceJob(job_id, JobClass.PREEMPTIBLE, 8, 0, start_i, end_i, work_i)


def day(prices: list[float], *, day_ahead: bool = True) -> Market:
    market = simple_market(prices, 48.0, start=T0)
    return replace(market, day_ahead=tuple(prices)) if day_ahead else market


def ran(ledger_ai_w: list[float]) -> list[int]:
    """The intervals in which the job ran (the node drew more than idle)."""
    return [i for i, w in enumerate(ledger_ai_w) if w > IDLE_NODE_W + 1.0]


def test_the_trace_places_deferrable_jobs_within_their_gpus_and_windows() -> None:
    spec = TraceSpec(deferrable=ClassMix(2.0, 4.0), deferrable_slack=3.0)
    n = 4 * 96
    trace = job_trace(7, n, 900.0, [64, 64], spec)
    jobs = [j for j in trace if j.deferrable]
    assert len(jobs) > 10
    for j in jobs:
        assert j.job_class is JobClass.PREEMPTIBLE
        assert 1 <= j.work_i <= j.end_i - j.start_i
    # No node is ever asked for more GPUs than it has, windows of deferrable jobs included.
    for i in range(n):
        for node in (0, 1):
            busy = sum(j.gpus for j in trace if j.node == node and j.start_i <= i < j.end_i)
            assert busy <= 64, (i, node, busy)
    # Without deferrable arrivals the other classes' trace is what it always was: the same 367
    # jobs, placed the same, as the trace before deferrable work (fingerprint taken from it).
    plain = job_trace(7, n, 900.0, [64, 64])
    assert not any(j.deferrable for j in plain)
    shape = [(j.job_id, j.job_class.value, j.gpus, j.node, j.start_i, j.end_i) for j in plain]
    assert len(plain) == 367
    assert hashlib.sha256(repr(shape).encode()).hexdigest()[:16] == "4b609c9f7786d69f"


def test_the_plan_puts_deferrable_work_into_the_cheap_hours() -> None:
    site = gpu_site()
    # The afternoon is cheap: 4 h of the job's 5 kW at 10 instead of 300 USD/MWh saves 5.85
    # USD, more than a pause costs (the plan prices half a 30-minute checkpoint interval of
    # its work lost, 4 USD, and no reload here).
    prices = [300.0] * 48 + [10.0] * 48
    market = day(prices)
    job = deferrable(16)  # 4 h of work, due by the end of the day
    planner = DayAheadPlanner(site, market)
    pol = run_policy(site, market, [job], decide, planner)
    on = run_always_on(site, market, occupancy(site, [job], len(market)))
    assert (pol.deferrable_jobs, pol.deferrable_done, pol.deadlines_missed) == (1, 1, 0)
    # Always-on runs it as it arrives; the policy in the 10 USD/MWh hours, as the plan said.
    assert ran(on.ai_w) == list(range(16))
    assert ran(pol.ai_w)
    assert min(ran(pol.ai_w)) >= 48
    # The same work and revenue, for less energy.
    assert pol.ai_usd == pytest.approx(on.ai_usd, rel=1e-6)
    assert sum(pol.ai_w) == pytest.approx(sum(on.ai_w), rel=1e-6)
    # The job's own energy (above the idle node) at 10 instead of 300 USD/MWh.
    job_cost = sum((w - IDLE_NODE_W) * p for w, p in zip(pol.ai_w, prices, strict=True))
    job_cost_on = sum((w - IDLE_NODE_W) * p for w, p in zip(on.ai_w, prices, strict=True))
    assert job_cost == pytest.approx(job_cost_on / 30, rel=1e-6)
    # The oracle's foresight puts the work in the cheapest intervals too.
    cheap = cheapest_runs([job], market, site)
    assert cheap == {"d1": tuple(range(48, 64))}
    oracle = run_oracle(site, market, occupancy(site, [job], len(market), cheap))
    assert min(ran(oracle.ai_w)) >= 48


def test_a_pause_that_costs_more_than_it_saves_is_not_planned() -> None:
    # At 100 then 10 USD/MWh, waiting saves 4 h × 5 kW × 90 = 1.8 USD, less than the 4 USD of
    # work a pause is expected to lose (agent.control.site.deferrable_jobs): the plan runs it
    # at once, like always-on, and nothing is suspended.
    site = gpu_site()
    market = day([100.0] * 48 + [10.0] * 48)
    # A price settled just before the day (else the safe mode prices the first interval).
    t0 = market.starts_s[0]
    market = replace(market, seen_price=((100.0, t0 - 900.0), *market.seen_price[1:]))
    job = deferrable(16)
    pol = run_policy(site, market, [job], decide, DayAheadPlanner(site, market))
    assert ran(pol.ai_w) == list(range(16))
    assert pol.interruptions == 0
    assert (pol.deferrable_done, pol.deadlines_missed) == (1, 0)


def test_without_a_plan_the_deadline_guard_runs_the_job_in_time() -> None:
    site = gpu_site()
    # 9,000 USD/MWh is above what the job earns even at its lowest cap (about 7,500 USD/MWh):
    # the rule suspends it (no day-ahead plan).
    prices = [9000.0] * 96
    job = deferrable(16)
    pol = run_policy(site, day(prices, day_ahead=False), [job], decide)
    assert (pol.deferrable_done, pol.deadlines_missed) == (1, 0)
    runs = ran(pol.ai_w)
    # Run while no price is known (safe mode prices 1,000), suspended once 9,000 is seen, then
    # run again in time for the deadline, at whatever cap.
    assert runs[:2] == [0, 1]
    assert not any(2 <= i < 40 for i in runs)
    assert max(runs) < 96


def test_an_ordinary_preemptible_job_at_that_price_is_not_run() -> None:
    site = gpu_site()
    job = TraceJob("p1", JobClass.PREEMPTIBLE, 8, 0, 0, 96)
    pol = run_policy(site, day([9000.0] * 96, day_ahead=False), [job], decide)
    # The same two intervals at the safe-mode price, then never again: no deadline, no guard.
    assert ran(pol.ai_w) == [0, 1]
    assert pol.deferrable_jobs == 0


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blocks=st.lists(
        st.sampled_from([-20.0, 10.0, 60.0, 400.0, 3000.0, 9000.0]), min_size=8, max_size=8
    ),
    jobs=st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 16), st.floats(1.0, 4.0)),
        min_size=1,
        max_size=3,
    ),
    planned=st.booleans(),
)
def test_deferrable_jobs_always_meet_their_deadline(
    blocks: list[float], jobs: list[tuple[int, int, float]], planned: bool
) -> None:
    """Whatever the prices (negative to 9,000 USD/MWh, in 3-hour blocks), plan or no plan,
    every deferrable job finishes its work by its deadline, when its deadline leaves the
    policy's reserve (as every trace's does: a tighter one is not a promise the agent makes)."""
    site = gpu_site()
    prices = [p for p in blocks for _ in range(12)]
    n = len(prices)
    frac = min_throughput(site.nodes[0])
    trace = []
    for k, (start, work, slack) in enumerate(jobs):
        reserve_i = math.ceil(deadline_reserve_s(8 * work * 0.25, 8, frac) / 900.0)
        end = start + max(round(work * slack), work + reserve_i)
        if end <= n:
            trace.append(deferrable(work, start, end, f"d{k}"))
    # One node of 8 GPUs: jobs that overlap would not fit together; keep them apart.
    trace.sort(key=lambda j: j.start_i)
    kept: list[TraceJob] = []
    for j in trace:
        if not kept or j.start_i >= kept[-1].end_i:
            kept.append(j)
    assume(kept)
    market = day(prices, day_ahead=planned)
    horizon = DayAheadPlanner(site, market) if planned else None
    pol = run_policy(site, market, kept, decide, horizon)
    assert pol.deadlines_missed == 0
    assert pol.deferrable_done == len(kept)


def test_work_that_arrives_after_the_days_plan_waits_for_the_next_plan() -> None:
    site = gpu_site()
    market = day([300.0] * 48 + [10.0] * 48)
    seen: list[tuple[str, ...]] = []
    planner = DayAheadPlanner(site, market)

    def spy(i: int, awake: Any, ai_w: float, jobs: Any = ()) -> Any:
        seen.append(tuple(j.job_id for j in jobs))
        return planner(i, awake, ai_w, jobs)

    pol = run_policy(site, market, [deferrable(16, 4, 96, "late")], decide, spy)
    assert seen[0] == ()
    assert seen[4] == ("late",)
    # It arrived an hour after the day's plan: the plan in force does not know it, so it waits
    # (it would run under the rule: 300 USD/MWh is far below its value), until the re-plan
    # JOB_REPLAN_H after the last plan places it in the cheap afternoon.
    assert planner.stats.replans == 1
    assert "late" not in planner.plans[0].job_ids
    assert "late" in planner.plans[1].job_ids
    assert planner.plans[1].at == T0 + timedelta(hours=JOB_REPLAN_H)
    assert min(ran(pol.ai_w)) >= 48
    assert (pol.deferrable_done, pol.deadlines_missed) == (1, 0)
