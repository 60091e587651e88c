"""Horizon planner: hand-solvable MILPs, hard deadlines (hypothesis), and failures that fall back.

The tiny site used throughout: one miner block of one unit that draws 1 MW and earns 100 USD/h
(hashprice 100, 24,000 TH/s, no pool fee: a value of 100 USD/MWh, standby 0 W), hourly intervals,
and a deferrable job of one 1 MW "GPU". Every expected figure below is worked out by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.domain import OperatingPoint
from agent.control.planner import (
    DEADLINE_MARGIN_S,
    DeferrableJob,
    HorizonInput,
    HorizonPlan,
    MinerBlock,
    PlanStatus,
    SwitchingCost,
    deadline_reserve_s,
    need_gpu_h,
    plan_horizon,
)

T0 = datetime(2023, 7, 1, tzinfo=UTC)
H = 3600.0
POINTS = (OperatingPoint("sleep", 0.0, 0.0), OperatingPoint("run", 1e6, 24_000.0))


def block(wake_lost_s: float = 0.0, count: int = 1, units_on: int | None = None) -> MinerBlock:
    # Top revenue 100 USD/h, so a wake that loses ``s`` seconds costs 100 × s / 3600 USD.
    return MinerBlock("M", count, POINTS, SwitchingCost(wake_lost_s=wake_lost_s), units_on)


def horizon(
    prices: Sequence[float],
    blocks: tuple[MinerBlock, ...] = (),
    jobs: tuple[DeferrableJob, ...] = (),
    **kw: object,
) -> HorizonInput:
    fields: dict[str, object] = {
        "at": T0,
        "starts": tuple(T0 + timedelta(hours=k) for k in range(len(prices))),
        "interval_s": H,
        "price_usd_per_mwh": tuple(prices),
        "hashprice_usd_per_ph_day": 100.0,
        "pool_fee": 0.0,
        "blocks": blocks,
        "limit_w": 10e6,
        "jobs": jobs,
    }
    fields.update(kw)
    return HorizonInput(**fields)  # type: ignore[arg-type]


def job(hours: float, deadline_h: float, **kw: object) -> DeferrableJob:
    fields: dict[str, object] = {
        "job_id": "train-1",
        "gpus": 1,
        "remaining_gpu_h": hours,
        "deadline": T0 + timedelta(hours=deadline_h),
        "gpu_w": 1e6,
    }
    fields.update(kw)
    return DeferrableJob(**fields)  # type: ignore[arg-type]


def units(plan: HorizonPlan) -> list[int]:
    return [row[0].units_on for row in plan.bands]


def runs(plan: HorizonPlan, k: int = 0) -> list[int]:
    return [t for t, row in enumerate(plan.job_run) if row[k]]


# --- hand-solvable cases -----------------------------------------------------------------


def test_a_spike_worth_more_than_a_cycle_is_curtailed() -> None:
    # Off in the 120 hour saves 20 USD; a cycle costs 100 × 360 / 3600 = 10 USD: curtail.
    plan = plan_horizon(horizon([50, 120, 50, 50], (block(wake_lost_s=360),)))
    assert plan.status is PlanStatus.OPTIMAL, plan.reason
    assert units(plan) == [1, 0, 1, 1]
    assert plan.wakes == 1
    assert plan.switching_usd == 10.0
    assert round(plan.objective_usd, 6) == 50 + 50 + 50 - 10


def test_a_spike_worth_less_than_a_cycle_is_ridden_through() -> None:
    # A cycle now costs 30 USD, more than the 20 USD the hour off saves: ride through.
    plan = plan_horizon(horizon([50, 120, 50, 50], (block(wake_lost_s=1080),)))
    assert plan.status is PlanStatus.OPTIMAL
    assert units(plan) == [1, 1, 1, 1]
    assert plan.wakes == 0
    assert round(plan.objective_usd, 6) == 50 - 20 + 50 + 50


def test_band_is_value_plus_cycle_cost_over_the_spike_length() -> None:
    # Value 100 USD/MWh; a cycle costs 10 USD; a 1 MW unit over a 0.25 h spike: margin 40.
    plan = plan_horizon(horizon([50, 50, 500, 500], (block(wake_lost_s=360),), spike_h=0.25))
    on, off = plan.bands[0][0], plan.bands[3][0]
    assert (on.units_on, off.units_on) == (1, 0)
    assert (on.curtail_above_usd_per_mwh, on.restore_below_usd_per_mwh) == (140.0, 100.0)
    assert (off.curtail_above_usd_per_mwh, off.restore_below_usd_per_mwh) == (100.0, 60.0)
    assert plan.band("M", T0 + timedelta(minutes=30)) == on
    assert plan.band("M", T0 + timedelta(hours=4)) is None  # past the plan: not used
    assert plan.band("other-model", T0) is None


def test_deferrable_job_goes_to_the_cheap_hours_with_one_resume() -> None:
    # 2 GPU-h by hour 4 among prices 50, 120, 50, 50: {2, 3} costs 100 + one start (5);
    # {0, 2} costs 100 + two starts (10).
    plan = plan_horizon(horizon([50, 120, 50, 50], jobs=(job(2, 4, resume_cost_usd=5),)))
    assert plan.status is PlanStatus.OPTIMAL
    assert runs(plan) == [2, 3]
    assert round(plan.objective_usd, 6) == -105
    assert plan.job_runs("train-1", T0 + timedelta(hours=2, minutes=10)) is True
    assert plan.job_runs("train-1", T0) is False
    assert plan.job_runs("not-planned", T0) is None


def test_a_running_job_keeps_running_into_its_deadline() -> None:
    # Running already, 2 GPU-h by hour 3: {0, 2} costs 100 + one resume, {0, 1} 170.
    plan = plan_horizon(
        horizon([50, 120, 50, 50], jobs=(job(2, 3, resume_cost_usd=5, running=True),))
    )
    assert runs(plan) == [0, 2]


def test_miners_and_deferrable_work_compete_for_the_interconnect() -> None:
    # 1.5 MW fits the miner or the job, not both. The job takes {2, 3} (100 USD of energy),
    # the miner earns 50 in hour 0 and sleeps from hour 1 (no wake): objective −50. Job in
    # {0, 2} with the miner back in hour 3: 50 − 100 − 10 = −60; any split using hour 1 pays
    # 120 for it and loses a miner hour: −80.
    plan = plan_horizon(
        horizon(
            [50, 120, 50, 50],
            (block(wake_lost_s=360),),
            (job(2, 4),),
            limit_w=1.5e6,
        )
    )
    assert plan.status is PlanStatus.OPTIMAL
    assert units(plan) == [1, 0, 0, 0]
    assert runs(plan) == [2, 3]
    assert round(plan.objective_usd, 6) == -50


def test_dwell_keeps_a_woken_unit_on() -> None:
    # Without dwell the unit would sleep in each 120 hour (cycle cost 0); a 2 h minimum on
    # time makes a wake at hour 1 commit to hour 2 as well.
    prices = [120, 50, 120, 50]
    free = plan_horizon(horizon(prices, (block(units_on=0),)))
    assert units(free) == [0, 1, 0, 1]
    held = plan_horizon(horizon(prices, (block(units_on=0),), min_on_s=2 * H))
    # Woken at hour 1 it must run hour 2 (−20) too: 50 − 20 + 50 = 80 beats waking at 3 (50).
    assert units(held) == [0, 1, 1, 1]
    assert round(held.objective_usd, 6) == 80


# --- failures fall back with a reason ----------------------------------------------------


def test_time_limit_zero_is_a_failed_plan_with_a_reason() -> None:
    plan = plan_horizon(horizon([50, 120, 50, 50], (block(360),), (job(2, 4),), time_limit_s=0.0))
    assert plan.status is PlanStatus.FAILED
    assert not plan.usable
    assert "time limit" in plan.reason.lower()
    assert plan.band("M", T0) is None  # the policy sees no band: today's rule


def test_bad_input_is_refused_with_one_line() -> None:
    plan = plan_horizon(horizon([50, float("nan"), 50, 50], (block(),)))
    assert plan.status is PlanStatus.BAD_INPUT
    assert plan.reason.startswith("planner input refused: price_usd_per_mwh holds nan")
    assert "\n" not in plan.reason
    short = plan_horizon(horizon([50, 60], (block(),), base_load_w=(1.0,)))
    assert short.status is PlanStatus.BAD_INPUT
    assert "base_load_w has 1 entries for 2 intervals" in short.reason


def test_impossible_deadline_runs_the_job_as_soon_as_possible_and_says_so() -> None:
    plan = plan_horizon(horizon([50, 120, 50, 50], (block(),), (job(3, 2),)))
    assert plan.status is PlanStatus.DEADLINE_INFEASIBLE
    assert plan.usable
    assert "train-1" in plan.reason
    assert "as soon as possible" in plan.reason
    assert runs(plan) == [0, 1, 2]


def test_only_the_job_that_cannot_make_it_runs_as_soon_as_possible() -> None:
    # "late" needs 3 hours by hour 2: impossible, so it runs from the start. "cheap" needs 1
    # hour by hour 4 and is still planned: into the 10 USD/MWh hour, not the first one.
    late = job(3, 2, job_id="late")
    cheap = job(1, 4, job_id="cheap")
    plan = plan_horizon(horizon([50, 120, 50, 10], (block(),), (late, cheap)))
    assert plan.status is PlanStatus.DEADLINE_INFEASIBLE
    assert "late" in plan.reason
    assert "cheap" not in plan.reason
    assert runs(plan, 0) == [0, 1, 2]
    assert runs(plan, 1) == [3]


def test_a_deadline_past_the_horizon_leaves_the_rest_to_the_next_plan() -> None:
    # 4 GPU-hours due 30 hours from now, a 4-hour horizon: the hours after it can do the work
    # (less the reserve), so nothing has to run now, and nothing does at these prices.
    far = job(4, 30)
    inp = horizon([50, 120, 50, 10], (block(),), (far,))
    assert need_gpu_h(inp, far) == 0.0
    assert runs(plan_horizon(inp)) == []
    # Due 8 hours from now, only 4 hours after the horizon, less a reserve of 0.4 h + 0.5 h:
    # 0.9 GPU-hours must run within it, in its cheapest hour.
    near = job(4, 8)
    inp = horizon([50, 120, 50, 10], (block(),), (near,))
    assert need_gpu_h(inp, near) == pytest.approx(4 - (4 - 0.4 - 0.5))
    assert runs(plan_horizon(inp)) == [3]
    assert deadline_reserve_s(4, 1) == pytest.approx(0.4 * 3600 + DEADLINE_MARGIN_S)
    # At half throughput (the lowest cap), the reserve covers running that slowly all the way.
    assert deadline_reserve_s(4, 1, 0.5) == pytest.approx((4 + 0.8) * 3600 + DEADLINE_MARGIN_S)


def test_pausing_work_due_past_the_horizon_is_charged_its_resume() -> None:
    # A running job due in 30 hours: nothing has to run within these 4 hours. Paused, it must be
    # resumed after them, which costs its resume whether or not that falls inside the plan.
    # At 1 MW, the 4 hours cost 230 USD: a 1,000 USD pause is dearer, a 10 USD one cheaper.
    dear = job(4, 30, running=True, resume_cost_usd=1000.0)
    plan = plan_horizon(horizon([50, 120, 50, 10], (block(),), (dear,)))
    assert runs(plan) == [0, 1, 2, 3]
    cheap = job(4, 30, running=True, resume_cost_usd=10.0)
    plan = plan_horizon(horizon([50, 120, 50, 10], (block(),), (cheap,)))
    assert runs(plan) == []
    # Work that all fits within the horizon may end paused without a resume to pay for.
    small = job(1, 30, running=True, resume_cost_usd=1000.0)
    plan = plan_horizon(horizon([50, 120, 50, 10], (block(),), (small,)))
    assert runs(plan) == [0]


def test_nothing_to_plan_is_an_empty_plan_not_a_solver_error() -> None:
    # A site with no miners and no deferrable work (GPU hosts only, before any job is seen).
    plan = plan_horizon(horizon([50, 120, 50]))
    assert plan.status is PlanStatus.OPTIMAL
    assert plan.usable
    assert plan.reason == "nothing to plan"
    assert plan.bands == ((), (), ())
    assert plan.job_runs("train-1", T0) is None


def test_no_room_for_the_job_even_asap_is_a_failed_plan() -> None:
    # Alone the job fits, but the base load leaves no room for it before hour 2.
    plan = plan_horizon(
        horizon([50, 50, 50, 50], jobs=(job(1, 2),), limit_w=1.5e6, base_load_w=(1e6,) * 4)
    )
    assert plan.status is PlanStatus.FAILED  # even ASAP does not fit the limit
    assert "no feasible plan" in plan.reason


# --- deadlines always hold (property) -----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    prices=st.lists(st.floats(-50, 500), min_size=4, max_size=24),
    specs=st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 24), st.integers(0, 24), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    free=st.integers(1, 16),
)
def test_deferrable_jobs_always_meet_their_deadline(
    prices: list[float], specs: list[tuple[int, int, int, bool]], free: int
) -> None:
    n = len(prices)
    jobs = []
    for k, (gpus, deadline_h, need_h, running) in enumerate(specs):
        deadline_h = min(deadline_h, n)
        jobs.append(
            DeferrableJob(
                job_id=f"j{k}",
                gpus=gpus,
                remaining_gpu_h=float(gpus * min(need_h, deadline_h)),
                deadline=T0 + timedelta(hours=deadline_h),
                gpu_w=700.0,
                resume_cost_usd=3.0,
                running=running,
            )
        )
    plan = plan_horizon(
        horizon(prices, (block(360, count=3),), tuple(jobs), free_gpus=(free,) * n, limit_w=5e6)
    )
    assert plan.usable, plan.reason
    if plan.status is PlanStatus.DEADLINE_INFEASIBLE:
        # Said so, and every job runs from the start without gaps until done or capacity ends.
        assert "as soon as possible" in plan.reason
        return
    for k, j in enumerate(jobs):
        done = sum(j.gpus for t in range(n) if plan.job_run[t][k] and plan.starts[t] < j.deadline)
        assert done >= j.remaining_gpu_h - 1e-9, (j, plan.job_run)
    for t in range(n):
        used = sum(j.gpus for k, j in enumerate(jobs) if plan.job_run[t][k])
        assert used <= free


@settings(max_examples=25, deadline=None)
@given(
    prices=st.lists(st.floats(-50, 500), min_size=2, max_size=24),
    specs=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 24)), min_size=1, max_size=4),
)
def test_jobs_that_fit_alone_in_unlimited_gpus_are_always_planned_in_time(
    prices: list[float], specs: list[tuple[int, int]]
) -> None:
    n = len(prices)
    jobs = tuple(
        job(float(g * min(d, n) // 2), min(d, n), job_id=f"j{k}", gpus=g)
        for k, (g, d) in enumerate(specs)
    )
    plan = plan_horizon(horizon(prices, jobs=jobs, limit_w=1e12))
    assert plan.status is PlanStatus.OPTIMAL, plan.reason
    for k, j in enumerate(jobs):
        done = sum(j.gpus for t in range(n) if plan.job_run[t][k] and plan.starts[t] < j.deadline)
        assert done >= j.remaining_gpu_h


def test_the_real_time_price_so_far_replaces_the_first_forecast() -> None:
    # The forecast said 50 for this hour; real time settled at 500: sleeping the hour saves
    # 400 USD against a 10 USD cycle, so the plan sleeps now and wakes for the next hour.
    prices = [50, 50, 50]
    assert units(plan_horizon(horizon(prices, (block(360),)))) == [1, 1, 1]
    plan = plan_horizon(horizon(prices, (block(360),), realtime_usd_per_mwh=500.0))
    assert units(plan) == [0, 1, 1]
    bad = plan_horizon(horizon(prices, (block(360),), realtime_usd_per_mwh=float("inf")))
    assert bad.status is PlanStatus.BAD_INPUT
    assert "realtime_usd_per_mwh holds inf" in bad.reason
