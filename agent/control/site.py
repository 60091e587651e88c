"""The site model: the one place for the site's physics and its job contracts.

Everything that says what the site *is* and what a device does at an operating point lives here, and
the live policy, the coordinator, the GPU fleet, the demo and the backtest all call these functions:
a miner model's ladder of operating points, the expansion of ``count`` config lines into devices,
the power of a GPU node at a cap with some of its GPUs busy, the site limit, the contract of a job
class, when deferrable work is due and what the planner knows of it, the work a suspension loses,
and the cost of switching a device (waking or sleeping a miner, suspending or resuming a job), and
the assembly of the snapshot the policy decides on (live and in the backtest). Money per interval
(revenue, energy, 4CP, events, penalties) is :mod:`agent.control.settlement`; the per-hour rates are
:mod:`agent.control.economics`.

All functions are pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.control.config import (
    AgentConfig,
    GpuNodeConfig,
    JobClassContract,
    MinerModelConfig,
    unit_ids,
)
from agent.control.cooling import SiteLoadModel
from agent.control.domain import (
    SLEEP,
    ActiveEvent,
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    PriceView,
    Snapshot,
)
from agent.control.economics import (
    breakeven_usd_per_mwh,
    gpu_throughput_fraction,
    mining_revenue_usd_per_h,
)
from agent.control.planner import (
    DeferrableJob,
    HorizonPlan,
    SwitchingCost,
    deadline_reserve_s,
)
from drivers.jobs.base import JobClass, JobState

# --- miners --------------------------------------------------------------------------------


def miner_ladder(model: MinerModelConfig) -> tuple[OperatingPoint, ...]:
    """A model's operating points: ``sleep`` first, then profiles by ascending power."""
    profiles = sorted(model.profiles, key=lambda p: p.power_w)
    return (
        OperatingPoint(SLEEP, model.standby_w, 0.0),
        *(OperatingPoint(p.name, p.power_w, p.hashrate_ths) for p in profiles),
    )


# --- GPU nodes -----------------------------------------------------------------------------


def gpu_nodes(config: AgentConfig) -> list[tuple[int, str, GpuNodeConfig]]:
    """Every configured GPU node as (index of its config line, device id, line), ``count``
    expanded."""
    return [
        (i, device_id, n)
        for i, n in enumerate(config.gpu_nodes)
        for device_id in unit_ids(n.id, n.count)
    ]


def node_power_w(
    host_overhead_w: float, gpu_count: int, idle_w: float, busy_gpus: int, cap_w: float
) -> float:
    """A node's power: its host, every busy GPU at the cap, every other GPU idle.

    The host draws whenever the node is up, jobs or not (no action powers a host down)."""
    return host_overhead_w + busy_gpus * cap_w + max(gpu_count - busy_gpus, 0) * idle_w


# --- the site ------------------------------------------------------------------------------


def site_limit_w(config: AgentConfig) -> float:
    """The interconnect limit less the safety margin: the most the policy plans to draw."""
    site = config.site
    return max((site.interconnect_limit_kw - site.safety_margin_kw) * 1000.0, 0.0)


@dataclass(frozen=True, slots=True)
class SiteModel:
    """The static site from its config: ladders, nameplates, expanded GPU nodes, the limit."""

    config: AgentConfig
    ladders: dict[str, tuple[OperatingPoint, ...]]
    nameplates: dict[str, float]
    miners_by_model: dict[str, int]
    nodes: tuple[GpuNodeConfig, ...]  # one entry per node (``count`` expanded)
    node_ids: tuple[str, ...]
    limit_w: float

    def fleet_breakeven_usd_per_mwh(self, hashprice: float) -> float:
        """Breakeven of each model at its top profile, weighted by the model's top power."""
        fee = self.config.economics.pool_fee
        num = den = 0.0
        for model, count in self.miners_by_model.items():
            top = self.ladders[model][-1]
            weight = count * top.power_w
            num += weight * breakeven_usd_per_mwh(hashprice, fee, top.power_w / top.hashrate_ths)
            den += weight
        return num / den if den else math.inf


