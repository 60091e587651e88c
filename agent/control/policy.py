"""The dispatch policy: a pure function from a Snapshot to a Plan.

``decide(snapshot, config, now)`` does no I/O, reads no clock and draws no random number, so the
same function runs live, in ``plan --dry-run`` and in the backtest. The rule (design.md): rank
every operating-point step of every device by value per MWh, run the best while their value beats
the effective energy price, never exceed any limit, shed the least valuable first, restore the
most valuable first, and do not flap.

How it works, once per call:

* **Ladders.** Every controllable device becomes a ladder of rungs ascending in power and value;
  each step between two rungs has a marginal value density (USD per MWh it adds). A miner's rungs
  are its sleep point and power profiles; a GPU node's rungs are (number of its jobs running, per
  GPU power cap), the cap on a grid of ``control.gpu_cap_step_w`` from the card's minimum to its
  maximum. A job earns ``usd_per_gpu_hour × (1 − (1 − c)²)`` at cap fraction ``c``, so the
  ladder is concave and its top cap steps are worth little: under pressure caps come down before
  jobs stop. Only rungs on the upper concave hull of (power, value) are kept, so marginal values
  fall along every ladder and a greedy pass in merit order is the optimal fractional dispatch.
  Static ladders are memoised (pure caches keyed by the immutable inputs).
* **Merit order.** All steps are sorted by (SLA first, value density, running first, device id).
  A step is taken if its device took the rung below, its value beats the effective price
  (minus the hysteresis when it runs now, plus it when it would start), and it fits the site
  limit, every circuit above the device and the ramp budget. Steps kept by a minimum on time
  skip the price test but not the limits; a device within its minimum off time is not started.
* **Jobs.** ``sla`` jobs are never shed without a mandatory grid event (emergency, override);
  under one they are the last steps shed (the first taken), ordered by value plus penalty.
  ``preemptible`` and ``filler`` jobs compete by value density; filler's low contract rate puts
  it behind every better use of the same power. ``REQUEUE_JOB`` is never planned: suspension
  keeps the job's memory, so requeueing is the scheduler's fallback, not a dispatch choice.
* **Switching costs** are the site model's (:mod:`agent.control.site`), the same functions the
  settlement charges, and every action carries its own (``Action.switch_lost_usd``,
  ``switch_energy_wh``). Suspending a running job loses what it earned since its checkpoint (the
  known one, or every ``checkpoint_interval_s`` of run by its contract) and an SLA contract's
  penalty; resuming one loses its ``resume_s`` of reload; waking a miner loses ``wake_lost_s`` of
  hashing and draws ``wake_energy_wh``, sleeping it ``sleep_energy_wh``. Each one-off cost is
  spread over what the switch commits the site to (the dwell time, at least one 15-minute
  settlement interval): keeping a running job or miner gains it, starting one pays it, and a
  node's ladder is made monotone again by pooling adjacent steps.
* **Host overhead** is counted whenever the node is up, jobs or not: the policy has no action
  that powers a host down, so an empty node keeps drawing it. That is safe for limits, and right
  for economics (suspending the last job does not save it).
* **Events.** Every event's target (the stricter of ``max_site_kw`` and ``baseline − shed_kw``,
  :func:`agent.control.settlement.event_target_w`) less the safety
  margin is a ceiling on planned site power. Mandatory events (emergency, override) and 4CP
  windows always bind; only mandatory ones may shed SLA jobs. Economic events are opt-in: the
  plan is made with and without the event, and it complies when the payment
  (``payment_usd_per_mwh × shed MW`` per hour, shed measured from the event baseline) plus the
  avoided cost beats the lost margin; a declined event is named in the summary.
* **4CP.** With ``grid.fourcp.enabled`` and ``snapshot.fourcp_risk ≥ risk_threshold``, the
  expected transmission charge of 1 kW held through this 15-minute interval,
  ``p × rate_usd_per_kw_year / 4`` (it would be one of the four peaks averaged), spread over
  that interval's energy (1 kW × 0.25 h), is added to the energy price: ``p × rate × 1000``
  USD/MWh, where ``p = risk × hit_rate`` is the probability that the interval is a true peak
  (:func:`agent.control.settlement.fourcp_risk_priced`: the estimator's risk calibrated by its
  historical hit rate, ``grid.fourcp.hit_rate``). This is the economically sound variant: each
  load is curtailed exactly when its value is below price plus expected 4CP cost. Taken at its
  word (hit rate 1), risk 0.5 at 60 USD/kW-year adds 30,000 USD/MWh and sheds all but SLA work;
  the estimator flags about 100 intervals a month for one peak, so the reference sites use a
  hit rate of 1.25 % (risk 1: 750 USD/MWh: miners and filler go, paid training stays). The
  threshold is the forecaster's noise floor: below it the risk is treated as zero. Sheds the
  adder causes say "4CP" in their reason.
* **Limits and safety.** Planned power never exceeds the effective limit when that is feasible.
  It is infeasible only when load the policy cannot move (faulted devices and devices in an
  unknown state at their worst-case power, sleep and idle floors, and SLA jobs without a
  mandatory event) exceeds it; then every controllable step is shed and the summary says so.
  A device is in an unknown state when it has been read before but has no fresh reading
  (``measured_power_w is None and reading_age_s is not None``); such devices, like faulted ones,
  are counted at ``worst_case_power_w`` and get no action. Circuits use their own limit (the
  site safety margin applies to the site meter). Every increase, miners and GPU caps alike,
  counts against ``snapshot.ramp_headroom_w``.
* **At the meter.** Site limits (interconnect, events) are judged at the revenue meter:
  ``snapshot.load_model`` turns device power into site power (``devices × (1 + cooling) +
  base load + meter trim``, or + the fallback margin without a trusted meter), the dispatch runs
  on the device budget that leaves under the limit, device power is priced with the cooling it
  brings, and ``Plan.planned_power_w`` is site power. The default model is the identity.
* **Thermal derate.** A miner view with ``max_point`` is never planned above it, and a node's
  lowered ``max_cap_w`` caps its ladder; the step down says "thermal derate" and why.
* **Horizon plan.** With ``snapshot.horizon`` (a usable :class:`~agent.control.planner.
  HorizonPlan` covering ``now``) and a fresh price, :func:`horizon_holds` holds a miner in its
  state while the effective price lies inside its block's band (the switching would cost more
  than it saves), exactly as a dwell time holds it; deferrable jobs the plan defers are valued at
  nothing (shed, not restarted), those it runs are held like dwell-held jobs (limits still
  apply; not under a 4CP risk). Without a usable plan the rule alone decides.
* **Stale prices.** Older than ``prices.max_age_s`` (or never seen): ``curtail`` plans against
  ``safe_mode_price_usd_per_mwh``; ``hold`` keeps what runs and starts nothing, still shedding
  to meet limits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from agent.control.config import AgentConfig, ControlConfig
from agent.control.cooling import SiteLoadModel
from agent.control.domain import (
    Action,
    ActionKind,
    ActiveEvent,
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    Plan,
    Snapshot,
)
from agent.control.economics import (
    ai_revenue_at_fraction_usd_per_h,
    energy_cost_usd_per_h,
    gpu_throughput_fraction,
)
from agent.control.settlement import (
    event_target_w,
    fourcp_adder_usd_per_mwh,
    fourcp_risk_priced,
)
from agent.control.site import (
    NO_COST,
    SwitchCost,
    checkpoint_age_s,
    commit_horizon_s,
    contract,
    deadline_due,
    node_power_w,
    resume_cost,
    site_limit_w,
    sleep_cost,
    suspend_cost,
    wake_cost,
    wake_lost_s,
)
from drivers.grid.base import ProgramKind
from drivers.jobs.base import JobClass, JobState

_EPS_W = 1e-6
_INF = float("inf")


# --- following a horizon plan ------------------------------------------------------------------

_NO_JOBS: Mapping[str, bool] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HorizonHolds:
    """What a horizon plan holds this cycle: miners kept in their state inside their block's
    band, and deferrable jobs run or deferred per the plan's schedule."""

    awake: frozenset[str] = frozenset()  # running miners the band keeps running
    asleep: frozenset[str] = frozenset()  # sleeping miners the band keeps asleep
    jobs: Mapping[str, bool] = field(default_factory=dict)  # deferrable job id -> run now
    note: str = ""


