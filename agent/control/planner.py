"""The horizon planner: a pure MILP over the next 24–36 h of prices, switching costs and jobs.

:func:`plan_horizon` takes a :class:`HorizonInput` (the intervals ahead with their forecast
prices and 4CP risk, the hashprice, the miner fleet as blocks of identical miners with their
operating points and switching costs, the deferrable AI jobs with their GPU-hours, deadlines and
resume costs, the GPU capacity and load already committed, the interconnect limit) and returns a
:class:`HorizonPlan`: per interval, how many miners of each block run and at which power, which
deferrable jobs run, and each block's hysteresis band for the live policy.

The model (``scipy.optimize.milp``, HiGHS, with a time limit), per block ``b`` and interval ``t``:

* ``on[b,t]`` integer units awake, split into continuous ``y[b,t,p]`` units at each profile;
  ``wake[b,t] − sleep[b,t] = on[b,t] − on[b,t−1]``; each wake costs the hashing it loses and its
  energy overhead, each sleep its energy overhead;
* dwell: units woken in the last ``min_on`` intervals are still awake, units put to sleep in the
  last ``min_off`` intervals still asleep;
* per deferrable job ``j``: binary ``run[j,t]`` (all its GPUs or none), ``start[j,t] ≥ run[j,t] −
  run[j,t−1]`` charged its resume cost (the work lost at the suspension before it), and its
  remaining GPU-hours done by its deadline — a **hard** constraint;
* the GPUs free for deferrable work, and the interconnect limit, in every interval;
* objective: mining revenue − energy cost at (price + 4CP adder) − switching costs. The
  real-time price so far, when given, replaces the first interval's forecast.

The band. A block's first step (sleep → its most efficient profile) earns ``b`` USD per MWh it
draws. Cycling one unit costs ``K`` (a wake and a sleep); a curtailment commits at least
``spike_h`` hours, so it pays only if the price exceeds ``b`` by ``K / (P × spike_h)``. Where the
plan runs the block, the band is ``[b, b + margin]``: curtail above ``b + margin`` (a short spike
below that is ridden through), restore below ``b``. Where the plan sleeps it, ``[b − margin, b]``:
a short dip does not wake it. The live policy only ever *holds* a block in its state inside the
band; outside it, the ordinary rule decides.

A solve that fails, runs out of time without a solution or meets bad input returns a plan with
``usable = False`` and the reason; the caller falls back to the rule. When the deadlines cannot
all be met, deferrable work is scheduled as soon as possible (earliest deadline first) and the
plan says so; the miners are then planned around that schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from agent.control.domain import OperatingPoint

# Bounds on what one solve may be asked: beyond these the input is refused, not solved slowly.
MAX_INTERVALS = 36 * 12  # 36 h at 5 minutes
MAX_BLOCKS = 64
MAX_JOBS = 256
MAX_PRICE_USD_PER_MWH = 1e6  # a 4CP adder at risk 1 and 60 USD/kW-year is 60,000


class PlanStatus(StrEnum):
    OPTIMAL = "optimal"
    TIME_LIMIT = "time_limit"  # feasible, not proven optimal: usable
    DEADLINE_INFEASIBLE = "deadline_infeasible"  # deferrable work ASAP, miners planned around it
    FAILED = "failed"  # no usable plan: the caller falls back to the rule
    BAD_INPUT = "bad_input"


# A number for /metrics (``site_planner_status``): 0 optimal, 1 time limit, 2 deadlines
# infeasible, 3 failed, 4 bad input.
STATUS_CODE = {s: k for k, s in enumerate(PlanStatus)}


@dataclass(frozen=True, slots=True)
class SwitchingCost:
    """What cycling one miner costs (per unit): hashing lost on wake, energy overheads. Callers
    build it from the site model (:func:`agent.control.site.planner_switching`), so the plan
    weighs what the policy and the settlement charge."""

    wake_lost_s: float = 0.0  # seconds of hashing lost after a wake (ramp and catch-up)
    wake_energy_kwh: float = 0.0  # energy drawn by a wake beyond the profile's power
    sleep_energy_kwh: float = 0.0


@dataclass(frozen=True, slots=True)
class MinerBlock:
    """``count`` identical miners (one model): ``points`` has ``sleep`` first, ascending power."""

    block_id: str  # the policy matches miners to blocks by their model name
    count: int
    points: tuple[OperatingPoint, ...]
    switching: SwitchingCost = SwitchingCost()
    units_on: int | None = None  # awake at the plan's start; None: all


@dataclass(frozen=True, slots=True)
class DeferrableJob:
    """A training job that may run in any interval before its deadline, checkpointing."""

    job_id: str
    gpus: int
    remaining_gpu_h: float
    deadline: datetime  # all work done by then
    gpu_w: float  # power per GPU while running, above the idle power already counted
    resume_cost_usd: float = 0.0  # lost work and restart overhead per suspension and resume
    running: bool = False  # running at the plan's start
    # Its throughput at the lowest GPU cap, as a share of full (prices may lower the cap while
    # it runs): what its deadline reserve allows for (:func:`deadline_reserve_s`).
    min_fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class HorizonInput:
    """Everything the planner may know at ``at``; every per-interval tuple has one entry each."""

    at: datetime
    starts: tuple[datetime, ...]  # interval starts, ascending, contiguous
    interval_s: float
    price_usd_per_mwh: tuple[float, ...]  # day-ahead (or the real-time price so far)
    hashprice_usd_per_ph_day: float
    pool_fee: float
    blocks: tuple[MinerBlock, ...]
    limit_w: float  # interconnect limit less the safety margin
    base_load_w: tuple[float, ...] = ()  # committed load: hosts, idle GPUs, SLA and other jobs
    free_gpus: tuple[int, ...] = ()  # GPUs free for deferrable work (empty: unlimited)
    fourcp_adder_usd_per_mwh: tuple[float, ...] = ()  # expected 4CP charge per MWh
    # The real-time price so far: it replaces the forecast of the first interval (the price
    # holds until the next settles), so a forecast that proved wrong re-plans from the truth.
    realtime_usd_per_mwh: float | None = None
    jobs: tuple[DeferrableJob, ...] = ()
    min_on_s: float = 0.0
    min_off_s: float = 0.0
    spike_h: float = 0.25  # the shortest curtailment the band weighs switching against
    time_limit_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Band:
    """A block's plan for one interval: units awake, their power and the hysteresis band."""

    units_on: int
    power_w: float  # whole block
    curtail_above_usd_per_mwh: float
    restore_below_usd_per_mwh: float
    hashrate_ths: float = 0.0  # whole block