def site_model(config: AgentConfig) -> SiteModel:
    by_model: dict[str, int] = {}
    for m in config.miners:
        by_model[m.model] = by_model.get(m.model, 0) + m.count
    expanded = gpu_nodes(config)
    return SiteModel(
        config=config,
        ladders={name: miner_ladder(m) for name, m in config.miner_models.items()},
        nameplates={name: m.max_power_w for name, m in config.miner_models.items()},
        miners_by_model=by_model,
        nodes=tuple(n for _, _, n in expanded),
        node_ids=tuple(d for _, d, _ in expanded),
        limit_w=site_limit_w(config),
    )


# --- job contracts and lost work -----------------------------------------------------------


def contract(config: AgentConfig, job_class: JobClass) -> JobClassContract:
    """The contract of a job class (unknown classes are paid as filler)."""
    ai = config.ai
    if job_class is JobClass.SLA:
        return ai.sla
    if job_class is JobClass.PREEMPTIBLE:
        return ai.preemptible
    return ai.filler


# --- deferrable work -----------------------------------------------------------------------


def min_throughput(node: GpuNodeView | GpuNodeConfig) -> float:
    """A node's throughput at its lowest cap, as a share of full."""
    return gpu_throughput_fraction(node.min_cap_w, node.max_cap_w, node.min_cap_w)


def deadline_due(job: JobView, node: GpuNodeView, now: datetime) -> bool:
    """Whether a deferrable job must run now to meet its deadline: its slack is down to the
    planner's reserve (:func:`agent.control.planner.deadline_reserve_s`). False for other jobs."""
    if job.deadline is None or job.remaining_gpu_h <= 0 or job.gpus <= 0:
        return False
    run_s = job.remaining_gpu_h / job.gpus * 3600.0
    slack_s = (job.deadline - now).total_seconds() - run_s
    return slack_s <= deadline_reserve_s(job.remaining_gpu_h, job.gpus, min_throughput(node))


def deferrable_jobs(config: AgentConfig, nodes: Sequence[GpuNodeView]) -> tuple[DeferrableJob, ...]:
    """The horizon planner's deferrable jobs: every running or suspended job with a deadline
    and work left, with the power it adds above idle at full cap and what a pause costs: the
    work a suspension loses, half a checkpoint interval on average (:func:`suspend_cost`), and
    the reload of the resume (:func:`resume_cost`), as the policy weighs them and the
    settlement charges them. A job that never checkpoints would lose all its work since it
    started: it is priced at the value of its remaining work, so the plan does not pause it."""
    out: list[DeferrableJob] = []
    for n in nodes:
        for job in n.jobs:
            if job.deadline is None or job.remaining_gpu_h <= 0 or job.job_class is JobClass.SLA:
                continue
            if job.state is not JobState.RUNNING and job.state is not JobState.SUSPENDED:
                continue
            terms = contract(config, job.job_class)
            rev_h = job.gpus * job.usd_per_gpu_hour
            period_s = terms.checkpoint_interval_s
            age_s = period_s / 2.0 if period_s > 0 else job.remaining_gpu_h / job.gpus * 3600.0
            lost = suspend_cost(job.penalty_usd, rev_h, age_s)
            reload = resume_cost(terms, job.gpus, job.usd_per_gpu_hour)
            out.append(
                DeferrableJob(
                    job_id=job.job_id,
                    gpus=job.gpus * n.count,
                    remaining_gpu_h=job.remaining_gpu_h * n.count,
                    deadline=job.deadline,
                    gpu_w=max(n.max_cap_w - n.idle_w, 0.0),
                    resume_cost_usd=(lost.lost_usd + reload.lost_usd) * n.count,
                    running=job.state is JobState.RUNNING,
                    min_fraction=min_throughput(n),
                )
            )
    return tuple(out)