def horizon_holds(
    snapshot: Snapshot, now: datetime, price: float, stale: bool, fourcp: bool
) -> HorizonHolds:
    """The plan's holds at effective price ``price`` (4CP adder included, so a 4CP interval is
    never ridden through). A miner is only ever *held* in its state: inside the band (a spike
    below ``curtail_above`` while running, a dip above ``restore_below`` while asleep) the
    switching would cost more than it saves; outside it the rule decides. No plan, a plan that
    does not cover ``now``, or a stale price: no holds (the rule alone, as before). Under a 4CP
    risk the plan's deferrable runs are not forced (the risk may exceed the plan's forecast).
    A deferrable job the plan does not know yet waits for the next plan; one whose deadline is
    due (:func:`agent.control.site.deadline_due`) always runs, with or without a plan.
    """
    # Deferrable work whose slack is gone runs, plan or no plan, price or 4CP: the deadline
    # first. Under a safe-mode hold (``stale``) nothing starts: a running one is kept running.
    due = {
        job.job_id: True
        for n in snapshot.gpu_nodes
        for job in n.jobs
        if job.deadline is not None
        and deadline_due(job, n, now)
        and (not stale or job.state is JobState.RUNNING)
    }
    due_note = f"{len(due)} deferrable job(s) run to meet their deadline" if due else ""
    plan = snapshot.horizon
    k = None if plan is None or stale else plan.index_at(now)
    if plan is None or k is None:
        return HorizonHolds(jobs=due, note=due_note)
    # One lookup of the plan's row per call (a site has thousands of miners).
    bands = dict(zip(plan.block_ids, plan.bands[k], strict=True))
    runs = dict(zip(plan.job_ids, plan.job_run[k], strict=True))
    awake: set[str] = set()
    asleep: set[str] = set()
    if bands:
        for m in snapshot.miners:
            band = bands.get(m.model)
            if band is None or m.fault is not None:
                continue
            sleeping = m.commanded == m.points[0].name
            if not sleeping and price <= band.curtail_above_usd_per_mwh:
                awake.add(m.device_id)
            elif sleeping and price >= band.restore_below_usd_per_mwh:
                asleep.add(m.device_id)
    jobs: dict[str, bool] = {}
    for n in snapshot.gpu_nodes:
        for job in n.jobs:
            run = runs.get(job.job_id)
            if run is None and job.deadline is not None and job.job_class != JobClass.SLA:
                # Deferrable work the plan in force does not know yet (it arrived since): it
                # waits for the next plan, which places it (the guard runs it if due first).
                jobs[job.job_id] = False
            elif run is not None and job.job_class != JobClass.SLA and not (run and fourcp):
                jobs[job.job_id] = run
    jobs.update(due)
    parts = []
    if awake or asleep:
        parts.append(f"{len(awake)} running and {len(asleep)} sleeping miner(s) held in band")
    if jobs:
        on = sum(jobs.values())
        parts.append(f"{on} deferrable job(s) run, {len(jobs) - on} deferred")
    note = f"horizon plan ({plan.status.value}): {', '.join(parts)}" if parts else ""
    if due_note:
        note = f"{note}; {due_note}" if note else due_note
    return HorizonHolds(frozenset(awake), frozenset(asleep), jobs, note)


# --- static ladders (memoised) ---------------------------------------------------------------


def _upper_hull(
    start: tuple[float, float], candidates: Sequence[tuple[float, float, int]]
) -> list[tuple[float, float, int]]:
    """Points on the upper concave hull from ``start``, rising in power and value.

    ``candidates`` are ``(power, value, tag)``; points that add power without adding value, and
    points below a chord, are dropped, so the marginal value falls from step to step.
    """
    stack: list[tuple[float, float, int]] = [(start[0], start[1], -1)]
    for p in sorted(candidates, key=lambda c: (c[0], -c[1], c[2])):
        top = stack[-1]
        if p[1] <= top[1]:
            continue
        while len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            # Drop b when it lies on or below the chord from a to p (not concave).
            if (b[1] - a[1]) * (p[0] - a[0]) <= (p[1] - a[1]) * (b[0] - a[0]):
                stack.pop()
            else:
                break
        if p[0] <= stack[-1][0] + _EPS_W:
            if len(stack) == 1:
                continue  # no more power than the base: cannot be a rung above it
            stack.pop()
        stack.append(p)
    return stack


@dataclass(frozen=True, slots=True)
class _MinerLadder:
    """A miner model's efficient rungs: point indices, their power and hashrate (per unit)."""

    point_index: tuple[int, ...]
    power_w: tuple[float, ...]
    hashrate_ths: tuple[float, ...]
    index_of: dict[str, int]  # point name -> index in the model's points


@functools.lru_cache(maxsize=1024)
def _miner_ladder_of(points: tuple[OperatingPoint, ...]) -> _MinerLadder:
    # Revenue is proportional to hashrate at any hashprice, so the hull over (W, TH/s) holds.
    base = points[0]
    cands = [(p.power_w, p.hashrate_ths, i) for i, p in enumerate(points) if i > 0]
    hull = _upper_hull((base.power_w, base.hashrate_ths), cands)
    idx = (0, *(h[2] for h in hull[1:]))
    return _MinerLadder(
        point_index=idx,
        power_w=tuple(points[i].power_w for i in idx),
        hashrate_ths=tuple(points[i].hashrate_ths for i in idx),
        index_of={p.name: i for i, p in enumerate(points)},
    )


# Identity cache in front of the value cache: hashing a tuple of dataclasses on every call costs
# more than the whole ladder lookup. The entry keeps the tuple alive, so its id is never reused.
_MINER_BY_ID: dict[int, tuple[tuple[OperatingPoint, ...], _MinerLadder]] = {}


def _miner_ladder(points: tuple[OperatingPoint, ...]) -> _MinerLadder:
    hit = _MINER_BY_ID.get(id(points))
    if hit is not None and hit[0] is points:
        return hit[1]
    ladder = _miner_ladder_of(points)
    if len(_MINER_BY_ID) > 4096:
        _MINER_BY_ID.clear()
    _MINER_BY_ID[id(points)] = (points, ladder)
    return ladder


def cap_levels_w(min_cap_w: float, max_cap_w: float, step_w: float) -> tuple[float, ...]:
    """Per-GPU caps the policy chooses from: min, min + step, ..., max (max always included)."""
    levels = [min_cap_w]
    while levels[-1] + step_w < max_cap_w - 1e-9:
        levels.append(levels[-1] + step_w)
    levels.append(max_cap_w)
    return tuple(levels)


# A node rung: (jobs running = first k of the ordered list, cap level index or -1, power, value).
_NodeRung = tuple[int, int, float, float]


