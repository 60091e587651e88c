"""Dispatch policy: tables of situations and the plans they must give.

Every case builds a real Snapshot and AgentConfig, calls the pure ``decide()`` and asserts on the
plan's operating points, job states, caps, actions and reasons. Numbers used below:
hashprice 55 USD/PH/day with no pool fee puts an S19j Pro (104 TH/s at 3,068 W) at 77.7 USD/MWh
and an S21 (200 TH/s at 3,500 W) at 131 USD/MWh; an H100 job at 2 USD/GPU-h is worth thousands.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.control.config import (
    AgentConfig,
    CircuitConfig,
    ConstantPriceConfig,
    ControlConfig,
    EconomicsConfig,
    FourCpConfig,
    GridConfig,
    PricesConfig,
    SiteConfig,
)
from agent.control.domain import (
    SLEEP,
    Action,
    ActionKind,
    ActiveEvent,
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    Plan,
    PriceView,
    Snapshot,
)
from agent.control.policy import cap_levels_w, decide
from agent.control.settlement import (
    event_target_w,
    fourcp_adder_usd_per_mwh,
    fourcp_step_adders,
)
from drivers.grid.base import GridEvent, ProgramKind
from drivers.jobs.base import JobClass, JobState

T0 = datetime(2023, 9, 6, 20, 0, tzinfo=UTC)
LONG_AGO = T0 - timedelta(hours=3)
HASHPRICE = 55.0

S19 = (
    OperatingPoint(SLEEP, 30.0),
    OperatingPoint("stock", 3068.0, 104.0),
)
S21 = (
    OperatingPoint(SLEEP, 25.0),
    OperatingPoint("stock", 3500.0, 200.0),
)
# A ladder with a down-clocked profile: the eco step is worth more per MWh than the top step.
S21_LADDER = (
    OperatingPoint(SLEEP, 25.0),
    OperatingPoint("eco", 2500.0, 160.0),
    OperatingPoint("stock", 3500.0, 200.0),
)
MODELS = {"S19jPro": S19, "S21": S21, "S21-ladder": S21_LADDER}
RATES = {JobClass.SLA: 2.5, JobClass.PREEMPTIBLE: 2.0, JobClass.FILLER: 0.6}


def config(
    limit_kw: float = 1000.0,
    *,
    margin_kw: float = 0.0,
    circuits: Sequence[CircuitConfig] = (),
    fourcp: FourCpConfig | None = None,
    **control: Any,
) -> AgentConfig:
    controls: dict[str, Any] = {"hysteresis_usd_per_mwh": 5.0, "min_on_s": 300, "min_off_s": 300}
    controls.update(control)
    safe_mode = controls.pop("safe_mode", "curtail")
    return AgentConfig(
        site=SiteConfig(
            id="test",
            interconnect_limit_kw=limit_kw,
            safety_margin_kw=margin_kw,
            circuits=list(circuits),
        ),
        control=ControlConfig(**controls),
        economics=EconomicsConfig(pool_fee=0.0),
        prices=PricesConfig(
            realtime=ConstantPriceConfig(type="constant", value=0.0), safe_mode=safe_mode
        ),
        grid=GridConfig(fourcp=fourcp or FourCpConfig()),
    )


def miner(
    device_id: str,
    model: str = "S21",
    commanded: str = "stock",
    since: datetime = LONG_AGO,
    **kw: Any,
) -> MinerView:
    points = MODELS[model]
    return MinerView(
        device_id=device_id,
        model=model,
        points=points,
        nameplate_w=points[-1].power_w,
        commanded=commanded,
        commanded_since=since,
        **kw,
    )


def job(
    job_id: str,
    job_class: JobClass,
    state: JobState = JobState.RUNNING,
    gpus: int = 8,
    since: datetime = LONG_AGO,
    checkpoint: datetime | None = T0,
    **kw: Any,
) -> JobView:
    return JobView(
        job_id=job_id,
        job_class=job_class,
        state=state,
        gpus=gpus,
        node_id=None,
        usd_per_gpu_hour=kw.pop("rate", RATES[job_class]),
        penalty_usd=kw.pop("penalty", 500.0 if job_class == JobClass.SLA else 0.0),
        commanded_since=since,
        last_checkpoint_at=checkpoint,
        **kw,
    )


def node(device_id: str, *jobs: JobView, cap_w: float = 700.0, **kw: Any) -> GpuNodeView:
    fields: dict[str, Any] = {
        "gpu_count": 8,
        "min_cap_w": 200.0,
        "max_cap_w": 700.0,
        "idle_w": 70.0,
        "host_overhead_w": 500.0,
    }
    fields.update(kw)
    return GpuNodeView(device_id=device_id, cap_w=cap_w, jobs=tuple(jobs), **fields)


def snapshot(
    price: float | None = 30.0,
    miners: Sequence[MinerView] = (),
    nodes: Sequence[GpuNodeView] = (),
    *,
    age_s: float = 60.0,
    events: Sequence[ActiveEvent] = (),
    **kw: Any,
) -> Snapshot:
    return Snapshot(
        at=T0,
        price=None if price is None else PriceView(price, T0, age_s),
        hashprice_usd_per_ph_day=HASHPRICE,
        miners=tuple(miners),
        gpu_nodes=tuple(nodes),
        events=tuple(events),
        **kw,
    )


def event(
    kind: ProgramKind,
    *,
    max_kw: float | None = None,
    shed_kw: float | None = None,
    baseline_w: float = 0.0,
    payment: float = 0.0,
    event_id: str = "ev1",
) -> ActiveEvent:
    return ActiveEvent(
        GridEvent(
            event_id=event_id,
            source="test",
            program="p",
            kind=kind,
            start=T0 - timedelta(minutes=5),
            end=T0 + timedelta(hours=1),
            max_site_kw=max_kw,
            shed_kw=shed_kw,
            payment_usd_per_mwh=payment,
        ),
        baseline_w=baseline_w,
    )


def actions_for(plan: Plan, device_id: str) -> list[Action]:
    return [a for a in plan.actions if a.device_id == device_id]


def count_at(plan: Plan, point: str) -> int:
    return sum(1 for p in plan.miner_points.values() if p == point)


# --- miners: price, hysteresis, dwell -------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "commanded", "price", "expected", "kind"),
    [
        # S19j Pro breakeven 77.7 $/MWh, hysteresis 5 $/MWh.
        ("S19jPro", SLEEP, 70.0, "stock", ActionKind.WAKE),  # below breakeven - 5: wake
        ("S19jPro", SLEEP, 75.0, SLEEP, None),  # within hysteresis: stays asleep
        ("S19jPro", "stock", 80.0, "stock", None),  # within hysteresis: keeps running
        ("S19jPro", "stock", 85.0, SLEEP, ActionKind.SLEEP),  # above breakeven + 5: sleep
        ("S21", "stock", 125.0, "stock", None),  # S21 breakeven 131
        ("S21", "stock", 140.0, SLEEP, ActionKind.SLEEP),
        ("S21", SLEEP, -20.0, "stock", ActionKind.WAKE),  # negative prices are valid
    ],
)
def test_price_against_breakeven_with_hysteresis(
    model: str, commanded: str, price: float, expected: str, kind: ActionKind | None
) -> None:
    plan = decide(snapshot(price, [miner("m1", model, commanded)]), config(), T0)
    assert plan.miner_points == {"m1": expected}
    acts = actions_for(plan, "m1")
    assert [a.kind for a in acts] == ([] if kind is None else [kind])
    if kind is ActionKind.SLEEP:
        assert f"price {price:,.2f} $/MWh above the value" in acts[0].reason
        assert acts[0].delta_power_w == pytest.approx(
            MODELS[model][0].power_w - 3068.0 if model == "S19jPro" else 25.0 - 3500.0
        )
    if kind is ActionKind.WAKE:
        assert "its value beats the price" in acts[0].reason


@pytest.mark.parametrize(
    ("commanded", "held_s", "price", "expected"),
    [
        ("stock", 60, 500.0, "stock"),  # minimum on time keeps it running through a spike
        ("stock", 400, 500.0, SLEEP),
        (SLEEP, 60, 10.0, SLEEP),  # minimum off time keeps it asleep
        (SLEEP, 400, 10.0, "stock"),
    ],
)
def test_minimum_on_and_off_times(commanded: str, held_s: int, price: float, expected: str) -> None:
    m = miner("m1", "S21", commanded, since=T0 - timedelta(seconds=held_s))
    plan = decide(snapshot(price, [m]), config(), T0)
    assert plan.miner_points["m1"] == expected
    assert bool(plan.actions) == (expected != commanded)


def test_limit_overrides_minimum_on_time() -> None:
    m = miner("m1", "S21", "stock", since=T0 - timedelta(seconds=10))
    plan = decide(snapshot(10.0, [m]), config(limit_kw=2.0), T0)
    assert plan.miner_points["m1"] == SLEEP
    assert "interconnect limit 2.0 kW reached" in plan.actions[0].reason
    assert plan.planned_power_w == pytest.approx(25.0)


def test_interconnect_limit_runs_the_most_efficient_first() -> None:
    miners = [miner(f"a{i}", "S21", SLEEP) for i in range(10)]
    miners += [miner(f"b{i}", "S19jPro", SLEEP) for i in range(10)]
    plan = decide(snapshot(20.0, miners), config(limit_kw=50.0), T0)
    # Sleep floor 550 W, then all ten S21 (3,475 W each) and four S19 (3,038 W each).
    assert all(plan.miner_points[f"a{i}"] == "stock" for i in range(10))
    assert sum(plan.miner_points[f"b{i}"] == "stock" for i in range(10)) == 4
    assert plan.planned_power_w == pytest.approx(550 + 10 * 3475 + 4 * 3038)
    assert plan.planned_power_w <= plan.limit_w
    assert plan.binding[0] == "interconnect"
    assert plan.limit_w == 50_000.0


def test_safety_margin_lowers_the_limit() -> None:
    miners = [miner(f"a{i}", "S21", SLEEP) for i in range(4)]
    plan = decide(snapshot(20.0, miners), config(limit_kw=11.0, margin_kw=1.0), T0)
    assert plan.limit_w == 10_000.0
    assert count_at(plan, "stock") == 2  # 100 W floor + 2 × 3,475 W; a third would be 10.5 kW


def test_mixed_efficiencies_between_breakevens() -> None:
    miners = [miner("old", "S19jPro"), miner("new", "S21")]
    plan = decide(snapshot(100.0, miners), config(), T0)
    assert plan.miner_points == {"old": SLEEP, "new": "stock"}
    assert [a.device_id for a in plan.actions] == ["old"]


def test_profile_ladder_down_clocks_before_sleeping() -> None:
    # eco: 160 TH/s at 2,500 W = 147 $/MWh; eco -> stock: 40 TH/s for 1,000 W = 92 $/MWh.
    plan = decide(snapshot(110.0, [miner("m1", "S21-ladder", "stock")]), config(), T0)
    assert plan.miner_points["m1"] == "eco"
    (act,) = plan.actions
    assert act.kind is ActionKind.SET_PROFILE
    assert act.delta_power_w == pytest.approx(-1000.0)


def test_blocks_of_miners_count_every_unit() -> None:
    block = miner("blk", "S21", SLEEP, count=100)
    plan = decide(snapshot(20.0, [block]), config(limit_kw=200.0), T0)
    # A block moves as one view; it fits only when all of its 100 units fit.
    assert plan.miner_points["blk"] == SLEEP
    assert plan.planned_power_w == pytest.approx(2500.0)
    plan = decide(snapshot(20.0, [block]), config(limit_kw=400.0), T0)
    assert plan.miner_points["blk"] == "stock"
    assert plan.planned_power_w == pytest.approx(350_000.0)
    assert plan.value_usd_per_h == pytest.approx(100 * 200 / 1000 * HASHPRICE / 24)


# --- miners and GPUs in one merit order -----------------------------------------------------


def test_price_between_mining_and_ai_values_sheds_miners_only() -> None:
    miners = [miner(f"m{i}", "S21") for i in range(5)]
    nodes = [
        node("g1", job("sla1", JobClass.SLA)),
        node("g2", job("pre1", JobClass.PREEMPTIBLE)),
    ]
    plan = decide(snapshot(1000.0, miners, nodes), config(), T0)
    assert count_at(plan, SLEEP) == 5
    assert plan.job_states == {"sla1": JobState.RUNNING, "pre1": JobState.RUNNING}
    kinds = {a.kind for a in plan.actions}
    assert ActionKind.SUSPEND_JOB not in kinds
    # The top cap steps are worth less than 1,000 $/MWh: caps come down, jobs keep running.
    assert plan.gpu_caps_w["g2"] < 700.0
    cap_actions = [a for a in plan.actions if a.kind is ActionKind.SET_GPU_CAP]
    assert {a.device_id for a in cap_actions} == {"g1", "g2"}
    assert all("(lower)" in a.reason for a in cap_actions)


@pytest.mark.parametrize(
    ("price", "cap_w"),
    [
        (30.0, 700.0),
        # With 100 W rungs the marginal value of 600 -> 700 W for a 2 $/GPU-h job is
        # 2 × (1 − (1 − 6/7)²... ) ≈ 408 $/MWh and of 500 -> 600 W ≈ 1,224 $/MWh.
        (500.0, 600.0),
        (1500.0, 500.0),
    ],
)
def test_caps_follow_the_concave_throughput_curve(price: float, cap_w: float) -> None:
    plan = decide(snapshot(price, [], [node("g1", job("p", JobClass.PREEMPTIBLE))]), config(), T0)
    assert plan.gpu_caps_w["g1"] == cap_w
    assert plan.job_states["p"] is JobState.RUNNING


def test_caps_are_lowered_before_jobs_stop() -> None:
    n = node("g1", job("p", JobClass.PREEMPTIBLE))
    plan = decide(snapshot(5000.0, [], [n]), config(), T0)
    # Running at the 200 W floor is worth 2 × 0.49 / 130 W ≈ 7,540 $/MWh: above 5,000.
    assert plan.job_states["p"] is JobState.RUNNING
    assert plan.gpu_caps_w["g1"] == 200.0
    (act,) = plan.actions
    assert act.kind is ActionKind.SET_GPU_CAP
    assert act.target == "200"
    assert act.delta_power_w == pytest.approx(8 * (200 - 700))


def test_preemptible_job_suspended_when_price_beats_its_value() -> None:
    nodes = [node("g1", job("p", JobClass.PREEMPTIBLE)), node("g2", job("s", JobClass.SLA))]
    plan = decide(snapshot(9000.0, [], nodes), config(), T0)
    assert plan.job_states == {"p": JobState.SUSPENDED, "s": JobState.RUNNING}
    (suspend,) = [a for a in plan.actions if a.kind is ActionKind.SUSPEND_JOB]
    assert suspend.job_id == "p"
    assert suspend.delta_power_w == pytest.approx(-8 * (700 - 70))
    assert "price 9,000.00 $/MWh above the value" in suspend.reason
    assert "0.00 $ of work since its checkpoint" in suspend.reason


def test_lost_work_since_checkpoint_keeps_a_job_running() -> None:
    fresh = node("g1", job("fresh", JobClass.PREEMPTIBLE, checkpoint=T0))
    stale = node("g2", job("stale", JobClass.PREEMPTIBLE, checkpoint=T0 - timedelta(hours=3)))
    plan = decide(snapshot(9000.0, [], [fresh, stale]), config(), T0)
    # 8 GPUs × 2 $/h × 3 h = 48 $ lost, against 9,000 − 7,540 $/MWh × 1 kW × 5 min: keep it.
    assert plan.job_states == {"fresh": JobState.SUSPENDED, "stale": JobState.RUNNING}
    assert plan.gpu_caps_w["g2"] == 200.0


def test_filler_runs_only_on_power_nothing_better_wants() -> None:
    nodes = [node("g1", job("f", JobClass.FILLER)), node("g2", job("p", JobClass.PREEMPTIBLE))]
    plan = decide(snapshot(30.0, [], nodes), config(limit_kw=7.2), T0)
    # Floors 2 × 1,060 W. The preemptible job takes its rungs down to 500 -> 600 W
    # (1,224 $/MWh), which is worth less than the filler's first rung (0.6 × 0.49 / 130 W =
    # 2,261 $/MWh); the filler gets that rung and nothing more.
    assert plan.job_states == {"f": JobState.RUNNING, "p": JobState.RUNNING}
    assert plan.gpu_caps_w == {"g1": 200.0, "g2": 500.0}
    assert plan.planned_power_w == pytest.approx(2 * 1060 + 8 * 430 + 8 * 130)
    # With no room for both, the filler waits.
    plan = decide(snapshot(30.0, [], nodes), config(limit_kw=5.0), T0)
    assert plan.job_states == {"f": JobState.SUSPENDED, "p": JobState.RUNNING}
    (act,) = [a for a in plan.actions if a.job_id == "f"]
    assert "interconnect limit 5.0 kW reached" in act.reason


def test_sla_jobs_kept_without_a_mandatory_event_even_when_infeasible() -> None:
    nodes = [node("g1", job("s", JobClass.SLA)), node("g2", job("p", JobClass.PREEMPTIBLE))]
    ev = event(ProgramKind.FOUR_CP, max_kw=2.5)
    plan = decide(snapshot(30.0, [], nodes, events=[ev]), config(), T0)
    assert plan.job_states == {"s": JobState.RUNNING, "p": JobState.SUSPENDED}
    assert "infeasible" in plan.summary
    assert "SLA jobs kept: no mandatory event" in plan.summary
    assert plan.gpu_caps_w["g1"] == 200.0


@pytest.mark.parametrize(
    ("max_kw", "sla", "pre", "sla_cap", "pre_cap"),
    [
        # Floors: 10 sleeping S19 300 W, two empty nodes 1,060 W each = 2,420 W.
        # Each job at the 200 W cap adds 1,040 W; each 100 W of cap on 8 GPUs adds 800 W.
        (6.0, JobState.RUNNING, JobState.RUNNING, 300.0, 200.0),  # caps down, miners asleep
        (3.5, JobState.RUNNING, JobState.SUSPENDED, 200.0, 700.0),  # preemptible goes next
        (2.5, JobState.SUSPENDED, JobState.SUSPENDED, 700.0, 700.0),  # SLA last of all
    ],
)
def test_mandatory_event_sheds_miners_then_preemptible_then_sla(
    max_kw: float,
    sla: JobState,
    pre: JobState,
    sla_cap: float,
    pre_cap: float,
) -> None:
    miners = [miner(f"m{i}", "S19jPro") for i in range(10)]
    nodes = [node("g1", job("s", JobClass.SLA)), node("g2", job("p", JobClass.PREEMPTIBLE))]
    ev = event(ProgramKind.EMERGENCY, max_kw=max_kw)
    plan = decide(snapshot(30.0, miners, nodes, events=[ev]), config(), T0)
    assert count_at(plan, SLEEP) == 10
    assert plan.job_states == {"s": sla, "p": pre}
    assert plan.gpu_caps_w == {"g1": sla_cap, "g2": pre_cap}
    assert plan.planned_power_w <= max_kw * 1000
    assert plan.binding[0] == "event:ev1"
    for a in plan.actions:
        if a.kind is ActionKind.SUSPEND_JOB and a.job_id == "s":
            assert a.reason.startswith("SLA job shed last for a mandatory event")
            assert "event:ev1 limit 2.5 kW reached" in a.reason
    # Sheds come before anything else, miners included.
    assert all(a.sheds for a in plan.actions)


def test_event_shed_target_from_baseline() -> None:
    ev = event(ProgramKind.OVERRIDE, shed_kw=7.0, baseline_w=17_500.0)
    assert event_target_w(ev.event, ev.baseline_w) == pytest.approx(10_500.0)
    miners = [miner(f"m{i}", "S21") for i in range(5)]
    plan = decide(snapshot(30.0, miners, events=[ev]), config(margin_kw=0.5), T0)
    assert plan.limit_w == pytest.approx(10_000.0)
    assert count_at(plan, "stock") == 2
    sleeps = [a for a in plan.actions if a.kind is ActionKind.SLEEP]
    assert len(sleeps) == 3
    assert all("event:ev1 limit 10.0 kW reached" in a.reason for a in sleeps)


def test_conflicting_events_the_stricter_wins() -> None:
    miners = [miner(f"m{i}", "S21") for i in range(5)]
    evs = [
        event(ProgramKind.EMERGENCY, max_kw=14.0, event_id="a"),
        event(ProgramKind.OVERRIDE, max_kw=7.5, event_id="b"),
    ]
    plan = decide(snapshot(30.0, miners, events=evs), config(), T0)
    assert plan.binding[0] == "event:b"
    assert count_at(plan, "stock") == 2


@pytest.mark.parametrize(
    ("payment", "accepted", "running"),
    [
        # Each shed S21 loses (131 − 30) $/MWh of margin.
        (50.0, False, 10),
        (200.0, True, 1),
    ],
)
def test_economic_event_opt_in_only_when_it_pays(
    payment: float, accepted: bool, running: int
) -> None:
    miners = [miner(f"m{i:02d}", "S21") for i in range(10)]
    ev = event(ProgramKind.ECONOMIC, max_kw=5.0, baseline_w=35_000.0, payment=payment)
    plan = decide(snapshot(30.0, miners, events=[ev]), config(), T0)
    assert count_at(plan, "stock") == running
    if accepted:
        assert "economic event ev1 accepted" in plan.summary
        assert plan.binding[0] == "event:ev1"
        assert plan.planned_power_w <= 5000.0
    else:
        assert "economic event ev1 declined" in plan.summary
        assert plan.binding[0] == "interconnect"
        assert plan.actions == ()


# --- 4CP ------------------------------------------------------------------------------------


def test_fourcp_adder_formula() -> None:
    # 0.5 × 60 $/kW-year / 4 peaks = 7.5 $ per kW held through a 0.25 h interval.
    assert fourcp_adder_usd_per_mwh(60.0, 0.5) == pytest.approx(7.5 / 0.00025)
    assert fourcp_adder_usd_per_mwh(60.0, 0.0) == 0.0


@pytest.mark.parametrize(("risk", "curtailed"), [(0.3, False), (0.6, True)])
def test_fourcp_curtailment_explained(risk: float, curtailed: bool) -> None:
    fourcp = FourCpConfig(enabled=True, rate_usd_per_kw_year=60.0, risk_threshold=0.5)
    miners = [miner(f"m{i}", "S21") for i in range(3)]
    nodes = [node("g1", job("p", JobClass.PREEMPTIBLE)), node("g2", job("s", JobClass.SLA))]
    snap = snapshot(30.0, miners, nodes, fourcp_risk=risk, fourcp_reason="system load 78 GW")
    plan = decide(snap, config(fourcp=fourcp), T0)
    if not curtailed:
        assert plan.actions == ()
        assert plan.effective_price_usd_per_mwh == 30.0
        return
    assert plan.effective_price_usd_per_mwh == pytest.approx(30.0 + 0.6 * 60 * 1000)
    assert count_at(plan, SLEEP) == 3
    assert plan.job_states == {"p": JobState.SUSPENDED, "s": JobState.RUNNING}
    assert "4cp" in plan.binding
    assert "4CP curtailment" in plan.summary
    sheds = [a for a in plan.actions if a.kind in (ActionKind.SLEEP, ActionKind.SUSPEND_JOB)]
    assert len(sheds) == 4
    for a in sheds:
        assert "4CP risk 60% (system load 78 GW)" in a.reason


def test_fourcp_risk_calibrated_by_hit_rate_keeps_paid_training() -> None:
    # The estimator flags ~80 intervals per true peak: at hit rate 1.25 % a flag at risk 1 is a
    # 1.25 % chance of a peak, 0.0125 × 60 × 1000 = 750 $/MWh. Miners (131 $/MWh) go; training
    # at 2 $/GPU-h (2,857 $/MWh of GPU power) keeps running: its margin beats its 4CP cost.
    fourcp = FourCpConfig(enabled=True, rate_usd_per_kw_year=60.0, hit_rate=0.0125)
    miners = [miner(f"m{i}", "S21") for i in range(3)]
    nodes = [node("g1", job("p", JobClass.PREEMPTIBLE))]
    snap = snapshot(30.0, miners, nodes, fourcp_risk=1.0, fourcp_reason="system load 80 GW")
    plan = decide(snap, config(fourcp=fourcp), T0)
    assert plan.effective_price_usd_per_mwh == pytest.approx(30.0 + 750.0)
    assert count_at(plan, SLEEP) == 3
    assert plan.job_states.get("p", JobState.RUNNING) == JobState.RUNNING
    (shed, *_) = [a for a in plan.actions if a.kind == ActionKind.SLEEP]
    assert "peak probability 1.25%" in shed.reason
    # Taken at its word (hit rate 1) the same flag suspends the training too.
    plan = decide(snap, config(fourcp=fourcp.model_copy(update={"hit_rate": 1.0})), T0)
    assert plan.job_states["p"] == JobState.SUSPENDED


def test_fourcp_step_adders_share_the_policys_priced_risk() -> None:
    fourcp = FourCpConfig(enabled=True, rate_usd_per_kw_year=60.0, hit_rate=0.0125)
    # The hour now starting holds the flagged 15-minute interval: a quarter of its adder.
    assert fourcp_step_adders(fourcp, 1.0, 3, 3600.0) == pytest.approx((750.0 / 4, 0.0, 0.0))
    assert fourcp_step_adders(fourcp, 1.0, 2, 900.0) == pytest.approx((750.0, 0.0))
    assert fourcp_step_adders(fourcp, 0.3, 3, 3600.0) == ()  # below the threshold
    assert fourcp_step_adders(FourCpConfig(), 1.0, 3, 3600.0) == ()  # 4CP off


def test_fourcp_disabled_ignores_risk() -> None:
    plan = decide(snapshot(30.0, [miner("m1")], fourcp_risk=1.0), config(), T0)
    assert plan.actions == ()


# --- circuits and ramp ------------------------------------------------------------------------


def test_circuit_limit() -> None:
    circuits = [CircuitConfig(id="rowA", limit_kw=10.0, parent="main"),
                CircuitConfig(id="main", limit_kw=100.0)]  # fmt: skip
    miners = [miner(f"a{i}", "S21", SLEEP, circuit="rowA") for i in range(5)]
    miners += [miner(f"b{i}", "S19jPro", SLEEP) for i in range(2)]
    plan = decide(snapshot(20.0, miners), config(circuits=circuits), T0)
    # rowA: 125 W floor, two S21 (3,475 W each) fit under 10 kW, a third does not.
    assert sum(plan.miner_points[f"a{i}"] == "stock" for i in range(5)) == 2
    assert plan.miner_points["b0"] == plan.miner_points["b1"] == "stock"
    assert "circuit:rowA" in plan.binding


def test_parent_circuit_limit_binds_children() -> None:
    circuits = [CircuitConfig(id="rowA", limit_kw=20.0, parent="main"),
                CircuitConfig(id="rowB", limit_kw=20.0, parent="main"),
                CircuitConfig(id="main", limit_kw=8.0)]  # fmt: skip
    miners = [miner("a0", "S21", circuit="rowA"), miner("a1", "S21", circuit="rowA"),
              miner("b0", "S21", circuit="rowB")]  # fmt: skip
    plan = decide(snapshot(20.0, miners), config(), T0)
    assert count_at(plan, "stock") == 3  # no circuits configured: no circuit limit
    plan = decide(snapshot(20.0, miners), config(circuits=circuits), T0)
    assert count_at(plan, "stock") == 2
    (act,) = plan.actions
    assert "circuit main limit 8.0 kW reached" in act.reason
    assert "circuit:main" in plan.binding


def test_gpu_nodes_respect_their_circuit() -> None:
    circuits = [CircuitConfig(id="hall", limit_kw=5.0)]
    n = node("g1", job("p", JobClass.PREEMPTIBLE), circuit="hall")
    plan = decide(snapshot(30.0, [], [n]), config(circuits=circuits), T0)
    # 500 W host + 8 GPUs × cap ≤ 5 kW: cap 500 W (4.5 kW); 600 W would be 5.3 kW.
    assert plan.gpu_caps_w["g1"] == 500.0
    assert plan.planned_power_w == pytest.approx(4500.0)


@pytest.mark.parametrize(("ramp_w", "miners_on"), [(8000.0, 0), (9000.0, 1), (12_000.0, 2)])
def test_ramp_limit_restores_gradually_most_valuable_first(ramp_w: float, miners_on: int) -> None:
    miners = [miner(f"m{i}", "S21", SLEEP) for i in range(4)]
    nodes = [node("g1", job("p", JobClass.PREEMPTIBLE, state=JobState.SUSPENDED))]
    plan = decide(snapshot(20.0, miners, nodes, ramp_headroom_w=ramp_w), config(), T0)
    # The job (8 × 630 W = 5,040 W at full cap) comes back before any miner (3,475 W each).
    assert plan.job_states["p"] is JobState.RUNNING
    assert plan.gpu_caps_w["g1"] == 700.0
    assert count_at(plan, "stock") == miners_on
    increases = sum(a.delta_power_w for a in plan.actions if a.delta_power_w > 0)
    assert increases == pytest.approx(5040.0 + miners_on * 3475.0)
    assert increases <= ramp_w
    assert "ramp" in plan.binding
    woken = [a for a in plan.actions if a.kind is ActionKind.WAKE]
    assert all("(partly: ramp limit" in a.reason for a in woken)


def test_ramp_limit_applies_to_gpu_caps() -> None:
    n = node("g1", job("p", JobClass.PREEMPTIBLE), cap_w=300.0)
    plan = decide(snapshot(20.0, [], [n], ramp_headroom_w=900.0), config(), T0)
    assert plan.gpu_caps_w["g1"] == 400.0
    (act,) = plan.actions
    assert act.kind is ActionKind.SET_GPU_CAP
    assert "ramp limit: 0.9 kW more this cycle" in act.reason
    assert act.delta_power_w == pytest.approx(800.0)


def test_ramp_limit_does_not_block_sheds() -> None:
    miners = [miner(f"m{i}", "S21") for i in range(3)]
    plan = decide(snapshot(500.0, miners, ramp_headroom_w=0.0), config(), T0)
    assert count_at(plan, SLEEP) == 3


# --- safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("price", [None, 20.0])
def test_safe_mode_curtail_on_stale_or_missing_price(price: float | None) -> None:
    miners = [miner("m1", "S21")]
    nodes = [node("g1", job("p", JobClass.PREEMPTIBLE))]
    plan = decide(snapshot(price, miners, nodes, age_s=4000.0), config(), T0)
    assert "safe mode, pricing at 1000 $/MWh" in plan.summary
    assert plan.effective_price_usd_per_mwh == 1000.0
    assert plan.miner_points["m1"] == SLEEP
    assert plan.job_states["p"] is JobState.RUNNING


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_price_or_hashprice_is_never_trusted(bad: float) -> None:
    miners = [miner("m1", "S21")]
    plan = decide(snapshot(bad, miners), config(), T0)
    assert "is not a number: safe mode" in plan.summary
    assert plan.miner_points["m1"] == SLEEP
    snap = Snapshot(
        at=T0,
        price=PriceView(20.0, T0, 60.0),
        hashprice_usd_per_ph_day=bad,
        miners=(miner("m2", "S21", SLEEP),),
    )
    plan = decide(snap, config(), T0)
    assert "hashprice" in plan.summary
    assert plan.miner_points["m2"] == SLEEP
    assert plan.actions == ()


def test_safe_mode_hold_keeps_states_but_meets_limits() -> None:
    miners = [miner("on1", "S21"), miner("on2", "S19jPro"), miner("off", "S21", SLEEP)]
    cfg = config(limit_kw=4.0, safe_mode="hold")
    plan = decide(snapshot(10.0, miners, age_s=4000.0), cfg, T0)
    assert "safe mode hold" in plan.summary
    # Nothing starts even at 10 $/MWh; the less valuable S19 is shed for the 4 kW limit.
    assert plan.miner_points == {"on1": "stock", "on2": SLEEP, "off": SLEEP}
    (act,) = plan.actions
    assert act.device_id == "on2"
    assert "interconnect limit 4.0 kW reached" in act.reason


def test_faulted_and_unknown_devices_are_left_alone_at_worst_case() -> None:
    faulted = miner("bad", "S21", fault="ignored sleep command", measured_power_w=3600.0)
    unknown = miner("lost", "S21", SLEEP, measured_power_w=None, reading_age_s=120.0)
    good = miner("ok", "S21", SLEEP)
    plan = decide(snapshot(20.0, [faulted, unknown, good]), config(limit_kw=8.0), T0)
    # 3,600 W faulted + 3,500 W nameplate for the unknown one + 25 W floor: no room for "ok".
    assert plan.actions == ()
    assert plan.miner_points == {"bad": "stock", "lost": SLEEP, "ok": SLEEP}
    assert plan.planned_power_w == pytest.approx(3600 + 3500 + 25)


def test_infeasible_limit_sheds_everything_controllable() -> None:
    faulted = miner("bad", "S21", fault="unreachable")
    fine = [miner(f"m{i}", "S21") for i in range(3)]
    n = node("g1", job("p", JobClass.PREEMPTIBLE), fault="fell off the bus")
    plan = decide(snapshot(20.0, [faulted, *fine], [n]), config(limit_kw=3.0), T0)
    assert count_at(plan, SLEEP) == 3
    assert plan.miner_points["bad"] == "stock"
    assert "infeasible" in plan.summary
    assert not actions_for(plan, "bad")
    assert not actions_for(plan, "g1")
    assert plan.job_states["p"] is JobState.RUNNING  # faulted node: left alone


def test_no_flapping_at_a_steady_price() -> None:
    miners = [miner("m1", "S19jPro", "stock")]
    first = decide(snapshot(81.0, miners), config(), T0)
    assert first.miner_points["m1"] == "stock"
    asleep = [miner("m1", "S19jPro", SLEEP)]
    again = decide(snapshot(81.0, asleep), config(), T0)
    assert again.miner_points["m1"] == SLEEP  # hysteresis both ways: no toggling at 81


def test_cap_levels() -> None:
    assert cap_levels_w(200.0, 700.0, 100.0) == (200.0, 300.0, 400.0, 500.0, 600.0, 700.0)
    assert cap_levels_w(200.0, 650.0, 100.0)[-2:] == (600.0, 650.0)


def test_plan_accounts_value_and_cost() -> None:
    plan = decide(snapshot(40.0, [miner("m1", "S21")]), config(), T0)
    assert plan.value_usd_per_h == pytest.approx(200 / 1000 * HASHPRICE / 24)
    assert plan.cost_usd_per_h == pytest.approx(3.5 / 1000 * 40.0)
    assert plan.margin_usd_per_h == pytest.approx(plan.value_usd_per_h - plan.cost_usd_per_h)


def test_economic_event_already_met_costs_nothing() -> None:
    ev = event(ProgramKind.ECONOMIC, max_kw=50.0, baseline_w=60_000.0, payment=10.0)
    plan = decide(snapshot(30.0, [miner("m1", "S21")], events=[ev]), config(), T0)
    assert "economic event ev1 met without extra shedding" in plan.summary
    assert plan.actions == ()


def test_gpu_node_in_unknown_state_counts_at_nameplate_and_gets_no_action() -> None:
    lost = node("g1", job("p", JobClass.PREEMPTIBLE), measured_power_w=None, reading_age_s=90.0)
    plan = decide(snapshot(9000.0, [], [lost]), config(), T0)
    # 500 W host + 8 × 700 W nameplate, whatever the price says.
    assert plan.planned_power_w == pytest.approx(6100.0)
    assert plan.actions == ()
    assert plan.job_states == {"p": JobState.RUNNING}
    assert plan.gpu_caps_w == {"g1": 700.0}


def test_sla_job_suspended_by_an_event_resumes_after_it_within_the_ramp() -> None:
    n = node("g1", job("s", JobClass.SLA, state=JobState.SUSPENDED))
    plan = decide(snapshot(30.0, [], [n], ramp_headroom_w=1000.0), config(), T0)
    assert plan.job_states["s"] is JobState.SUSPENDED  # 1,040 W at the floor: over the ramp
    plan = decide(snapshot(30.0, [], [n], ramp_headroom_w=2000.0), config(), T0)
    assert plan.job_states["s"] is JobState.RUNNING
    assert plan.gpu_caps_w["g1"] == 300.0  # 1,040 W + 800 W for the next 100 W of cap