# --- switching costs -----------------------------------------------------------------------
#
# One model, used by the policy to decide and by the settlement to charge: what a switch loses
# (revenue or work, USD) and the extra energy it draws (Wh, which the settlement prices at the
# interval's real price and the policy at the price it plans against).

# Prices settle per 15-minute interval: a switch commits the site for at least one of them.
SETTLEMENT_INTERVAL_S = 900.0


@dataclass(frozen=True, slots=True)
class SwitchCost:
    """What one switch of one device costs: revenue or work lost, and extra energy drawn."""

    lost_usd: float = 0.0
    energy_wh: float = 0.0

    def usd(self, price_usd_per_mwh: float) -> float:
        return self.lost_usd + self.energy_wh / 1e6 * price_usd_per_mwh

    def times(self, k: float) -> SwitchCost:
        return SwitchCost(self.lost_usd * k, self.energy_wh * k)


NO_COST = SwitchCost()


def wake_lost_s(config: AgentConfig, model: MinerModelConfig) -> float:
    """Seconds of hashing a wake loses: the model's ``wake_lost_s``, or for a model that sets
    none the site default ``control.miner_wake_lost_s`` (an assumption until measured)."""
    return config.control.miner_wake_lost_s if model.wake_lost_s is None else model.wake_lost_s


def wake_cost(
    config: AgentConfig, model: MinerModelConfig, to: OperatingPoint, hashprice: float
) -> SwitchCost:
    """A miner woken to ``to`` hashes nothing for :func:`wake_lost_s` and draws
    ``wake_energy_wh`` more than its profile's power."""
    rev_h = mining_revenue_usd_per_h(to.hashrate_ths, hashprice, config.economics.pool_fee)
    return SwitchCost(rev_h * wake_lost_s(config, model) / 3600.0, model.wake_energy_wh)


def planner_switching(config: AgentConfig, model: MinerModelConfig) -> SwitchingCost:
    """The same costs as the horizon planner weighs them per unit of a block (it prices the
    hashing lost at the block's top point, where :func:`wake_cost` wakes a unit to)."""
    return SwitchingCost(
        wake_lost_s=wake_lost_s(config, model),
        wake_energy_kwh=model.wake_energy_wh / 1000.0,
        sleep_energy_kwh=model.sleep_energy_wh / 1000.0,
    )


def sleep_cost(model: MinerModelConfig) -> SwitchCost:
    return SwitchCost(0.0, model.sleep_energy_wh)


def checkpoint_age_s(
    now_s: float, run_since_s: float, last_checkpoint_s: float | None, checkpoint_interval_s: float
) -> float:
    """Seconds of work a job would lose now: since its last checkpoint when it is known (and
    after the job last started), else by its contract, a checkpoint every
    ``checkpoint_interval_s`` of run (0: never, everything since it started)."""
    ran = max(now_s - run_since_s, 0.0)
    if last_checkpoint_s is not None and last_checkpoint_s >= run_since_s:
        return min(max(now_s - last_checkpoint_s, 0.0), ran)
    if checkpoint_interval_s <= 0:
        return ran
    return ran % checkpoint_interval_s


def suspend_cost(penalty_usd: float, rev_usd_per_h: float, age_s: float) -> SwitchCost:
    """Suspending a running job loses the work since its checkpoint (what it earned in that
    time, at its cap) and costs its contract's penalty (SLA)."""
    return SwitchCost(penalty_usd + rev_usd_per_h * age_s / 3600.0, 0.0)


def resume_cost(job_contract: JobClassContract, gpus: int, usd_per_gpu_hour: float) -> SwitchCost:
    """Resuming a job spends ``resume_s`` of its GPUs reloading, at its full rate."""
    return SwitchCost(gpus * usd_per_gpu_hour * job_contract.resume_s / 3600.0, 0.0)


