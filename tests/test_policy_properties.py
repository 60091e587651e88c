"""Dispatch policy invariants, property-tested with hypothesis over random sites.

A random site mixes miner blocks of several models and states (some faulted, some unknown),
GPU nodes with jobs of every class and state, events of every kind, circuits, ramp budgets,
stale prices and 4CP risk. For each, the plan must: stay under the limit whenever that is
feasible (with its planned power recomputed here, independently, from the plan's own operating
points), never shed an SLA job without a mandatory event, leave faulted devices alone, list
sheds first, and be the same for the same input whatever order the views come in.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.config import AgentConfig, CircuitConfig, FourCpConfig
from agent.control.domain import GpuNodeView, MinerView, Plan, Snapshot
from agent.control.policy import decide
from drivers.grid.base import ProgramKind
from drivers.jobs.base import JobClass, JobState
from tests.test_policy import MODELS, T0, config, event, job, miner, node, snapshot

CIRCUITS = [
    CircuitConfig(id="rowA", limit_kw=40.0, parent="main"),
    CircuitConfig(id="rowB", limit_kw=25.0, parent="main"),
    CircuitConfig(id="main", limit_kw=60.0),
]


@st.composite
def miners_st(draw: st.DrawFn, i: int) -> MinerView:
    model = draw(st.sampled_from(sorted(MODELS)))
    points = MODELS[model]
    commanded = draw(st.sampled_from([p.name for p in points]))
    fault = draw(st.sampled_from([None, None, None, None, "faulted"]))
    unknown = draw(st.booleans()) and draw(st.booleans())
    measured = None if unknown else draw(st.sampled_from([None, points[-1].power_w * 1.05]))
    return miner(
        f"m{i:03d}",
        model,
        commanded,
        since=T0 - timedelta(seconds=draw(st.sampled_from([10, 200, 400, 3600]))),
        count=draw(st.integers(1, 4)),
        fault=fault,
        circuit=draw(st.sampled_from([None, "rowA", "rowB"])),
        measured_power_w=measured,
        reading_age_s=30.0 if unknown else None,
    )


@st.composite
def nodes_st(draw: st.DrawFn, i: int) -> GpuNodeView:
    jobs = []
    gpus_left = 8
    for k in range(draw(st.integers(0, 3))):
        gpus = draw(st.integers(1, max(gpus_left, 1)))
        gpus_left = max(gpus_left - gpus, 0)
        cls = draw(st.sampled_from(list(JobClass)))
        jobs.append(
            job(
                f"j{i}-{k}",
                cls,
                state=draw(st.sampled_from(list(JobState))),
                gpus=gpus,
                since=T0 - timedelta(seconds=draw(st.sampled_from([10, 200, 400, 7200]))),
                checkpoint=draw(
                    st.sampled_from([None, T0, T0 - timedelta(minutes=20), T0 - timedelta(hours=5)])
                ),
            )
        )
    return node(
        f"g{i:02d}",
        *jobs,
        cap_w=draw(st.sampled_from([200.0, 350.0, 700.0])),
        fault=draw(st.sampled_from([None, None, None, "fell off the bus"])),
        circuit=draw(st.sampled_from([None, "rowA", "rowB"])),
        count=draw(st.integers(1, 2)),
    )


@st.composite
def sites(draw: st.DrawFn) -> tuple[Snapshot, AgentConfig]:
    miners = [draw(miners_st(i)) for i in range(draw(st.integers(0, 8)))]
    nodes = [draw(nodes_st(i)) for i in range(draw(st.integers(0, 4)))]
    events = []
    for k in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(list(ProgramKind)))
        events.append(
            event(
                kind,
                max_kw=draw(st.floats(0.0, 80.0)),
                baseline_w=draw(st.floats(0.0, 80_000.0)),
                payment=draw(st.floats(0.0, 5000.0)),
                event_id=f"e{k}",
            )
        )
    price = draw(st.one_of(st.none(), st.floats(-100.0, 12_000.0)))
    snap = snapshot(
        price,
        miners,
        nodes,
        age_s=draw(st.sampled_from([10.0, 5000.0])),
        events=events,
        fourcp_risk=draw(st.sampled_from([0.0, 0.2, 0.7])),
        ramp_headroom_w=draw(st.sampled_from([float("inf"), 0.0, 5000.0])),
    )
    cfg = config(
        limit_kw=draw(st.floats(1.0, 120.0)),
        margin_kw=draw(st.sampled_from([0.0, 0.5])),
        circuits=CIRCUITS if draw(st.booleans()) else (),
        fourcp=FourCpConfig(enabled=draw(st.booleans()), risk_threshold=0.1),
        hysteresis_usd_per_mwh=draw(st.sampled_from([0.0, 5.0])),
        safe_mode=draw(st.sampled_from(["curtail", "hold"])),
    )
    return snap, cfg


def _fixed(view: MinerView | GpuNodeView) -> bool:
    unknown = view.measured_power_w is None and view.reading_age_s is not None
    return view.fault is not None or unknown


def recomputed_power_w(snap: Snapshot, plan: Plan) -> float:
    """The site power the plan implies, from its own operating points (not from the policy)."""
    total = 0.0
    for m in snap.miners:
        if _fixed(m):
            total += m.worst_case_power_w * m.count
        else:
            total += m.point(plan.miner_points[m.device_id]).power_w * m.count
    for n in snap.gpu_nodes:
        if _fixed(n):
            total += n.worst_case_power_w * n.count
            continue
        cap = plan.gpu_caps_w[n.device_id]
        busy = sum(j.gpus for j in n.jobs if plan.job_states[j.job_id] is JobState.RUNNING)
        node_w = n.host_overhead_w + busy * cap + max(n.gpu_count - busy, 0) * n.idle_w
        total += node_w * n.count
    return total


def floor_w(snap: Snapshot) -> float:
    """Load no plan may remove: fixed devices, sleep and idle floors, SLA without mandate."""
    mandatory = any(a.event.mandatory for a in snap.events)
    total = 0.0
    for m in snap.miners:
        total += (m.worst_case_power_w if _fixed(m) else m.points[0].power_w) * m.count
    for n in snap.gpu_nodes:
        if _fixed(n):
            total += n.worst_case_power_w * n.count
            continue
        sla_gpus = 0
        if not mandatory:
            sla_gpus = sum(
                j.gpus
                for j in n.jobs
                if j.job_class is JobClass.SLA and j.state is JobState.RUNNING
            )
        node_w = n.host_overhead_w + sla_gpus * n.min_cap_w
        total += (node_w + max(n.gpu_count - sla_gpus, 0) * n.idle_w) * n.count
    return total


# POLICY_EXAMPLES=5000 for a deep run; the default keeps the suite fast.
SETTINGS = settings(
    max_examples=int(os.environ.get("POLICY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@SETTINGS
@given(sites())
def test_planned_power_never_above_a_feasible_limit(site: tuple[Snapshot, AgentConfig]) -> None:
    snap, cfg = site
    plan = decide(snap, cfg, T0)
    assert abs(recomputed_power_w(snap, plan) - plan.planned_power_w) < 1e-3
    if floor_w(snap) <= plan.limit_w:
        assert plan.planned_power_w <= plan.limit_w + 1e-6
        assert "infeasible" not in plan.summary
    else:
        assert "infeasible" in plan.summary
    interconnect_w = (cfg.site.interconnect_limit_kw - cfg.site.safety_margin_kw) * 1000
    assert plan.limit_w <= interconnect_w + 1e-6


@SETTINGS
@given(sites())
def test_sla_jobs_never_shed_without_a_mandatory_event(site: tuple[Snapshot, AgentConfig]) -> None:
    snap, cfg = site
    plan = decide(snap, cfg, T0)
    if any(a.event.mandatory for a in snap.events):
        return
    for n in snap.gpu_nodes:
        for j in n.jobs:
            if j.job_class is JobClass.SLA and j.state is JobState.RUNNING:
                assert plan.job_states[j.job_id] is JobState.RUNNING
                assert not any(a.job_id == j.job_id for a in plan.actions)


@SETTINGS
@given(sites())
def test_plan_is_deterministic_whatever_the_view_order(site: tuple[Snapshot, AgentConfig]) -> None:
    snap, cfg = site
    first = decide(snap, cfg, T0)
    assert decide(snap, cfg, T0) == first
    shuffled = Snapshot(
        at=snap.at,
        price=snap.price,
        hashprice_usd_per_ph_day=snap.hashprice_usd_per_ph_day,
        miners=tuple(reversed(snap.miners)),
        gpu_nodes=tuple(reversed(snap.gpu_nodes)),
        events=tuple(reversed(snap.events)),
        fourcp_risk=snap.fourcp_risk,
        ramp_headroom_w=snap.ramp_headroom_w,
    )
    assert decide(shuffled, cfg, T0) == first


@SETTINGS
@given(sites())
def test_faulted_devices_get_no_action_and_sheds_come_first(
    site: tuple[Snapshot, AgentConfig],
) -> None:
    snap, cfg = site
    plan = decide(snap, cfg, T0)
    fixed = {v.device_id for v in (*snap.miners, *snap.gpu_nodes) if _fixed(v)}
    assert not [a for a in plan.actions if a.device_id in fixed]
    for m in snap.miners:
        if m.device_id in fixed:
            assert plan.miner_points[m.device_id] == m.commanded
    seen_start = False
    for a in plan.actions:
        if not a.sheds:
            seen_start = True
        assert not (seen_start and a.sheds), "a shed after a start"
        assert a.reason


@SETTINGS
@given(sites())
def test_ramp_budget_bounds_every_increase(site: tuple[Snapshot, AgentConfig]) -> None:
    snap, cfg = site
    plan = decide(snap, cfg, T0)
    # Per device, net: a node may lower its cap and resume a job in one cycle (sheds run first).
    net: dict[str, float] = {}
    for a in plan.actions:
        net[a.device_id] = net.get(a.device_id, 0.0) + a.delta_power_w
    assert sum(d for d in net.values() if d > 0) <= snap.ramp_headroom_w + 1e-6