@functools.lru_cache(maxsize=8192)
def _node_ladder(
    gpu_count: int,
    min_cap_w: float,
    max_cap_w: float,
    idle_w: float,
    host_w: float,
    step_w: float,
    jobs: tuple[tuple[int, float], ...],  # (gpus, usd_per_gpu_hour), in dispatch order
    n_sla: int,
) -> tuple[_NodeRung, ...]:
    """Rungs of a node: base (no job), one per SLA job at the minimum cap, then the hull."""
    levels = cap_levels_w(min_cap_w, max_cap_w, step_w)
    frac = [gpu_throughput_fraction(c, max_cap_w, min_cap_w) for c in levels]
    cum_g = [0]
    cum_rate = [0.0]
    for g, rate in jobs:
        cum_g.append(cum_g[-1] + g)
        cum_rate.append(cum_rate[-1] + g * rate)

    # A node's power is linear in its cap: its power at cap 0, plus the busy GPUs at the cap.
    at_zero = [node_power_w(host_w, gpu_count, idle_w, g, 0.0) for g in cum_g]

    def power(k: int, j: int) -> float:
        return at_zero[k] + cum_g[k] * levels[j]

    rungs: list[_NodeRung] = [(0, -1, host_w + gpu_count * idle_w, 0.0)]
    for k in range(1, n_sla + 1):
        rungs.append((k, 0, power(k, 0), cum_rate[k] * frac[0]))
    k0 = n_sla
    cands: list[tuple[float, float, int]] = []
    for k in range(max(k0, 1), len(jobs) + 1):
        for j in range(len(levels)):
            if k == k0 and j == 0:
                continue
            cands.append((power(k, j), cum_rate[k] * frac[j], k * 1000 + j))
    start = rungs[-1]
    for p, v, tag in _upper_hull((start[2], start[3]), cands)[1:]:
        rungs.append((tag // 1000, tag % 1000, p, v))
    return tuple(rungs)


# --- per-call dispatch -------------------------------------------------------------------------
#
# Devices that are interchangeable this cycle (same miner model and ladder, same commanded point,
# same dwell state, circuit and block size) form one group, and the greedy pass moves whole
# groups at once: how many of its members fit is a division, not a loop. Members of a group are
# in device-id order and always taken as a prefix, so ``ge[r]`` (members at rung r or above)
# describes the whole group. Each GPU node is a group of one.

# A merit-order step: (SLA first, -density, running first, group, hi) sort the steps; the rest is
# payload: lo rung, growth per member (W), part of it above today's power (ramp), density, running
# now, held by a minimum on time, SLA.
_Step = tuple[int, float, int, int, int, int, float, float, float, bool, bool, bool]


@dataclass(slots=True)
class _Group:
    """Interchangeable controllable devices and their shared ladder for this call."""

    count: int  # units per member (block size)
    path: tuple[str, ...]  # circuits from the members' own up to the root
    rung_power_w: tuple[float, ...]  # per unit
    rung_value_usd_per_h: tuple[float, ...]  # per unit
    miners: list[MinerView]
    ladder: _MinerLadder | None = None
    cur_point: int = 0
    node: GpuNodeView | None = None
    rungs: tuple[_NodeRung, ...] = ()
    levels: tuple[float, ...] = ()
    jobs: tuple[JobView, ...] = ()  # dispatch order
    # A cached node group: per top rung, the cap and job states it plans when that changes
    # nothing (no action), so an unchanged node is planned by a lookup.
    quiet: dict[int, tuple[float, dict[str, JobState]]] | None = None

    @property
    def size(self) -> int:
        return len(self.miners) if self.node is None else 1


@dataclass(slots=True)
class _Result:
    ge: list[list[int]]  # per group: members at rung r or above
    total_w: float
    shed_cause: dict[int, str]  # per group: why running members or steps were dropped
    hold_cause: dict[int, str]  # per group: why a wanted increase was not (fully) taken
    bound: set[str]
    fourcp_groups: int
    infeasible: bool
    sla_kept_w: float

    def value_usd_per_h(self, groups: list[_Group]) -> float:
        total = 0.0
        for g, ge in zip(groups, self.ge, strict=True):
            vals = g.rung_value_usd_per_h
            if g.node is not None:
                total += vals[_top_rung(ge)] * g.count
                continue
            for r in range(1, len(ge)):
                total += ge[r] * (vals[r] - vals[r - 1]) * g.count
        return total


def _top_rung(ge: list[int]) -> int:
    """The rung a group of one reached (``ge`` falls from 1 to 0 above it)."""
    try:
        return ge.index(0) - 1
    except ValueError:
        return len(ge) - 1


@dataclass(slots=True)
class _Ctx:
    """What every dispatch pass of one call shares."""

    groups: list[_Group]
    steps: list[_Step]  # in merit order
    base_w: float
    circuit_base_w: dict[str, float]
    circuit_limit_w: dict[str, float]
    price: float  # effective
    market_price: float  # without the 4CP adder
    hyst: float
    hold: bool
    mandatory: bool
    ramp_w: float
    fourcp_note: str
    costs: _Costs


@functools.lru_cache(maxsize=64)
def _circuit_paths(circuits: tuple[tuple[str, str | None], ...]) -> dict[str, tuple[str, ...]]:
    parents = dict(circuits)
    paths: dict[str, tuple[str, ...]] = {}
    for cid in parents:
        path: list[str] = []
        node: str | None = cid
        while node is not None and node not in path:  # a cycle in config must not hang us
            path.append(node)
            node = parents.get(node)
        paths[cid] = tuple(path)
    return paths


def _by_id(view: MinerView | GpuNodeView) -> str:
    return view.device_id


def decide(snapshot: Snapshot, config: AgentConfig, now: datetime) -> Plan:
    """Choose every device's operating point for the next cycle, with a reason per change."""
    control = config.control
    prices = config.prices
    site = config.site
    margin_w = site.safety_margin_kw * 1000.0
    # Limits are judged at the meter; devices get what is left after cooling and base load.
    load = snapshot.load_model

    # --- price, safe mode, 4CP --------------------------------------------------------------
    notes: list[str] = []
    hold = False
    if (
        snapshot.price is None
        or not snapshot.price.age_s <= prices.max_age_s
        or not math.isfinite(snapshot.price.usd_per_mwh)
    ):
        if snapshot.price is None:
            age = "no price yet"
        elif not math.isfinite(snapshot.price.usd_per_mwh):
            age = f"price {snapshot.price.usd_per_mwh} is not a number"
        else:
            age = f"price is {snapshot.price.age_s:.0f} s old"
        if prices.safe_mode == "hold":
            hold = True
            last = snapshot.price.usd_per_mwh if snapshot.price else 0.0
            market = last if math.isfinite(last) else 0.0
            notes.append(f"{age}: safe mode hold, nothing starts")
        else:
            market = prices.safe_mode_price_usd_per_mwh
            notes.append(f"{age}: safe mode, pricing at {market:.0f} $/MWh")
    else:
        market = snapshot.price.usd_per_mwh
    fourcp = config.grid.fourcp
    adder = 0.0
    fourcp_note = ""
    risk = fourcp_risk_priced(fourcp, snapshot.fourcp_risk)
    if risk > 0:
        adder = fourcp_adder_usd_per_mwh(fourcp.rate_usd_per_kw_year, risk)
        why = f" ({snapshot.fourcp_reason})" if snapshot.fourcp_reason else ""
        odds = "" if fourcp.hit_rate >= 1 else f", peak probability {risk:.2%}"
        fourcp_note = (
            f"4CP risk {min(snapshot.fourcp_risk, 1.0):.0%}{why}{odds}: "
            f"expected peak charge adds {adder:,.0f} $/MWh"
        )
        notes.append(fourcp_note)
    price = market + adder
    holds = horizon_holds(snapshot, now, price, hold, bool(fourcp_note))
    if holds.note:
        notes.append(holds.note)

    # --- limits -----------------------------------------------------------------------------
    mandatory = any(a.event.mandatory for a in snapshot.events)
    limit_w = site_limit_w(config)
    binding = "interconnect"
    economic: list[tuple[ActiveEvent, float]] = []
    for active in sorted(snapshot.events, key=lambda a: a.event.event_id):
        target = event_target_w(active.event, active.baseline_w)
        if target is None:
            continue
        target = max(target - margin_w, 0.0)
        if active.event.kind == ProgramKind.ECONOMIC:
            economic.append((active, target))
        elif target < limit_w:
            limit_w, binding = target, f"event:{active.event.event_id}"

    # --- groups and their steps -------------------------------------------------------------
    paths = _circuit_paths(tuple((c.id, c.parent) for c in site.circuits))
    circuit_limit_w = {c.id: c.limit_kw * 1000.0 for c in site.circuits}
    circuit_base_w = dict.fromkeys(circuit_limit_w, 0.0)
    base_w = 0.0
    groups: list[_Group] = []
    steps: list[_Step] = []
    fixed: list[MinerView | GpuNodeView] = []
    min_on_s, min_off_s = control.min_on_s, control.min_off_s
    fee = config.economics.pool_fee
    hashprice = snapshot.hashprice_usd_per_ph_day
    if not math.isfinite(hashprice):
        # A broken hashprice must not make mining look priceless: value it at nothing.
        notes.append(f"hashprice {hashprice} is not a number: mining valued at 0")
        hashprice = 0.0
    usd_h_per_ths = hashprice / 1000.0 / 24.0 * (1.0 - fee)

    def add_base(path: tuple[str, ...], watts: float) -> None:
        nonlocal base_w
        base_w += watts
        for c in path:
            circuit_base_w[c] += watts

    # Dwell tests as datetime comparisons: a command given after the cut is still within it.
    on_cut = now - timedelta(seconds=min_on_s)
    off_cut = now - timedelta(seconds=min_off_s)
    miner_groups: dict[tuple[object, ...], tuple[_Group, bool, bool]] = {}
    for m in sorted(snapshot.miners, key=_by_id):
        if m.fault is not None or (m.measured_power_w is None and m.reading_age_s is not None):
            fixed.append(m)
            add_base(paths.get(m.circuit, ()) if m.circuit else (), m.worst_case_power_w * m.count)
            continue
        since = m.commanded_since
        held_off = since > off_cut or m.device_id in holds.asleep
        held_on = since > on_cut or m.device_id in holds.awake
        key = (id(m.points), m.model, m.commanded, held_off, held_on, m.circuit,
               m.count, m.max_point)  # fmt: skip
        entry = miner_groups.get(key)
        if entry is not None:
            entry[0].miners.append(m)
            continue
        ml = _miner_ladder(m.points)
        cur = ml.index_of.get(m.commanded, 0)
        group = _Group(
            count=m.count,
            path=paths.get(m.circuit, ()) if m.circuit else (),
            rung_power_w=ml.power_w,
            rung_value_usd_per_h=tuple(h * usd_h_per_ths for h in ml.hashrate_ths),
            miners=[m],
            ladder=ml,
            cur_point=cur,
        )
        miner_groups[key] = (group, cur == 0 and held_off, cur != 0 and held_on)
        groups.append(group)
    costs = _Costs(
        config=config,
        now_s=now.timestamp(),
        off_h=commit_horizon_s(control.interval_s, min_off_s) / 3600.0,
        on_h=commit_horizon_s(control.interval_s, min_on_s) / 3600.0,
        price=price,
        hashprice=hashprice,
        fee=fee,
    )
    for gi, (group, blocked, forced) in enumerate(miner_groups.values()):
        size = len(group.miners)
        add_base(group.path, group.rung_power_w[0] * group.count * size)
        if blocked:
            continue  # minimum off time: nothing may start these
        _miner_steps(gi, group, forced, costs, steps)

    for n in sorted(snapshot.gpu_nodes, key=_by_id):
        path = paths.get(n.circuit, ()) if n.circuit else ()
        if n.fault is not None or (n.measured_power_w is None and n.reading_age_s is not None):
            fixed.append(n)
            add_base(path, n.worst_case_power_w * n.count)
            continue
        group = _node_group(
            n, path, control, now, (on_cut, off_cut), costs, len(groups), steps, holds.jobs
        )
        groups.append(group)
        add_base(path, group.rung_power_w[0] * n.count)

    steps.sort()
    ctx = _Ctx(
        groups=groups,
        steps=steps,
        base_w=base_w,
        circuit_base_w=circuit_base_w,
        circuit_limit_w=circuit_limit_w,
        # Every device watt brings cooling with it: price device power at the meter's cost.
        price=price * (1.0 + load.cooling_frac),
        market_price=market,
        hyst=control.hysteresis_usd_per_mwh,
        hold=hold,
        mandatory=mandatory,
        ramp_w=snapshot.ramp_headroom_w,
        fourcp_note=fourcp_note,
        costs=costs,
    )
    result = _dispatch(ctx, load.device_budget_w(limit_w), binding)

    # --- economic events: opt in when it pays -----------------------------------------------
    for active, target in economic:
        event_id = active.event.event_id
        if load.site_w(result.total_w) <= target + _EPS_W:
            notes.append(f"economic event {event_id} met without extra shedding")
            continue
        name = f"event:{event_id}"
        trial = _dispatch(
            ctx, load.device_budget_w(min(limit_w, target)), name if target < limit_w else binding
        )
        shed_mw = max(active.baseline_w - load.site_w(trial.total_w), 0.0) / 1e6
        pay_usd_per_h = active.event.payment_usd_per_mwh * shed_mw
        gain = (
            trial.value_usd_per_h(groups)
            - energy_cost_usd_per_h(load.site_w(trial.total_w), price)
            + pay_usd_per_h
            - result.value_usd_per_h(groups)
            + energy_cost_usd_per_h(load.site_w(result.total_w), price)
        )
        if gain >= 0:
            notes.append(
                f"economic event {event_id} accepted: payment {pay_usd_per_h:,.2f} $/h "
                f"beats the lost margin by {gain:,.2f} $/h"
            )
            if target < limit_w:
                limit_w, binding = target, name
            result = trial
        else:
            notes.append(
                f"economic event {event_id} declined: payment {pay_usd_per_h:,.2f} $/h "
                f"does not cover the lost margin ({-gain:,.2f} $/h short)"
            )

    derated = sum(m.count for m in snapshot.miners if m.max_point is not None)
    derated_nodes = sum(n.count for n in snapshot.gpu_nodes if n.derate is not None)
    if derated or derated_nodes:
        notes.append(f"thermal derate: {derated} miner(s), {derated_nodes} GPU node(s)")
    if load.source == "fallback":
        notes.append(
            f"meter not trusted: planning on devices + cooling + {load.fixed_w / 1000:,.1f} kW"
        )
    elif load.source == "meter" and abs(load.trim_w) >= 1.0:
        notes.append(f"meter trim {load.trim_w / 1000:+,.1f} kW")
    return _plan(now, ctx, result, limit_w, binding, fixed, notes, load)


def _ceiling_rung(group: _Group) -> int:
    """The highest rung a thermally derated group may reach (the top rung otherwise)."""
    ladder = group.ladder
    assert ladder is not None
    top = len(ladder.power_w) - 1
    ceiling = group.miners[0].max_point
    if ceiling is None or ceiling not in ladder.index_of:
        return top
    limit = ladder.index_of[ceiling]
    return max((r for r in range(top + 1) if ladder.point_index[r] <= limit), default=0)


def _miner_steps(gi: int, group: _Group, forced: bool, costs: _Costs, steps: list[_Step]) -> None:
    ladder = group.ladder
    assert ladder is not None
    pw = ladder.power_w
    asleep = group.cur_point == 0
    cur_w = pw[0] if asleep else group.miners[0].points[group.cur_point].power_w
    count = group.count
    vals = group.rung_value_usd_per_h
    # Switching costs (agent.control.site): waking loses hashing in proportion to the hashrate
    # woken (every step's value shrinks alike) and draws extra energy (on the first step);
    # keeping a running miner avoids the energy of putting it to sleep.
    model = costs.config.miner_models.get(group.miners[0].model)
    keep = 1.0
    first_usd_h = 0.0
    if model is not None:
        if asleep:
            keep = max(0.0, 1.0 - wake_lost_s(costs.config, model) / (costs.on_h * 3600.0))
            first_usd_h = -model.wake_energy_wh / 1e6 * costs.price / costs.on_h
        else:
            first_usd_h = model.sleep_energy_wh / 1e6 * costs.price / costs.off_h
    prev = _INF
    for r in range(1, _ceiling_rung(group) + 1):
        dp = pw[r] - pw[r - 1]
        dv = vals[r] - vals[r - 1]
        if keep != 1.0:
            dv *= keep
        if r == 1 and first_usd_h:
            dv += first_usd_h
        # The hull makes densities fall along the ladder; min() keeps rounding from
        # ever sorting a step before the one below it.
        density = prev = min(prev, _INF if dp <= 0 else dv / dp * 1e6)
        on = group.cur_point != 0 and pw[r] <= cur_w + _EPS_W
        new_w = max(0.0, pw[r] - max(pw[r - 1], cur_w)) * count
        steps.append(
            (1, -density, 0 if on else 1, gi, r, r - 1, dp * count, new_w, density, on,
             forced and r == 1, False)
        )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _levels(min_cap_w: float, max_cap_w: float, step_w: float) -> tuple[float, ...]:
    return cap_levels_w(min_cap_w, max_cap_w, step_w)


@dataclass(frozen=True, slots=True)
class _Costs:
    """This call's switching costs (one model, :mod:`agent.control.site`) and the horizons a
    one-off cost is spread over to compare it with energy prices."""

    config: AgentConfig
    now_s: float
    off_h: float  # a suspension or a sleep commits to the minimum off time
    on_h: float  # a resume or a wake commits to the minimum on time
    price: float  # effective USD/MWh: what extra energy costs
    hashprice: float
    fee: float


def _job_cost(job: JobView, n: GpuNodeView, costs: _Costs, frac: float | None = None) -> SwitchCost:
    """Suspending a running job (its work since the checkpoint, its penalty), or resuming a
    suspended one (its reload time). ``frac``: the node's throughput fraction, if known."""
    terms = contract(costs.config, job.job_class)
    if job.state is JobState.RUNNING:
        if frac is None:
            frac = gpu_throughput_fraction(n.cap_w, n.max_cap_w, n.min_cap_w)
        rev = ai_revenue_at_fraction_usd_per_h(job.gpus, job.usd_per_gpu_hour, frac)
        ckpt = job.last_checkpoint_at
        age = checkpoint_age_s(
            costs.now_s,
            job.commanded_since.timestamp(),
            None if ckpt is None else ckpt.timestamp(),
            terms.checkpoint_interval_s,
        )
        return suspend_cost(job.penalty_usd, rev, age)
    return resume_cost(terms, job.gpus, job.usd_per_gpu_hour)


@dataclass(frozen=True, slots=True)
class _NodeTemplate:
    """The time-free part of a node's ladder in one job/cap state (memoised).

    Steps are parallel tuples: rung below and above, jobs running below and above, power (W per
    unit), value (USD/h per unit), runs now, held.
    """

    rungs: tuple[_NodeRung, ...]
    levels: tuple[float, ...]
    rung_power_w: tuple[float, ...]
    rung_value_usd_per_h: tuple[float, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    k_lo: tuple[int, ...]
    k_hi: tuple[int, ...]
    dp: tuple[float, ...]
    dv: tuple[float, ...]
    on: tuple[bool, ...]
    held: tuple[bool, ...]
    cur_w: float


@functools.lru_cache(maxsize=16384)
def _node_template(
    gpu_count: int,
    min_cap_w: float,
    max_cap_w: float,
    idle_w: float,
    host_w: float,
    step_w: float,
    jobs: tuple[tuple[int, float], ...],
    n_sla: int,
    n_held: int,
    k_cur: int,
    busy_gpus: int,
    cap_w: float,
) -> _NodeTemplate:
    rungs = _node_ladder(gpu_count, min_cap_w, max_cap_w, idle_w, host_w, step_w, jobs, n_sla)
    levels = cap_levels_w(min_cap_w, max_cap_w, step_w)
    cur_w = node_power_w(host_w, gpu_count, idle_w, busy_gpus, cap_w)
    on = [True]
    for r in range(1, len(rungs)):
        k, j = rungs[r][0], rungs[r][1]
        on.append(on[r - 1] and k <= k_cur and (j < 0 or levels[j] <= cap_w + 0.5))
    steps = range(1, len(rungs))
    held = [r <= n_sla or (rungs[r][0] > rungs[r - 1][0] and rungs[r - 1][0] < n_held)
            for r in steps]  # fmt: skip
    # A dwell-held job needs every rung below it.
    for i in range(len(held) - 2, -1, -1):
        held[i] = held[i] or held[i + 1]
    return _NodeTemplate(
        rungs=rungs,
        levels=levels,
        rung_power_w=tuple(r[2] for r in rungs),
        rung_value_usd_per_h=tuple(r[3] for r in rungs),
        lo=tuple(r - 1 for r in steps),
        hi=tuple(steps),
        k_lo=tuple(rungs[r - 1][0] for r in steps),
        k_hi=tuple(rungs[r][0] for r in steps),
        dp=tuple(rungs[r][2] - rungs[r - 1][2] for r in steps),
        dv=tuple(rungs[r][3] - rungs[r - 1][3] for r in steps),
        on=tuple(on[1:]),
        held=tuple(held),
        cur_w=cur_w,
    )


# Per job in dispatch order, what its switch costs depend on besides the clock: running, SLA
# penalty, revenue per hour at the node's cap, run since (s), last checkpoint (s) or None,
# checkpoint period (s), and what a resume loses (USD).
_JobTerms = tuple[bool, float, float, float, float | None, float, float]


def _job_terms(
    ordered: tuple[JobView, ...], n: GpuNodeView, config: AgentConfig
) -> tuple[_JobTerms, ...]:
    frac = gpu_throughput_fraction(n.cap_w, n.max_cap_w, n.min_cap_w)
    out = []
    for job in ordered:
        terms = contract(config, job.job_class)
        ckpt = job.last_checkpoint_at
        out.append(
            (
                job.state is JobState.RUNNING,
                job.penalty_usd,
                ai_revenue_at_fraction_usd_per_h(job.gpus, job.usd_per_gpu_hour, frac),
                job.commanded_since.timestamp(),
                None if ckpt is None else ckpt.timestamp(),
                terms.checkpoint_interval_s,
                resume_cost(terms, job.gpus, job.usd_per_gpu_hour).lost_usd,
            )
        )
    return tuple(out)


def _node_bonus(terms: tuple[_JobTerms, ...], costs: _Costs) -> tuple[float, ...] | None:
    """Cumulative switching bonus (USD/h) of the first k jobs in dispatch order, or None when
    no job's switch costs anything.

    Keeping a running job avoids what its suspension costs (:func:`_job_cost`: the same
    site-model functions on the same terms), spread over the horizon a suspension commits to:
    a bonus on the step that keeps it. Resuming a job costs its reload, spread over the
    horizon a resume commits to: a malus on the step that resumes it."""
    cum = [0.0]
    acc = 0.0
    changed = False
    now_s = costs.now_s
    for running, penalty, rev, since_s, ckpt_s, period_s, resume_usd in terms:
        if running:
            age = checkpoint_age_s(now_s, since_s, ckpt_s, period_s)
            cost = suspend_cost(penalty, rev, age).lost_usd
            if cost:
                changed = True
                acc += cost / costs.off_h
        elif resume_usd:
            changed = True
            acc -= resume_usd / costs.on_h
        cum.append(acc)
    return tuple(cum) if changed else None


def _pool_with_bonus(
    t: _NodeTemplate,
    cum: tuple[float, ...],
    n_sla: int,
) -> tuple[
    Sequence[int], Sequence[int], Sequence[float], Sequence[float], Sequence[bool], Sequence[bool]
]:
    """Steps of a node with switching bonuses (:func:`_node_bonus`) added, then pooled to stay
    concave. The template's steps are concave, so only a step whose value changed can break
    the order; from the first such step on, adjacent (non-SLA) steps are pooled until the
    values fall again.
    """
    k_lo, k_hi = t.k_lo, t.k_hi
    lo, hi, dp, dv = list(t.lo), list(t.hi), list(t.dp), list(t.dv)
    ons, helds = list(t.on), list(t.held)
    on, held = t.on, t.held
    out = 0
    checking = False
    for i in range(len(dp)):
        bonus = cum[k_hi[i]] - cum[k_lo[i]]
        if out != i:
            lo[out], hi[out], dp[out] = lo[i], hi[i], dp[i]
            ons[out], helds[out] = on[i], held[i]
        dv[out] = t.dv[i] + bonus
        out += 1
        checking = checking or bonus != 0.0
        while (
            checking
            and out >= 2
            and hi[out - 2] > n_sla
            and dv[out - 2] * dp[out - 1] < dv[out - 1] * dp[out - 2]
        ):
            a = out - 2
            hi[a] = hi[out - 1]
            dp[a] += dp[out - 1]
            dv[a] += dv[out - 1]
            ons[a] = ons[a] and ons[out - 1]
            helds[a] = helds[a] or helds[out - 1]
            out -= 1
    return lo[:out], hi[:out], dp[:out], dv[:out], ons[:out], helds[:out]


@dataclass(frozen=True, slots=True)
class _NodeStatic:
    """The time-free part of a node's group: its jobs in dispatch order and their template."""

    ordered: tuple[JobView, ...]
    n_sla: int
    t: _NodeTemplate
    lost_any: bool  # some job runs (a suspension would lose work)
    latest: datetime | None  # newest command among its jobs (None: no job)


def _node_static(
    n: GpuNodeView,
    step_w: float,
    on_cut: datetime,
    off_cut: datetime,
    planned_runs: Mapping[str, bool] = _NO_JOBS,
) -> _NodeStatic:
    """Rank a node's jobs (SLA, held, the rest by rate; a job the horizon plan defers last, at
    no value; one it runs held) and look up the template of that ranking."""
    ranked: list[tuple[int, float, bool, str, JobView]] = []
    n_sla = n_held = busy = 0
    lost_any = False
    latest: datetime | None = None
    for job in n.jobs:
        state = job.state
        if state is not JobState.RUNNING and state is not JobState.SUSPENDED:
            continue  # pending, completed, failed: the scheduler's business, no power of ours
        running = state is JobState.RUNNING
        since = job.commanded_since
        if latest is None or since > latest:
            latest = since
        planned = planned_runs.get(job.job_id)
        if running:
            busy += job.gpus
            lost_any = True
        elif since > off_cut or planned is False:
            continue  # minimum off time, or deferred by the horizon plan: stays suspended
        if planned is False:
            # Deferred by the plan, which weighed its resume cost: valued at nothing, shed last.
            tier = 3
            job = replace(job, usd_per_gpu_hour=0.0)
        elif job.job_class == JobClass.SLA:
            tier = 0
            n_sla += 1
        elif (running and since > on_cut) or planned:
            tier = 1
            n_held += 1
        else:
            tier = 2
        # Within a node the last job in order is shed first: SLA, then dwell-held jobs, then
        # the rest by contract rate (running first among equals, so ties do not churn).
        ranked.append((tier, -job.usd_per_gpu_hour, not running, job.job_id, job))
    ranked.sort()  # job ids are unique, so the views themselves are never compared
    ordered = tuple(t[4] for t in ranked)
    k_cur = 0
    while k_cur < len(ordered) and ordered[k_cur].state is JobState.RUNNING:
        k_cur += 1
    t = _node_template(
        n.gpu_count,
        n.min_cap_w,
        n.max_cap_w,
        n.idle_w,
        n.host_overhead_w,
        step_w,
        tuple((j.gpus, j.usd_per_gpu_hour) for j in ordered),
        n_sla,
        n_sla + n_held,
        k_cur,
        busy,
        n.cap_w,
    )
    return _NodeStatic(ordered, n_sla, t, lost_any, latest)


# Identity cache of node statics (as for miner ladders): a node's view is rebuilt only when its
# jobs or cap change, so between changes its ranking and template are looked up, not rebuilt.
# An entry is used only once no job of the node is within a dwell time (the ranking then no
# longer depends on the clock); the entry keeps the view alive, so its id is never reused. It
# also keeps the node's steps, keyed by the switching bonuses they were built with.
@dataclass(slots=True)
class _NodeMemo:
    """What a node's cache entry keeps besides its static: its jobs' cost terms (per config)
    and its steps per (group index, switching bonuses)."""

    config: AgentConfig | None = None
    terms: tuple[_JobTerms, ...] = ()
    steps: dict[tuple[int, tuple[float, ...]], list[_Step]] = field(default_factory=dict)
    group: _Group | None = None  # a node's group is never changed by a dispatch
    group_path: tuple[str, ...] | None = None


_NODE_BY_ID: dict[int, tuple[GpuNodeView, float, _NodeStatic, _NodeMemo]] = {}


def _node_group(
    n: GpuNodeView,
    path: tuple[str, ...],
    control: ControlConfig,
    now: datetime,
    cuts: tuple[datetime, datetime],  # (minimum on, minimum off): commands after these hold
    costs: _Costs,
    gi: int,
    steps: list[_Step],
    planned_runs: Mapping[str, bool] = _NO_JOBS,
) -> _Group:
    """A node's group: its jobs in dispatch order, its rungs, and its merit-order steps."""
    on_cut, off_cut = cuts
    step_w = control.gpu_cap_step_w
    # A node with a job in the horizon plan is ranked by the plan, which changes by the block:
    # it never reads or stores the identity cache (a cached ranking would ignore the plan).
    planned = bool(planned_runs) and any(j.job_id in planned_runs for j in n.jobs)
    hit = None if planned else _NODE_BY_ID.get(id(n))
    memo: _NodeMemo | None = None
    if hit is not None and hit[0] is n and hit[1] == step_w and _settled(hit[2], cuts):
        static, memo = hit[2], hit[3]
    else:
        static = _node_static(n, step_w, on_cut, off_cut, planned_runs)
        if not planned and _settled(static, cuts):
            if len(_NODE_BY_ID) > 4096:
                _NODE_BY_ID.clear()
            memo = _NodeMemo()
            _NODE_BY_ID[id(n)] = (n, step_w, static, memo)
    ordered, n_sla, t = static.ordered, static.n_sla, static.t
    # Switching costs make the steps depend on the clock: a running job's checkpoint age, a
    # suspended job's reload when its contract has one.
    if memo is not None and memo.config is costs.config:
        terms = memo.terms
    else:
        terms = _job_terms(ordered, n, costs.config)
        if memo is not None:
            memo.config, memo.terms, memo.steps = costs.config, terms, {}
    count = n.count
    group = None if memo is None or memo.group_path != path else memo.group
    if group is None:
        group = _Group(
            count=count,
            path=path,
            rung_power_w=t.rung_power_w,
            rung_value_usd_per_h=t.rung_value_usd_per_h,
            miners=[],
            node=n,
            rungs=t.rungs,
            levels=t.levels,
            jobs=ordered,
            quiet=None if memo is None else {},
        )
        if memo is not None:
            memo.group, memo.group_path = group, path
    cached = None if memo is None else memo.steps
    if cached is not None:
        # Checkpoint ages repeat (a settlement interval divides the checkpoint period), so a
        # node whose view has not changed meets the same bonuses again and again: its steps
        # are a function of its running jobs' checkpoint ages.
        now_s = costs.now_s
        ages = tuple(
            checkpoint_age_s(now_s, since_s, ckpt_s, period_s) if running else 0.0
            for running, _, _, since_s, ckpt_s, period_s, _ in terms
        )
        hit_steps = cached.get((gi, ages))
        if hit_steps is not None:
            steps.extend(hit_steps)
            return group
    bonus = _node_bonus(terms, costs) if terms else None
    first = len(steps)
    lo: Sequence[int] = t.lo
    hi: Sequence[int] = t.hi
    dp: Sequence[float] = t.dp
    dv: Sequence[float] = t.dv
    ons: Sequence[bool] = t.on
    helds: Sequence[bool] = t.held
    if bonus is not None:
        lo, hi, dp, dv, ons, helds = _pool_with_bonus(t, bonus, n_sla)

    pw = t.rung_power_w
    cur_w = t.cur_w
    prev = _INF
    append = steps.append
    for i in range(len(lo)):
        a, b, p = lo[i], hi[i], dp[i]
        # Non-increasing along the ladder, so no step sorts before the one below it (SLA
        # steps are per job and need not be concave; rounding could tie-break the others).
        density = dv[i] / p * 1e6 if p > 0 else _INF
        if density > prev:
            density = prev
        prev = density
        top, below = pw[b], pw[a]
        if below < cur_w:
            below = cur_w
        new_w = (top - below) * count if top > below else 0.0
        is_on = ons[i]
        sla = b <= n_sla
        append(
            (0 if sla else 1, -density, 0 if is_on else 1, gi, b, a, p * count, new_w, density,
             is_on, helds[i], sla)
        )  # fmt: skip
    if cached is not None:
        if len(cached) > 16:
            cached.clear()
        cached[(gi, ages)] = steps[first:]
    return group


def _settled(static: _NodeStatic, cuts: tuple[datetime, datetime]) -> bool:
    """No job of the node is within a minimum on or off time: its ranking is time-free."""
    latest = static.latest
    return latest is None or (latest <= cuts[0] and latest <= cuts[1])


def _dispatch(ctx: _Ctx, limit_w: float, binding: str) -> _Result:
    """One greedy pass down the merit order under ``limit_w``."""
    groups = ctx.groups
    ge = [[g.size] + [0] * (len(g.rung_power_w) - 1) for g in groups]
    total = ctx.base_w
    use = dict(ctx.circuit_base_w)
    lim = ctx.circuit_limit_w
    added = 0.0
    shed_cause: dict[int, str] = {}
    hold_cause: dict[int, str] = {}
    bound: set[str] = set()
    fourcp_groups: set[int] = set()
    price, hyst, ramp_w, hold = ctx.price, ctx.hyst, ctx.ramp_w, ctx.hold
    on_thr, off_thr = price - hyst, price + hyst
    limit_cause = f"{binding} limit {limit_w / 1000:,.1f} kW reached"
    # Circuit paths only where the site has circuits (most steps then skip two loops).
    paths = [g.path for g in groups] if lim else None

    # Without a mandatory event, running SLA jobs stay whatever the limits say.
    sla_kept_w = 0.0
    if not ctx.mandatory:
        for s in ctx.steps:
            if s[0] != 0:
                break
            gi, hi, lo, grow = s[3], s[4], s[5], s[6]
            if s[9] and ge[gi][lo] > ge[gi][hi]:
                row = ge[gi]
                for r in range(lo + 1, hi + 1):
                    row[r] = 1
                total += grow
                sla_kept_w += grow
                for c in groups[gi].path:
                    use[c] += grow
    infeasible = total > limit_w + _EPS_W

    for _, _, _, gi, hi, lo, grow, new_w, density, on, held, sla in ctx.steps:
        row = ge[gi]
        avail = row[lo] - row[hi]
        if avail <= 0:
            continue
        if not (sla or held):
            if hold:
                if not on:
                    continue
            elif density < (on_thr if on else off_thr):
                if on and gi not in shed_cause:
                    if ctx.fourcp_note and density >= ctx.market_price - hyst:
                        fourcp_groups.add(gi)
                        shed_cause[gi] = (
                            f"{ctx.fourcp_note}; effective price {price:,.0f} $/MWh is above "
                            f"the value {density:,.0f} $/MWh"
                        )
                    else:
                        shed_cause[gi] = (
                            f"price {price:,.2f} $/MWh above the value {density:,.0f} $/MWh"
                        )
                continue
        fit = avail
        cause = ""
        if grow > 0:
            room = limit_w - total + _EPS_W
            n_fit = int(room // grow) if room > 0 else 0
            if n_fit < fit:
                fit, cause = n_fit, limit_cause
                bound.add(binding)
            if paths is not None:
                for c in paths[gi]:
                    room = lim[c] - use[c] + _EPS_W
                    n_fit = int(room // grow) if room > 0 else 0
                    if n_fit < fit:
                        fit, cause = n_fit, f"circuit {c} limit {lim[c] / 1000:,.1f} kW reached"
                        bound.add(f"circuit:{c}")
        if new_w > 0 and ramp_w < _INF:
            room = ramp_w - added + _EPS_W
            n_fit = int(room // new_w) if room > 0 else 0
            if n_fit < fit:
                fit, cause = n_fit, f"ramp limit: {ramp_w / 1000:,.1f} kW more this cycle"
                bound.add("ramp")
        if fit < avail:
            (shed_cause if on else hold_cause).setdefault(gi, cause)
        if fit <= 0:
            continue
        for r in range(lo + 1, hi + 1):
            row[r] += fit
        total += grow * fit
        added += new_w * fit
        if paths is not None:
            for c in paths[gi]:
                use[c] += grow * fit
    if fourcp_groups:
        bound.add("4cp")
    return _Result(
        ge=ge,
        total_w=total,
        shed_cause=shed_cause,
        hold_cause=hold_cause,
        bound=bound,
        fourcp_groups=len(fourcp_groups),
        infeasible=infeasible,
        sla_kept_w=sla_kept_w,
    )


def _plan(
    now: datetime,
    ctx: _Ctx,
    result: _Result,
    limit_w: float,
    binding: str,
    fixed: list[MinerView | GpuNodeView],
    notes: list[str],
    load: SiteLoadModel,
) -> Plan:
    site_w = load.site_w(result.total_w)
    actions: list[Action] = []
    miner_points: dict[str, str] = {}
    gpu_caps: dict[str, float] = {}
    job_states: dict[str, JobState] = {}
    for gi, (group, ge) in enumerate(zip(ctx.groups, result.ge, strict=True)):
        if group.node is None:
            _miner_actions(group, ge, gi, ctx, result, miner_points, actions)
        else:
            rung = _top_rung(ge)
            _node_actions(group, rung, gi, ctx, result, now, gpu_caps, job_states, actions)
    for view in fixed:
        if isinstance(view, MinerView):
            miner_points[view.device_id] = view.commanded
        else:
            gpu_caps[view.device_id] = view.cap_w
            for job in view.jobs:
                job_states[job.job_id] = job.state

    # Shed before start (design.md); within each, the biggest change first.
    actions.sort(key=lambda a: (not a.sheds, -abs(a.delta_power_w), a.device_id, a.job_id or ""))
    lines = list(notes)
    if result.infeasible:
        kept = (
            f" ({result.sla_kept_w / 1000:,.1f} kW of SLA jobs kept: no mandatory event)"
            if result.sla_kept_w > 0
            else ""
        )
        lines.append(
            f"infeasible: load the policy may not shed{kept} exceeds the {binding} limit "
            f"{limit_w / 1000:,.1f} kW; every controllable step is shed"
        )
    if result.fourcp_groups:
        lines.append("4CP curtailment")
    summary = (
        f"price {ctx.market_price:.2f} $/MWh (effective {ctx.price:.2f}), limit "
        f"{limit_w / 1000:,.1f} kW ({binding}), planned {site_w / 1000:,.1f} kW, "
        f"{len(actions)} action(s)"
    )
    if lines:
        summary = f"{summary}; {'; '.join(lines)}"
    return Plan(
        at=now,
        limit_w=limit_w,
        planned_power_w=site_w,
        effective_price_usd_per_mwh=ctx.price,
        value_usd_per_h=result.value_usd_per_h(ctx.groups),
        cost_usd_per_h=energy_cost_usd_per_h(site_w, ctx.market_price),
        miner_points=miner_points,
        gpu_caps_w=gpu_caps,
        job_states=job_states,
        actions=tuple(actions),
        summary=summary,
        binding=(binding, *sorted(result.bound - {binding})),
    )


def _increase_reason(ctx: _Ctx, result: _Result, gi: int) -> str:
    why = f"its value beats the price {ctx.price:,.2f} $/MWh"
    if ctx.hold:
        why = "restored within limits (safe mode hold)"
    partial = result.hold_cause.get(gi)
    return f"{why} (partly: {partial})" if partial else why


def _miner_actions(
    group: _Group,
    ge: list[int],
    gi: int,
    ctx: _Ctx,
    result: _Result,
    points: dict[str, str],
    actions: list[Action],
) -> None:
    ladder = group.ladder
    assert ladder is not None
    current = group.cur_point
    first = group.miners[0]
    old = first.points[current]
    # Members [ge[r + 1], ge[r]) end on rung r.
    for r in range(len(ge)):
        upper = ge[r + 1] if r + 1 < len(ge) else 0
        if upper >= ge[r]:
            continue
        idx = ladder.point_index[r]
        new = first.points[idx]
        members = group.miners[upper : ge[r]]
        for m in members:
            points[m.device_id] = new.name
        if idx == current:
            continue
        if idx == 0:
            kind = ActionKind.SLEEP
        elif current == 0:
            kind = ActionKind.WAKE
        else:
            kind = ActionKind.SET_PROFILE
        ceiling = ladder.index_of.get(first.max_point or "", len(first.points))
        if new.power_w < old.power_w and first.derate is not None and current > ceiling:
            why = f"thermal derate: {first.derate}"
        elif new.power_w < old.power_w:
            why = result.shed_cause.get(gi) or f"{old.name} is not on the efficient ladder"
        else:
            why = _increase_reason(ctx, result, gi)
        reason = f"{first.model} {old.name} -> {new.name}: {why}"
        delta = (new.power_w - old.power_w) * group.count
        cost = NO_COST
        model = ctx.costs.config.miner_models.get(first.model)
        if model is not None and kind is ActionKind.SLEEP:
            cost = sleep_cost(model).times(group.count)
        elif model is not None and kind is ActionKind.WAKE:
            cost = wake_cost(ctx.costs.config, model, new, ctx.costs.hashprice).times(group.count)
        for m in members:
            actions.append(
                Action(
                    m.device_id,
                    kind,
                    new.name,
                    reason,
                    delta,
                    switch_lost_usd=cost.lost_usd,
                    switch_energy_wh=cost.energy_wh,
                )
            )


def _node_actions(
    group: _Group,
    rung: int,
    gi: int,
    ctx: _Ctx,
    result: _Result,
    now: datetime,
    caps: dict[str, float],
    job_states: dict[str, JobState],
    actions: list[Action],
) -> None:
    n = group.node
    assert n is not None
    quiet = group.quiet
    if quiet is not None:
        hit = quiet.get(rung)
        if hit is not None:
            caps[n.device_id] = hit[0]
            job_states.update(hit[1])
            return
    n_actions = len(actions)
    k, j, _, _ = group.rungs[rung]
    cap = group.levels[j] if k > 0 and j >= 0 else n.cap_w
    caps[n.device_id] = cap
    planned = {job.job_id for job in group.jobs[:k]}
    controlled = {job.job_id for job in group.jobs}
    shed_why = result.shed_cause.get(gi) or "price above its value"
    kept_gpus = 0
    for job in n.jobs:
        job_states[job.job_id] = job.state
        running = job.state is JobState.RUNNING
        if running and job.job_id in controlled and job.job_id not in planned:
            job_states[job.job_id] = JobState.SUSPENDED
            cost = _job_cost(job, n, ctx.costs).times(n.count)
            lost = cost.lost_usd - job.penalty_usd * n.count
            work = f"loses {lost:,.2f} $ of work since its checkpoint"
            if job.job_class == JobClass.SLA:
                what = f"{job.penalty_usd * n.count:,.2f} $ penalty, {work}"
                prefix = "SLA job shed last for a mandatory event: "
            else:
                what = work
                prefix = ""
            actions.append(
                Action(
                    device_id=n.device_id,
                    kind=ActionKind.SUSPEND_JOB,
                    target=JobState.SUSPENDED.value,
                    reason=(
                        f"{prefix}{job.job_class.value} job {job.job_id} ({job.gpus} GPU at "
                        f"{job.usd_per_gpu_hour:.2f} $/GPU-h, {what}): {shed_why}"
                    ),
                    delta_power_w=-job.gpus * max(n.cap_w - n.idle_w, 0.0) * n.count,
                    job_id=job.job_id,
                    switch_lost_usd=cost.lost_usd,
                )
            )
        elif running:
            kept_gpus += job.gpus
        elif job.job_id in planned:
            job_states[job.job_id] = JobState.RUNNING
            cost = _job_cost(job, n, ctx.costs).times(n.count)
            actions.append(
                Action(
                    device_id=n.device_id,
                    kind=ActionKind.RESUME_JOB,
                    target=JobState.RUNNING.value,
                    reason=(
                        f"{job.job_class.value} job {job.job_id} ({job.gpus} GPU at "
                        f"{job.usd_per_gpu_hour:.2f} $/GPU-h): "
                        f"{_increase_reason(ctx, result, gi)}"
                    ),
                    delta_power_w=job.gpus * max(cap - n.idle_w, 0.0) * n.count,
                    job_id=job.job_id,
                    switch_lost_usd=cost.lost_usd,
                )
            )
    if k > 0 and abs(cap - n.cap_w) >= 0.5:
        lower = cap < n.cap_w
        why = (
            (f"thermal derate: {n.derate}" if n.derate and cap >= n.max_cap_w - 0.5 else None)
            or result.shed_cause.get(gi)
            or result.hold_cause.get(gi)
            or "price above the value of the top cap steps"
            if lower
            else _increase_reason(ctx, result, gi)
        )
        actions.append(
            Action(
                device_id=n.device_id,
                kind=ActionKind.SET_GPU_CAP,
                target=f"{cap:.0f}",
                reason=(
                    f"{n.gpu_count} GPU cap {n.cap_w:.0f} -> {cap:.0f} W "
                    f"({'lower' if lower else 'raise'}): {why}"
                ),
                delta_power_w=kept_gpus * (cap - n.cap_w) * n.count,
            )
        )
    if quiet is not None and len(actions) == n_actions:
        quiet[rung] = (caps[n.device_id], {job.job_id: job_states[job.job_id] for job in n.jobs})