def commit_horizon_s(interval_s: float, dwell_s: float) -> float:
    """How long a switch commits the site: a control interval, the dwell time it starts, and at
    least one settlement interval. One-off costs are spread over it to compare with prices."""
    return max(interval_s, dwell_s, SETTLEMENT_INTERVAL_S)


# --- ramp ----------------------------------------------------------------------------------


def ramp_capacity_w(config: AgentConfig, step_s: float, biggest_step_w: float = 0.0) -> float:
    """What the ramp bucket holds: one decision step's worth of ramp, or the largest single
    step of any device if that is bigger (a large unit can still start)."""
    rate_w_per_s = config.site.ramp_up_kw_per_min * 1000.0 / 60.0
    return max(rate_w_per_s * step_s, biggest_step_w)


@dataclass(slots=True)
class RampBudget:
    """The ramp limit as a token bucket filled at ``site.ramp_up_kw_per_min``: the live agent
    asks it every control cycle, the backtest every market interval. Starting devices spends
    it; it starts full."""

    rate_w_per_s: float
    tokens_w: float = 0.0
    at_s: float | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> RampBudget:
        return cls(config.site.ramp_up_kw_per_min * 1000.0 / 60.0)

    def headroom_w(self, now_s: float, capacity_w: float) -> float:
        """Power the site may add now (refilled for the time since the last call)."""
        if self.at_s is None:
            self.at_s, self.tokens_w = now_s, capacity_w
        self.tokens_w = min(capacity_w, self.tokens_w + self.rate_w_per_s * (now_s - self.at_s))
        self.at_s = now_s
        return self.tokens_w

    def spend(self, added_w: float) -> None:
        """Power was added: take it out of the budget."""
        self.tokens_w = max(0.0, self.tokens_w - max(added_w, 0.0))


# --- the policy's view -----------------------------------------------------------------------


def device_power_w(miners: Sequence[MinerView], gpu_nodes: Sequence[GpuNodeView]) -> float | None:
    """The sum of the devices' power readings; None when one of them has none."""
    readings = [m.measured_power_w for m in miners] + [n.measured_power_w for n in gpu_nodes]
    if any(p is None for p in readings):
        return None
    return sum(p for p in readings if p)


def assemble_snapshot(
    at: datetime,
    *,
    price: tuple[float, datetime, float] | None,
    hashprice_usd_per_ph_day: float,
    miners: tuple[MinerView, ...],
    gpu_nodes: tuple[GpuNodeView, ...],
    events: tuple[ActiveEvent, ...],
    day_ahead_usd_per_mwh: float | None,
    fourcp: tuple[float, str],
    site_power_w: float | None,
    device_power_w: float | None,
    load_model: SiteLoadModel,
    ramp_headroom_w: float,
    horizon: HorizonPlan | None,
) -> Snapshot:
    """Everything the policy may know at ``at``, from its parts: the one way the live
    coordinator and the backtest build a :class:`Snapshot`.

    ``price`` is the latest settled price (USD/MWh, interval start, seconds since it was read)
    or None before the first; ``fourcp`` the 4CP risk of this interval and its
    reason; ``site_power_w`` the site's power at the meter (a trusted meter's reading, else the
    device sum through ``load_model``), ``device_power_w`` the sum of the device readings.
    """
    view = None
    if price is not None:
        usd_per_mwh, interval_start, age_s = price
        view = PriceView(usd_per_mwh=usd_per_mwh, interval_start=interval_start, age_s=age_s)
    risk, reason = fourcp
    return Snapshot(
        at=at,
        price=view,
        hashprice_usd_per_ph_day=hashprice_usd_per_ph_day,
        miners=miners,
        gpu_nodes=gpu_nodes,
        events=events,
        day_ahead_usd_per_mwh=day_ahead_usd_per_mwh,
        fourcp_risk=risk,
        fourcp_reason=reason,
        measured_site_power_w=site_power_w,
        device_power_w=device_power_w,
        load_model=load_model,
        ramp_headroom_w=ramp_headroom_w,
        horizon=horizon,
    )