@dataclass(frozen=True, slots=True)
class HorizonPlan:
    """The planner's answer; ``usable`` False means: fall back to the rule (``reason`` says why)."""

    status: PlanStatus
    reason: str
    at: datetime
    starts: tuple[datetime, ...] = ()
    interval_s: float = 0.0
    block_ids: tuple[str, ...] = ()
    bands: tuple[tuple[Band, ...], ...] = ()  # [interval][block]
    job_ids: tuple[str, ...] = ()
    job_run: tuple[tuple[bool, ...], ...] = ()  # [interval][job]
    objective_usd: float = 0.0  # mining revenue − energy − 4CP − switching over the horizon
    switching_usd: float = 0.0
    wakes: int = 0
    solve_s: float = 0.0

    @property
    def usable(self) -> bool:
        return self.status in (
            PlanStatus.OPTIMAL,
            PlanStatus.TIME_LIMIT,
            PlanStatus.DEADLINE_INFEASIBLE,
        )

    def index_at(self, now: datetime) -> int | None:
        """The interval holding ``now``, or None outside the plan (a stale plan is not used)."""
        if not self.usable or not self.starts:
            return None
        k = int((now - self.starts[0]).total_seconds() // self.interval_s)
        return k if 0 <= k < len(self.starts) else None

    def band(self, block_id: str, now: datetime) -> Band | None:
        k = self.index_at(now)
        if k is None or block_id not in self.block_ids:
            return None
        return self.bands[k][self.block_ids.index(block_id)]

    def job_runs(self, job_id: str, now: datetime) -> bool | None:
        """Whether the plan runs a deferrable job now; None for a job the plan does not know."""
        k = self.index_at(now)
        if k is None or job_id not in self.job_ids:
            return None
        return self.job_run[k][self.job_ids.index(job_id)]


class _BadInput(ValueError):
    pass


def first_step(block: MinerBlock, hashprice: float, fee: float) -> tuple[float, float, float]:
    """(value density USD/MWh, power above standby W, revenue USD/h) of a block's best first
    step from sleep: the profile earning most per extra watt (the policy's first rung)."""
    sleep = block.points[0]
    best = (0.0, 0.0, 0.0)
    for p in block.points[1:]:
        dp = p.power_w - sleep.power_w
        rev = hashprice * p.hashrate_ths / 1000.0 / 24.0 * (1.0 - fee)
        if dp > 0 and rev / dp * 1e6 > best[0]:
            best = (rev / dp * 1e6, dp, rev)
    return best


def unit_cycle_cost_usd(
    points: Sequence[OperatingPoint],
    switching: SwitchingCost,
    hashprice: float,
    fee: float,
    price_usd_per_mwh: float,
) -> float:
    """One unit's wake and sleep at energy price ``price_usd_per_mwh``: the hashing lost at its
    top point plus the energy overheads. With ``switching`` from
    :func:`agent.control.site.planner_switching` it is the site model's wake (to the top point)
    and sleep cost, what the policy weighs and the settlement charges."""
    top_rev_h = max(
        (hashprice * p.hashrate_ths / 1000.0 / 24.0 * (1.0 - fee) for p in points), default=0.0
    )
    energy_kwh = switching.wake_energy_kwh + switching.sleep_energy_kwh
    return top_rev_h * switching.wake_lost_s / 3600.0 + energy_kwh / 1000.0 * max(
        price_usd_per_mwh, 0.0
    )


def cycle_cost_usd(block: MinerBlock, hashprice: float, fee: float, price: float) -> float:
    """:func:`unit_cycle_cost_usd` of one of the block's units."""
    return unit_cycle_cost_usd(block.points, block.switching, hashprice, fee, price)


def _check(inp: HorizonInput) -> None:
    n = len(inp.starts)
    if not 1 <= n <= MAX_INTERVALS:
        raise _BadInput(f"{n} intervals (expected 1..{MAX_INTERVALS})")
    if not (math.isfinite(inp.interval_s) and inp.interval_s > 0):
        raise _BadInput(f"interval {inp.interval_s} s is not a positive number")
    if len(inp.blocks) > MAX_BLOCKS or len(inp.jobs) > MAX_JOBS:
        raise _BadInput(f"{len(inp.blocks)} blocks and {len(inp.jobs)} jobs: too many")
    for name in ("price_usd_per_mwh", "base_load_w", "free_gpus", "fourcp_adder_usd_per_mwh"):
        got = len(getattr(inp, name))
        if got not in ((n,) if name == "price_usd_per_mwh" else (0, n)):
            raise _BadInput(f"{name} has {got} entries for {n} intervals")
    rt = () if inp.realtime_usd_per_mwh is None else (inp.realtime_usd_per_mwh,)
    for name, values in (
        ("price_usd_per_mwh", inp.price_usd_per_mwh),
        ("fourcp_adder_usd_per_mwh", inp.fourcp_adder_usd_per_mwh),
        ("realtime_usd_per_mwh", rt),
    ):
        for v in values:
            if not (math.isfinite(v) and abs(v) <= MAX_PRICE_USD_PER_MWH):
                raise _BadInput(f"{name} holds {v}, outside ±{MAX_PRICE_USD_PER_MWH:g}")
    for v in (inp.hashprice_usd_per_ph_day, inp.limit_w, inp.time_limit_s, *inp.base_load_w):
        if not (math.isfinite(v) and v >= 0):
            raise _BadInput(f"{v} is not a finite non-negative number")
    for b in inp.blocks:
        if (
            b.count < 0
            or len(b.points) < 2
            or any(
                not (math.isfinite(p.power_w) and math.isfinite(p.hashrate_ths)) for p in b.points
            )
        ):
            raise _BadInput(f"block {b.block_id}: needs a count ≥ 0 and finite points")
    for j in inp.jobs:
        if j.gpus < 1 or not (math.isfinite(j.remaining_gpu_h) and j.remaining_gpu_h >= 0):
            raise _BadInput(f"job {j.job_id}: needs GPUs ≥ 1 and finite remaining GPU-hours")
        if not (math.isfinite(j.gpu_w) and math.isfinite(j.resume_cost_usd)):
            raise _BadInput(f"job {j.job_id}: power and resume cost must be finite")


def plan_horizon(inp: HorizonInput) -> HorizonPlan:
    """Solve the horizon; never raises for bad input or a failed solve (see the status)."""
    t0 = time.perf_counter()
    try:
        _check(inp)
    except _BadInput as exc:
        return HorizonPlan(PlanStatus.BAD_INPUT, f"planner input refused: {exc}", inp.at)
    if inp.realtime_usd_per_mwh is not None:
        inp = replace(inp, price_usd_per_mwh=(inp.realtime_usd_per_mwh, *inp.price_usd_per_mwh[1:]))
    n = len(inp.starts)
    if not inp.blocks and not inp.jobs:
        # Nothing to plan (no miners, no deferrable work): an empty plan, not a solver error.
        return HorizonPlan(
            status=PlanStatus.OPTIMAL,
            reason="nothing to plan",
            at=inp.at,
            starts=inp.starts,
            interval_s=inp.interval_s,
            bands=((),) * n,
            job_run=((),) * n,
            solve_s=time.perf_counter() - t0,
        )
    deadline_idx = [_deadline_index(inp, j) for j in inp.jobs]
    fixed: list[list[bool]] | None = None
    pinned: frozenset[int] = frozenset()
    status_note = ""
    late = _infeasible_jobs(inp, deadline_idx)
    if late:
        fixed, missed = _asap(inp, deadline_idx)
        # Without a shared GPU pool only the jobs that cannot make it run as soon as possible;
        # the rest are still planned. With one, they all are (the ASAP ones take its GPUs).
        pinned = frozenset(late if not inp.free_gpus else range(len(inp.jobs)))
        names = [inp.jobs[k].job_id for k in sorted(late)]
        status_note = (
            f"deadlines cannot all be met ({', '.join(names) or 'GPU or power limit'}): "
            f"{'that' if len(pinned) < len(inp.jobs) else 'deferrable'} work runs as soon as "
            "possible"
        )
    result = _try_solve(inp, deadline_idx, fixed, pinned)
    if result is None and len(pinned) < len(inp.jobs):
        # The MILP found the deadlines infeasible with the interconnect coupled in: go ASAP.
        fixed, missed = _asap(inp, deadline_idx)
        pinned = frozenset(range(len(inp.jobs)))
        status_note = (
            f"deadlines cannot all be met within the limits ({', '.join(missed) or 'power'}): "
            "deferrable work runs as soon as possible"
        )
        result = _try_solve(inp, deadline_idx, fixed, pinned)
    solve_s = time.perf_counter() - t0
    if isinstance(result, str):
        return HorizonPlan(PlanStatus.FAILED, result, inp.at, solve_s=solve_s)
    if result is None:
        return HorizonPlan(
            PlanStatus.FAILED, "planner found no feasible plan even with ASAP jobs", inp.at,
            solve_s=solve_s,
        )  # fmt: skip
    on, runs, objective, switching, wakes, proven = result
    status = PlanStatus.OPTIMAL if proven else PlanStatus.TIME_LIMIT
    reason = "optimal" if proven else "time limit reached: best plan found so far"
    if fixed is not None:
        status, reason = PlanStatus.DEADLINE_INFEASIBLE, status_note
    bands = tuple(
        tuple(_band(inp, b, *on[t][bi], t) for bi, b in enumerate(inp.blocks)) for t in range(n)
    )
    return HorizonPlan(
        status=status,
        reason=reason,
        at=inp.at,
        starts=inp.starts,
        interval_s=inp.interval_s,
        block_ids=tuple(b.block_id for b in inp.blocks),
        bands=bands,
        job_ids=tuple(j.job_id for j in inp.jobs),
        job_run=tuple(tuple(r) for r in runs),
        objective_usd=objective,
        switching_usd=switching,
        wakes=wakes,
        solve_s=solve_s,
    )


def _try_solve(
    inp: HorizonInput,
    dl: Sequence[int],
    fixed: list[list[bool]] | None,
    pinned: frozenset[int] = frozenset(),
) -> _Solution | str | None:
    try:
        return _solve(inp, dl, fixed, pinned)
    except Exception as exc:  # a solver error must fall back to the rule, never crash the loop
        return f"planner solve raised {type(exc).__name__}: {exc}"


def _deadline_index(inp: HorizonInput, job: DeferrableJob) -> int:
    """Intervals ``0 .. k−1`` end by the deadline; returns ``k`` (0: none does)."""
    end0 = inp.starts[0] + timedelta(seconds=inp.interval_s)
    k = int((job.deadline - end0).total_seconds() // inp.interval_s) + 1
    return max(0, min(k, len(inp.starts)))


# A deferrable job keeps a reserve before its deadline: the policy runs it, whatever the plan
# or the price, once its slack is down to that, and the planner leaves no less after the
# horizon for the next plan to use. The reserve covers the job running at its lowest GPU cap
# all the way (a price may lower the cap at any time), a tenth more, and two settlement
# intervals: a deadline is kept whatever the prices do.
DEADLINE_MARGIN_S = 2 * 900.0


def deadline_reserve_s(remaining_gpu_h: float, gpus: int, min_fraction: float = 1.0) -> float:
    """Seconds a deferrable job keeps in hand before its deadline beyond its run time at full
    throughput (see DEADLINE_MARGIN_S)."""
    run_s = remaining_gpu_h / max(gpus, 1) * 3600.0
    slowest_s = run_s / min(max(min_fraction, 0.05), 1.0)
    return slowest_s - run_s + 0.1 * slowest_s + DEADLINE_MARGIN_S


def need_gpu_h(inp: HorizonInput, job: DeferrableJob) -> float:
    """GPU-hours a job must run within the horizon: all its work when its deadline falls inside
    it; else what its GPUs could not do between the horizon's end and the deadline (less the
    reserve), which the next plan, knowing those hours' prices, places."""
    end = inp.starts[-1] + timedelta(seconds=inp.interval_s)
    after_s = (job.deadline - end).total_seconds()
    if after_s <= 0:
        return job.remaining_gpu_h
    usable_s = max(
        0.0, after_s - deadline_reserve_s(job.remaining_gpu_h, job.gpus, job.min_fraction)
    )
    return max(0.0, job.remaining_gpu_h - job.gpus * usable_s / 3600.0)


def _need_intervals(inp: HorizonInput, job: DeferrableJob) -> int:
    per = job.gpus * inp.interval_s / 3600.0
    need = need_gpu_h(inp, job)
    return math.ceil(need / per - 1e-9) if need > 0 else 0


def _infeasible_jobs(inp: HorizonInput, dl: Sequence[int]) -> list[int]:
    """A quick necessary test: the jobs that alone do not fit before their deadline in the
    free GPUs (a deadline in the interval now running, hourly rounding of a short job)."""
    late = []
    for k, (j, d) in enumerate(zip(inp.jobs, dl, strict=True)):
        need = _need_intervals(inp, j)
        fits = sum(1 for t in range(d) if not inp.free_gpus or inp.free_gpus[t] >= j.gpus)
        if need > fits:
            late.append(k)
    return late


def _asap(inp: HorizonInput, dl: Sequence[int]) -> tuple[list[list[bool]], list[str]]:
    """Earliest-deadline-first, each job in the first intervals with free GPUs."""
    n = len(inp.starts)
    free = list(inp.free_gpus) if inp.free_gpus else [10**9] * n
    runs = [[False] * len(inp.jobs) for _ in range(n)]
    missed: list[str] = []
    for ji in sorted(range(len(inp.jobs)), key=lambda j: (inp.jobs[j].deadline, j)):
        job = inp.jobs[ji]
        need = _need_intervals(inp, job)
        for t in range(n):
            if need <= 0:
                break
            if free[t] >= job.gpus:
                free[t] -= job.gpus
                runs[t][ji] = True
                need -= 1
                if t >= dl[ji] and job.job_id not in missed:
                    missed.append(job.job_id)
        if need > 0 and job.job_id not in missed:
            missed.append(job.job_id)
    return runs, missed


_Solution = tuple[list[list[tuple[int, float, float]]], list[list[bool]], float, float, int, bool]


def _solve(
    inp: HorizonInput,
    dl: Sequence[int],
    fixed: list[list[bool]] | None,
    pinned: frozenset[int] = frozenset(),
) -> _Solution | str | None:
    """The MILP. Returns the solution, None when infeasible, or a failure reason. The jobs in
    ``pinned`` run as ``fixed`` says (as soon as possible); the others are planned."""
    # scipy loads inside the solve: importing the policy stays light (the CLI's --help).
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]
    from scipy.sparse import coo_array  # type: ignore[import-untyped]

    n = len(inp.starts)
    dt_h = inp.interval_s / 3600.0
    hp, fee = inp.hashprice_usd_per_ph_day, inp.pool_fee
    price = [
        p + (inp.fourcp_adder_usd_per_mwh[t] if inp.fourcp_adder_usd_per_mwh else 0.0)
        for t, p in enumerate(inp.price_usd_per_mwh)
    ]
    cost: list[float] = []
    lb: list[float] = []
    ub: list[float] = []
    integ: list[int] = []

    def var(c: float, lo: float, hi: float, integer: bool = False) -> int:
        cost.append(c)
        lb.append(lo)
        ub.append(hi)
        integ.append(1 if integer else 0)
        return len(cost) - 1

    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rlo: list[float] = []
    rhi: list[float] = []

    def row(terms: Sequence[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(rlo)
        for c, v in terms:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        rlo.append(lo)
        rhi.append(hi)

    power_terms: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    block_terms: list[list[list[tuple[int, float]]]] = []  # [block][t] -> (y, W above sleep)
    const_w = [inp.base_load_w[t] if inp.base_load_w else 0.0 for t in range(n)]
    on_idx: list[list[int]] = []
    wake_idx: list[list[int]] = []
    wake_cost: list[list[float]] = []
    l_on = max(1, math.ceil(inp.min_on_s / inp.interval_s - 1e-9)) if inp.min_on_s > 0 else 0
    l_off = max(1, math.ceil(inp.min_off_s / inp.interval_s - 1e-9)) if inp.min_off_s > 0 else 0
    for b in inp.blocks:
        sleep = b.points[0]
        sw = b.switching
        top_rev_h = max(hp * p.hashrate_ths / 1000.0 / 24.0 * (1 - fee) for p in b.points)
        init = b.count if b.units_on is None else max(0, min(b.units_on, b.count))
        ons, wakes, wcost = [], [], []
        block_terms.append([])
        prev_on: int | None = None
        sleeps: list[int] = []
        for t in range(n):
            const_w[t] += sleep.power_w * b.count
            o = var(0.0, 0.0, b.count, integer=True)
            ys = []
            for p in b.points[1:]:
                rev = hp * p.hashrate_ths / 1000.0 / 24.0 * (1 - fee)
                dp = p.power_w - sleep.power_w
                y = var((dp / 1e6 * price[t] - rev) * dt_h, 0.0, b.count)
                ys.append(y)
                power_terms[t].append((y, dp))
            row([(o, -1.0), *((y, 1.0) for y in ys)], 0.0, 0.0)
            block_terms[-1].append(power_terms[t][-len(ys) :] if ys else [])
            wc = top_rev_h * sw.wake_lost_s / 3600.0 + sw.wake_energy_kwh / 1000.0 * max(
                price[t], 0.0
            )
            sc = sw.sleep_energy_kwh / 1000.0 * max(price[t], 0.0)
            w = var(wc, 0.0, b.count)
            s = var(sc, 0.0, b.count)
            # wake − sleep = on[t] − on[t−1]
            if prev_on is None:
                row([(w, 1.0), (s, -1.0), (o, -1.0)], -init, -init)
            else:
                row([(w, 1.0), (s, -1.0), (o, -1.0), (prev_on, 1.0)], 0.0, 0.0)
            ons.append(o)
            wakes.append(w)
            sleeps.append(s)
            wcost.append(wc + sc)
            prev_on = o
            if l_on > 1:  # one interval is implied by wake − sleep = on[t] − on[t−1]
                row([*((wakes[k], 1.0) for k in range(max(0, t - l_on + 1), t + 1)), (o, -1.0)],
                    -np.inf, 0.0)  # fmt: skip
            if l_off > 1:
                row([*((sleeps[k], 1.0) for k in range(max(0, t - l_off + 1), t + 1)), (o, 1.0)],
                    -np.inf, b.count)  # fmt: skip
        on_idx.append(ons)
        wake_idx.append(wakes)
        wake_cost.append(wcost)

    run_idx: list[list[int]] = []
    horizon_end = inp.starts[-1] + timedelta(seconds=inp.interval_s)
    for ji, j in enumerate(inp.jobs):
        runs = []
        prev: int | None = None
        pin = fixed is not None and ji in pinned
        for t in range(n):
            if fixed is not None and pin:
                lo = hi = 1.0 if fixed[t][ji] else 0.0
            else:
                lo, hi = 0.0, (1.0 if t < dl[ji] else 0.0)
            r = var(j.gpus * j.gpu_w / 1e6 * price[t] * dt_h, lo, hi, integer=True)
            st = var(j.resume_cost_usd, 0.0, 1.0)
            if prev is None:
                row([(st, 1.0), (r, -1.0)], -(1.0 if j.running else 0.0), np.inf)
            else:
                row([(st, 1.0), (r, -1.0), (prev, 1.0)], 0.0, np.inf)
            power_terms[t].append((r, j.gpus * j.gpu_w))
            runs.append(r)
            prev = r
        need = need_gpu_h(inp, j)
        if not pin and need > 0:
            row([(r, j.gpus * dt_h) for r in runs[: dl[ji]]], need - 1e-9, np.inf)
        if not pin and j.resume_cost_usd > 0 and j.deadline > horizon_end and runs:
            # Work due past the horizon that is paused at its end will have to be resumed:
            # that resume costs the same as one inside it, unless all the work is done within.
            done = var(0.0, 0.0, 1.0, integer=True)
            row([(r, j.gpus * dt_h) for r in runs] + [(done, -j.remaining_gpu_h)], 0.0, np.inf)
            paused = var(j.resume_cost_usd, 0.0, 1.0)
            row([(paused, 1.0), (runs[-1], 1.0), (done, 1.0)], 1.0, np.inf)
        run_idx.append(runs)
    if inp.free_gpus and inp.jobs and not pinned:
        for t in range(n):
            row([(run_idx[ji][t], float(j.gpus)) for ji, j in enumerate(inp.jobs)],
                -np.inf, float(inp.free_gpus[t]))  # fmt: skip
    for t in range(n):
        if power_terms[t]:
            row(power_terms[t], -np.inf, inp.limit_w - const_w[t])

    nvar = len(cost)
    constraints = []
    if rlo:
        a = coo_array((vals, (rows, cols)), shape=(len(rlo), nvar)).tocsr()
        constraints.append(LinearConstraint(a, np.array(rlo), np.array(rhi)))
    res = milp(
        c=np.array(cost),
        integrality=np.array(integ),
        bounds=Bounds(np.array(lb), np.array(ub)),
        constraints=constraints,
        options={"time_limit": float(inp.time_limit_s), "mip_rel_gap": 1e-6},
    )
    if res.status == 2:
        return None
    if res.x is None:
        return f"planner solve gave no plan: {res.message}"
    x = res.x
    on = [
        [
            (
                round(float(x[on_idx[bi][t]])),
                b.points[0].power_w * b.count + sum(float(x[y]) * w for y, w in block_terms[bi][t]),
                sum(
                    float(x[y]) * p.hashrate_ths
                    for (y, _), p in zip(block_terms[bi][t], b.points[1:], strict=True)
                ),
            )
            for bi, b in enumerate(inp.blocks)
        ]
        for t in range(n)
    ]
    runs_out = [[bool(x[run_idx[ji][t]] > 0.5) for ji in range(len(inp.jobs))] for t in range(n)]
    switching = sum(
        float(x[wake_idx[bi][t]]) * wake_cost[bi][t]
        for bi in range(len(inp.blocks))
        for t in range(n)
    )
    n_wakes = round(sum(float(x[w]) for ws in wake_idx for w in ws))
    const_cost = sum(
        b.points[0].power_w * b.count / 1e6 * price[t] * dt_h for b in inp.blocks for t in range(n)
    )
    objective = -(float(res.fun) + const_cost)
    return on, runs_out, objective, switching, n_wakes, res.status == 0


def _band(
    inp: HorizonInput, block: MinerBlock, units_on: int, power_w: float, ths: float, t: int
) -> Band:
    hp, fee = inp.hashprice_usd_per_ph_day, inp.pool_fee
    density, dp_w, _ = first_step(block, hp, fee)
    k_usd = cycle_cost_usd(block, hp, fee, inp.price_usd_per_mwh[t])
    margin = k_usd / (dp_w / 1e6 * inp.spike_h) if dp_w > 0 and inp.spike_h > 0 else 0.0
    if block.count > 0 and units_on * 2 >= block.count:
        return Band(units_on, power_w, density + margin, density, ths)
    return Band(units_on, power_w, density, density - margin, ths)
