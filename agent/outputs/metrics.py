"""Prometheus metrics: a custom collector over :class:`AgentState` and a small read-only server.

:class:`AgentCollector` builds every metric family from the state it is handed each time
Prometheus scrapes; ``collect()`` does no I/O and never touches devices, so a scrape costs a walk
over in-memory objects. It is registered on a registry passed in (never the global one), see
:func:`build_registry`. :func:`start_metrics_server` serves ``GET /metrics`` from the event loop
(no thread, so the collector reads the state on the same loop the runtime writes it on).

Naming follows the Prometheus conventions: prefix ``site_agent_``, base units in the name
(watts, seconds, hashes per second, ratios 0..1), ``_total`` for counters, a HELP text on every
family. Money is in the name too (``_usd_per_hour``, ``_usd_per_mwh``). Per-device series are
bounded: one series per configured device, labels drawn from fixed sets (device id, model, node,
GPU index, state from a fixed enum); free-text reasons never become label values.

Per-GPU families mirror NVIDIA dcgm-exporter so a dashboard can be switched between them:

==========================================  ============================================
site-agent                                  dcgm-exporter
==========================================  ============================================
``site_agent_gpu_power_watts``              ``DCGM_FI_DEV_POWER_USAGE`` (W)
``site_agent_gpu_power_limit_watts``        ``DCGM_FI_DEV_ENFORCED_POWER_LIMIT`` (W)
``site_agent_gpu_utilization_ratio``        ``DCGM_FI_DEV_GPU_UTIL`` / 100
``site_agent_gpu_temperature_celsius``      ``DCGM_FI_DEV_GPU_TEMP`` (°C)
``site_agent_gpu_memory_used_bytes``        ``DCGM_FI_DEV_FB_USED`` × 2^20 (MiB there)
``site_agent_gpu_energy_joules_total``      ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` / 1000
==========================================  ============================================

with dcgm's label names ``gpu`` (index), ``UUID`` and ``modelName``, plus ``node``.

Source names: a source whose name starts with ``price`` is a price feed and one starting with
``grid`` a grid-event source; the alert rules in ``configs/alerts.yml`` rely on that prefix.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agent.control.config import AgentConfig
from agent.control.domain import SLEEP, MinerView, Snapshot
from agent.control.economics import (
    ai_revenue_usd_per_h,
    breakeven_usd_per_mwh,
    mining_revenue_usd_per_h,
)
from agent.control.planner import PlanStatus
from agent.control.settlement import event_target_w
from agent.outputs.page import OperatorPage
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard, TaskHealth
from drivers.inputs import RejectionCounter, process_rejections
from drivers.jobs.base import JobClass, JobState

log = logging.getLogger(__name__)

MINER_STATES = ("running", "sleeping", "faulted", "unknown")
MODES = ("auto", "manual", "safe")
THS_TO_HS = 1e12  # the domain speaks TH/s; Prometheus wants the base unit, hashes per second


def miner_state(m: MinerView) -> str:
    """The fleet-state enum of one miner: faulted, unknown (no fresh reading), sleeping, running."""
    if m.fault is not None:
        return "faulted"
    if m.measured_power_w is None:
        return "unknown"
    return "sleeping" if m.commanded == SLEEP else "running"


def _utcnow() -> datetime:
    return datetime.now(UTC)


PLAN_STATUSES = tuple(s.value for s in PlanStatus)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels if labels is not None else [])


class AgentCollector(Collector):
    """Builds every ``site_agent_*`` family from an :class:`AgentState` (and config) per scrape.

    ``clock`` gives "now" for ages; it is injected so tests can pin it. Nothing here does I/O.
    """

    def __init__(
        self,
        state: AgentState,
        config: AgentConfig | None = None,
        clock: Callable[[], datetime] = _utcnow,
        rejections: RejectionCounter | None = None,
        tasks: TaskBoard | None = None,
    ) -> None:
        self.state = state
        # The supervised tasks' health: its own owner (the supervisor), not the state.
        self.tasks: Mapping[str, TaskHealth] = tasks if tasks is not None else {}
        self.config = config
        self.clock = clock
        # What the drivers refused (bounded parsers, drivers/inputs.py); the process-wide
        # counter unless one is injected.
        self.rejections = rejections if rejections is not None else process_rejections()

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        state = self.state
        yield from self._agent(state, now)
        yield from self._sources(state, now)
        snap, plan = state.snapshot, state.plan
        if self.config is not None:
            yield from self._config(self.config, snap)
        if snap is not None:
            yield from self._snapshot(snap, now)
        if plan is not None:
            yield from self._plan(state)
        yield from self._faults(state, snap)
        yield from self._meter(state)
        yield from self._fourcp(state)

    # --- the agent itself ---------------------------------------------------------------------

    def _agent(self, state: AgentState, now: datetime) -> Iterator[Metric]:
        info = _gauge("site_agent_info", "Constant 1; labels name the site.", ["site"])
        info.add_metric([state.site_id], 1.0)
        yield info
        yield GaugeMetricFamily(
            "site_agent_start_time_seconds",
            "Unix time the agent started.",
            value=state.started_at.timestamp(),
        )
        mode = _gauge("site_agent_mode", "1 for the agent's current control mode.", ["mode"])
        for name in sorted({*MODES, state.mode}):
            mode.add_metric([name], 1.0 if name == state.mode else 0.0)
        yield mode
        yield CounterMetricFamily(
            "site_agent_control_cycles", "Control cycles completed.", value=state.cycles
        )
        yield GaugeMetricFamily(
            "site_agent_control_cycle_duration_seconds",
            "Duration of the last control cycle.",
            value=state.last_cycle_duration_s,
        )
        if state.planner_solve_s is not None:
            yield GaugeMetricFamily(
                "site_planner_solve_seconds",
                "Wall time of the horizon planner's last solve.",
                value=state.planner_solve_s,
            )
            status = _gauge(
                "site_planner_status",
                "1 for the horizon planner's last status (failed and bad_input: the rule alone).",
                ["status"],
            )
            for name in PLAN_STATUSES:
                status.add_metric([name], 1.0 if name == state.planner_status else 0.0)
            yield status
        if state.last_cycle_at is not None:
            yield GaugeMetricFamily(
                "site_agent_last_control_cycle_timestamp_seconds",
                "Unix time the last control cycle ended.",
                value=state.last_cycle_at.timestamp(),
            )
        actions = CounterMetricFamily(
            "site_agent_actions",
            "Device actions executed, by kind and result (ok, failed, not_applied, skipped).",
            labels=["kind", "result"],
        )
        for (kind, result), count in sorted(dict(state.actions).items()):
            actions.add_metric([kind, result], count)
        yield actions
        rejected = CounterMetricFamily(
            "site_agent_rejected_inputs",
            "Inputs rejected without effect (bad price rows, bad commands), by source and reason.",
            labels=["source", "reason"],
        )
        counts = Counter(dict(state.rejected))
        counts.update(self.rejections.counts())
        for (source, reason), count in sorted(counts.items()):
            rejected.add_metric([source, reason], count)
        yield rejected
        up = _gauge(
            "site_agent_task_up", "1 while a supervised task runs, 0 after it died.", ["task"]
        )
        restarts = CounterMetricFamily(
            "site_agent_task_restarts",
            "Times a supervised task died and was restarted.",
            labels=["task"],
        )
        for name, task in sorted(self.tasks.items()):
            up.add_metric([name], 1.0 if task.up else 0.0)
            restarts.add_metric([name], task.restarts)
        yield up
        yield restarts

    def _sources(self, state: AgentState, now: datetime) -> Iterator[Metric]:
        age = _gauge(
            "site_agent_source_age_seconds",
            "Seconds since the source last succeeded (since agent start if it never has).",
            ["source"],
        )
        last = _gauge(
            "site_agent_source_last_success_timestamp_seconds",
            "Unix time of the source's last successful poll.",
            ["source"],
        )
        duration = _gauge(
            "site_agent_source_poll_duration_seconds",
            "Duration of the source's last poll.",
            ["source"],
        )
        ok = CounterMetricFamily(
            "site_agent_source_polls",
            "Polls of the source, by result.",
            labels=["source", "result"],
        )
        up = _gauge("site_agent_source_up", "1 if the source's last poll succeeded.", ["source"])
        for name, h in sorted(dict(state.sources).items()):
            since = h.last_success or state.started_at
            age.add_metric([name], max(0.0, (now - since).total_seconds()))
            if h.last_success is not None:
                last.add_metric([name], h.last_success.timestamp())
            duration.add_metric([name], h.last_duration_s)
            ok.add_metric([name, "ok"], h.successes)
            ok.add_metric([name, "failed"], h.failures)
            up.add_metric([name], 1.0 if h.last_success is not None and h.last_error is None else 0)
        yield from (age, last, duration, ok, up)

    # --- configuration-derived ----------------------------------------------------------------

    def _config(self, cfg: AgentConfig, snap: Snapshot | None) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "site_agent_interconnect_limit_watts",
            "The site's interconnect limit from config.",
            value=cfg.site.interconnect_limit_kw * 1000.0,
        )
        hashprice = (
            snap.hashprice_usd_per_ph_day if snap else cfg.economics.hashprice.usd_per_ph_day
        )
        breakeven = _gauge(
            "site_agent_miner_breakeven_usd_per_mwh",
            "Energy price at which a miner model's profile earns zero (economics.md).",
            ["model", "profile"],
        )
        for model, mc in sorted(cfg.miner_models.items()):
            for p in mc.profiles:
                j_per_th = p.power_w / p.hashrate_ths
                breakeven.add_metric(
                    [model, p.name],
                    breakeven_usd_per_mwh(hashprice, cfg.economics.pool_fee, j_per_th),
                )
        yield breakeven

    # --- the snapshot: measurements -----------------------------------------------------------

    def _snapshot(self, snap: Snapshot, now: datetime) -> Iterator[Metric]:
        lag_s = max(0.0, (now - snap.at).total_seconds())
        yield GaugeMetricFamily(
            "site_agent_snapshot_age_seconds",
            "Seconds since the coordinator built the latest snapshot.",
            value=lag_s,
        )
        if snap.measured_site_power_w is not None:
            yield GaugeMetricFamily(
                "site_agent_site_power_watts",
                "Measured site power (meter, or the sum of device readings).",
                value=snap.measured_site_power_w,
            )
        price = _gauge(
            "site_agent_price_usd_per_mwh",
            "Energy price by market (realtime, day_ahead).",
            ["market"],
        )
        if snap.price is not None:
            price.add_metric(["realtime"], snap.price.usd_per_mwh)
            yield GaugeMetricFamily(
                "site_agent_price_age_seconds",
                "Seconds since the latest settled real-time price was read.",
                value=snap.price.age_s + lag_s,
            )
        if snap.day_ahead_usd_per_mwh is not None:
            price.add_metric(["day_ahead"], snap.day_ahead_usd_per_mwh)
        yield price
        yield GaugeMetricFamily(
            "site_agent_hashprice_usd_per_ph_day",
            "Hashprice in USD per PH/s per day.",
            value=snap.hashprice_usd_per_ph_day,
        )
        yield GaugeMetricFamily(
            "site_agent_fourcp_risk_ratio",
            "Estimated chance (0..1) that this interval is a monthly system peak (4CP).",
            value=snap.fourcp_risk,
        )
        yield from self._miners(snap)
        yield from self._gpus(snap)
        yield from self._events(snap)

    def _miners(self, snap: Snapshot) -> Iterator[Metric]:
        power = _gauge(
            "site_agent_miner_power_watts", "Measured power of a miner.", ["miner", "model"]
        )
        hashrate = _gauge(
            "site_agent_miner_hashrate_hashes_per_second",
            "Measured hashrate of a miner (TH/s × 1e12).",
            ["miner", "model"],
        )
        # One series per miner, labelled with its current state (not one-hot over all four
        # states): a quarter of the samples at fleet scale; count by (state) still works.
        miner_state_family = _gauge(
            "site_agent_miner_state",
            "1, labelled with the miner's current state (running, sleeping, faulted, unknown).",
            ["miner", "state"],
        )
        fleet = _gauge("site_agent_miners", "Miners by state.", ["state"])
        estimated = _gauge(
            "site_agent_miner_power_estimated_info",
            "1 when the miner reports no power and its power is estimated from its hashrate.",
            ["miner", "model"],
        )
        counts = dict.fromkeys(MINER_STATES, 0)
        revenue = 0.0
        fee = self.config.economics.pool_fee if self.config else 0.0
        mining_w = 0.0
        for m in snap.miners:
            labels = [m.device_id, m.model]
            if m.measured_power_w is not None:
                power.add_metric(labels, m.measured_power_w * m.count)
                mining_w += m.measured_power_w * m.count
                if m.power_estimated:
                    estimated.add_metric(labels, 1.0)
            if m.measured_hashrate_ths is not None:
                hashrate.add_metric(labels, m.measured_hashrate_ths * m.count * THS_TO_HS)
                revenue += mining_revenue_usd_per_h(
                    m.measured_hashrate_ths * m.count, snap.hashprice_usd_per_ph_day, fee
                )
            current = miner_state(m)
            counts[current] += m.count
            miner_state_family.add_metric([m.device_id, current], 1.0)
        for s in MINER_STATES:
            fleet.add_metric([s], counts[s])
        yield from (power, hashrate, miner_state_family, fleet, estimated)
        yield GaugeMetricFamily(
            "site_agent_mining_revenue_usd_per_hour",
            "Mining revenue rate at the measured hashrate, after pool fee.",
            value=revenue,
        )
        workload = _gauge(
            "site_agent_workload_power_watts",
            "Measured power by workload (mining, ai).",
            ["workload"],
        )
        workload.add_metric(["mining"], mining_w)
        workload.add_metric(
            ["ai"],
            sum(n.measured_power_w * n.count for n in snap.gpu_nodes if n.measured_power_w),
        )
        yield workload

    def _gpus(self, snap: Snapshot) -> Iterator[Metric]:
        node_power = _gauge(
            "site_agent_gpu_node_power_watts",
            "Measured power of a GPU node (GPUs + host).",
            ["node"],
        )
        node_cap = _gauge(
            "site_agent_gpu_node_power_cap_watts",
            "Per-GPU power cap currently commanded on a node.",
            ["node"],
        )
        jobs = _gauge("site_agent_jobs", "AI jobs by class and state.", ["job_class", "state"])
        counts = {(c, s): 0 for c in JobClass for s in JobState}
        ai_revenue = 0.0
        for n in snap.gpu_nodes:
            if n.measured_power_w is not None:
                node_power.add_metric([n.device_id], n.measured_power_w * n.count)
            node_cap.add_metric([n.device_id], n.cap_w)
            for j in n.jobs:
                counts[(j.job_class, j.state)] += n.count
                if j.state is JobState.RUNNING:
                    ai_revenue += n.count * ai_revenue_usd_per_h(
                        j.gpus, j.usd_per_gpu_hour, n.cap_w, n.max_cap_w, n.min_cap_w
                    )
        for (c, s), count in counts.items():
            jobs.add_metric([c.value, s.value], count)
        yield from (node_power, node_cap, jobs)
        yield GaugeMetricFamily(
            "site_agent_ai_revenue_usd_per_hour",
            "Contracted revenue rate of running AI jobs at their nodes' power caps.",
            value=ai_revenue,
        )
        yield from self._gpu_readings()

    def _gpu_readings(self) -> Iterator[Metric]:
        labels = ["node", "gpu", "UUID", "modelName"]
        power = _gauge(
            "site_agent_gpu_power_watts", "GPU power draw (DCGM_FI_DEV_POWER_USAGE).", labels
        )
        limit = _gauge(
            "site_agent_gpu_power_limit_watts",
            "GPU enforced power limit (DCGM_FI_DEV_ENFORCED_POWER_LIMIT).",
            labels,
        )
        util = _gauge(
            "site_agent_gpu_utilization_ratio",
            "GPU utilization 0..1 (DCGM_FI_DEV_GPU_UTIL / 100).",
            labels,
        )
        temp = _gauge(
            "site_agent_gpu_temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP).", labels
        )
        mem = _gauge(
            "site_agent_gpu_memory_used_bytes",
            "GPU framebuffer memory used (DCGM_FI_DEV_FB_USED × 2^20).",
            labels,
        )
        energy = CounterMetricFamily(
            "site_agent_gpu_energy_joules",
            "GPU energy since driver load (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION / 1000).",
            labels=labels,
        )
        for node, readings in sorted(dict(self.state.gpu_readings).items()):
            for r in readings:
                values = [node, str(r.index), r.device_id, r.name]
                power.add_metric(values, r.power_w)
                limit.add_metric(values, r.power_limit_w)
                util.add_metric(values, r.utilization_pct / 100.0)
                temp.add_metric(values, r.temperature_c)
                mem.add_metric(values, r.memory_used_mib * 2**20)
                energy.add_metric(values, r.energy_j)
        yield from (power, limit, util, temp, mem, energy)

    def _events(self, snap: Snapshot) -> Iterator[Metric]:
        active = _gauge(
            "site_agent_grid_event_active",
            "1 for each grid event in force (labels: event id, program, kind).",
            ["event_id", "program", "kind"],
        )
        target = _gauge(
            "site_agent_grid_event_target_watts",
            "Site-load ceiling a grid event asks for.",
            ["event_id", "program"],
        )
        shortfall = _gauge(
            "site_agent_grid_event_shortfall_watts",
            "Measured site power above a grid event's target (0 when compliant).",
            ["event_id", "program"],
        )
        site_w = snap.measured_site_power_w
        strictest: float | None = None
        worst = 0.0
        for a in snap.events:
            e = a.event
            active.add_metric([e.event_id, e.program, e.kind.value], 1.0)
            limit = event_target_w(a.event, a.baseline_w)
            if limit is None:
                continue
            limit = max(limit, 0.0)
            target.add_metric([e.event_id, e.program], limit)
            strictest = limit if strictest is None else min(strictest, limit)
            if site_w is not None:
                gap = max(0.0, site_w - limit)
                shortfall.add_metric([e.event_id, e.program], gap)
                worst = max(worst, gap)
        yield from (active, target, shortfall)
        yield GaugeMetricFamily(
            "site_agent_grid_events_active", "Grid events in force.", value=len(snap.events)
        )
        if strictest is not None:
            yield GaugeMetricFamily(
                "site_agent_grid_target_watts",
                "The strictest site-load ceiling of the grid events in force.",
                value=strictest,
            )
        yield GaugeMetricFamily(
            "site_agent_grid_shortfall_watts",
            "Measured site power above the strictest grid-event target (0: compliant or none).",
            value=worst,
        )

    # --- the plan -----------------------------------------------------------------------------

    def _plan(self, state: AgentState) -> Iterator[Metric]:
        plan = state.plan
        assert plan is not None
        yield GaugeMetricFamily(
            "site_agent_planned_power_watts",
            "Site power the current plan aims for.",
            value=plan.planned_power_w,
        )
        yield GaugeMetricFamily(
            "site_agent_effective_limit_watts",
            "The binding site limit this cycle (interconnect less margin, or an event target).",
            value=plan.limit_w,
        )
        yield GaugeMetricFamily(
            "site_agent_effective_price_usd_per_mwh",
            "Energy price plus adders that the plan was made against.",
            value=plan.effective_price_usd_per_mwh,
        )
        yield GaugeMetricFamily(
            "site_agent_plan_value_usd_per_hour",
            "Revenue rate of the planned operating points.",
            value=plan.value_usd_per_h,
        )
        yield GaugeMetricFamily(
            "site_agent_plan_cost_usd_per_hour",
            "Energy cost rate of the planned operating points.",
            value=plan.cost_usd_per_h,
        )
        yield GaugeMetricFamily(
            "site_agent_plan_margin_usd_per_hour",
            "Plan value minus plan cost.",
            value=plan.margin_usd_per_h,
        )
        pending = _gauge(
            "site_agent_plan_actions", "Actions in the current plan, by kind.", ["kind"]
        )
        counts: dict[str, int] = {}
        for a in plan.actions:
            counts[a.kind.value] = counts.get(a.kind.value, 0) + 1
        for kind, count in sorted(counts.items()):
            pending.add_metric([kind], count)
        yield pending
        binding = _gauge(
            "site_agent_plan_binding_limit",
            "1 for each limit that binds the current plan (interconnect, event:<id>, ...).",
            ["limit"],
        )
        for name in plan.binding:
            binding.add_metric([name], 1.0)
        yield binding

    # --- the meter and the load model ----------------------------------------------------------

    def _meter(self, state: AgentState) -> Iterator[Metric]:
        derates = CounterMetricFamily(
            "site_agent_thermal_derate_actions",
            "Thermal step-downs (a device stepped one operating point down for heat), by kind.",
            labels=["kind"],
        )
        derated = _gauge(
            "site_agent_thermal_derated_devices", "Devices held derated for heat now.", ["kind"]
        )
        for kind in ("miner", "gpu_node"):
            derates.add_metric([kind], state.thermal_derates.get(kind, 0))
            derated.add_metric([kind], sum(1 for k in state.thermal_derated.values() if k == kind))
        yield from (derates, derated)
        m = state.meter
        if m is None:
            return
        source = _gauge(
            "site_agent_site_power_mode",
            "1 for what the site power is judged on: meter, fallback (devices + margin), devices.",
            ["source"],
        )
        for name in ("meter", "fallback", "devices"):
            source.add_metric([name], 1.0 if m.source == name else 0.0)
        yield source
        if m.configured:
            yield GaugeMetricFamily(
                "site_agent_meter_up",
                "1 while the revenue meter is fresh and plausible; 0 while the agent falls back.",
                value=1.0 if m.trusted else 0.0,
            )
            yield CounterMetricFamily(
                "site_agent_meter_fallback_actions",
                "Times the agent stopped trusting the meter and fell back to devices + margin.",
                value=m.fallbacks,
            )
            yield CounterMetricFamily(
                "site_agent_meter_rejected_inputs",
                "Meter reads refused or failed (timeout, bad registers, wrong unit, stale).",
                value=m.errors,
            )
            yield GaugeMetricFamily(
                "site_agent_meter_trim_watts",
                "Learned load the model does not explain (meter minus devices, cooling, base).",
                value=m.trim_w,
            )
            if m.meter_w is not None:
                yield GaugeMetricFamily(
                    "site_agent_meter_power_watts",
                    "The revenue meter's last good reading of site power.",
                    value=m.meter_w,
                )
            if m.meter_age_s is not None:
                yield GaugeMetricFamily(
                    "site_agent_meter_age_seconds",
                    "Seconds since the meter's last good reading.",
                    value=m.meter_age_s,
                )
        if m.device_w is not None:
            yield GaugeMetricFamily(
                "site_agent_device_power_watts",
                "Sum of the devices' own power readings.",
                value=m.device_w,
            )
        if m.cooling_w is not None:
            yield GaugeMetricFamily(
                "site_agent_cooling_power_watts",
                "Cooling power the cooling model attributes to the current IT load.",
                value=m.cooling_w,
            )
        if m.ambient_c is not None:
            yield GaugeMetricFamily(
                "site_agent_ambient_celsius",
                "Outdoor temperature the cooling model uses.",
                value=m.ambient_c,
            )

    # --- the live 4CP account ---------------------------------------------------------------

    def _fourcp(self, state: AgentState) -> Iterator[Metric]:
        figures = state.fourcp
        if figures is None:
            return
        peak = _gauge(
            "site_agent_fourcp_peak_demand_watts",
            "Per 4CP month, the site's highest average demand in an interval flagged as a 4CP "
            "risk; source: meter (every second metered), fallback (devices + margin) or mixed.",
            ["month", "source"],
        )
        charge = _gauge(
            "site_agent_fourcp_charge_usd",
            "Estimated transmission (4CP) charge of a month's peak interval, if it is the "
            "system peak.",
            ["month"],
        )
        count = _gauge(
            "site_agent_fourcp_intervals", "4CP-risk intervals recorded, by month.", ["month"]
        )
        for month in figures.months:
            peak.add_metric([month.month, month.peak.source], month.peak.demand_w)
            charge.add_metric([month.month], month.charge_usd)
            count.add_metric([month.month], month.intervals)
        season = _gauge(
            "site_agent_fourcp_season_charge_usd",
            "Estimated transmission (4CP) charge of a season (the year's four months so far).",
            ["season"],
        )
        for year, usd in figures.seasons:
            season.add_metric([year], usd)
        yield from (peak, charge, count, season)
        if figures.latest is not None:
            yield GaugeMetricFamily(
                "site_agent_fourcp_interval_demand_watts",
                "The site's average demand so far in the latest 4CP-risk interval.",
                value=figures.latest.demand_w,
            )

    # --- faults -------------------------------------------------------------------------------

    def _faults(self, state: AgentState, snap: Snapshot | None) -> Iterator[Metric]:
        faults = dict(state.faults)
        if snap is not None:
            for m in snap.miners:
                if m.fault is not None:
                    faults.setdefault(m.device_id, m.fault)
            for n in snap.gpu_nodes:
                if n.fault is not None:
                    faults.setdefault(n.device_id, n.fault)
        per_device = _gauge(
            "site_agent_device_faulted", "1 for each device the agent holds faulted.", ["device"]
        )
        for device in sorted(faults):
            per_device.add_metric([device], 1.0)
        yield per_device
        total = _gauge("site_agent_devices", "Devices known to the agent, by kind.", ["kind"])
        faulted = _gauge("site_agent_devices_faulted", "Devices held faulted, by kind.", ["kind"])
        miners = snap.miners if snap else ()
        nodes = snap.gpu_nodes if snap else ()
        total.add_metric(["miner"], sum(m.count for m in miners))
        total.add_metric(["gpu_node"], sum(n.count for n in nodes))
        miner_ids = {m.device_id for m in miners}
        faulted.add_metric(["miner"], sum(m.count for m in miners if m.device_id in faults))
        faulted.add_metric(["gpu_node"], sum(n.count for n in nodes if n.device_id in faults))
        node_ids = {n.device_id for n in nodes}
        other = sum(1 for d in faults if d not in miner_ids and d not in node_ids)
        faulted.add_metric(["other"], other)
        yield from (total, faulted)


def build_registry(
    state: AgentState,
    config: AgentConfig | None = None,
    clock: Callable[[], datetime] = _utcnow,
    rejections: RejectionCounter | None = None,
    tasks: TaskBoard | None = None,
) -> CollectorRegistry:
    """A fresh registry holding one :class:`AgentCollector` (never the global registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(state, config, clock, rejections, tasks))
    return registry


# --- the HTTP endpoint --------------------------------------------------------------------------

_MAX_HEADER_BYTES = 16 * 1024
_INDEX = b"<html><body><a href='/metrics'>/metrics</a></body></html>\n"

# Answers one request once its head is read; it keeps the connection as long as it needs it.
Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Routes(Protocol):
    """More read-only paths on this listener (the operator's page, :mod:`agent.outputs.page`)."""

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Responder | None: ...

    async def close(self) -> None: ...


class MetricsServer:
    """A read-only HTTP server for ``GET /metrics`` on the running event loop.

    Use as ``async with MetricsServer(registry, host, port) as server: server.port``. Port 0
    binds an ephemeral port; :attr:`port` is the one actually bound.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        routes: Routes | None = None,
    ):
        self.registry = registry
        self.routes = routes
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None
        # Open connections: Python 3.11's Server.close() leaves them (a browser's idle
        # preconnect, a page stream), so close() ends them itself.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self.port = 0

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        self._closing = False
        self._server = await asyncio.start_server(self._handle, self.host, self.requested_port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics listening on http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        self._closing = True
        self._server.close()  # accept no more; a browser would reconnect at once
        if self.routes is not None:
            await self.routes.close()  # long-lived page streams
        for writer in self._connections.values():
            writer.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        for writer in self._connections.values():
            writer.transport.abort()  # a peer that does not read would hold its socket open
        await asyncio.sleep(0)  # connections accepted just before: their handlers close them
        await self._server.wait_closed()
        self._server = None

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            writer.close()
            return
        self._connections[task] = writer
        try:
            async with asyncio.timeout(10.0):
                responder = await self._respond(reader, writer)
            if responder is not None:
                await responder(reader, writer)  # keeps its own deadlines (page streams)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that hangs up or dawdles gets nothing; the agent does not care
        finally:
            writer.close()
            try:
                # Closing waits for unsent data to flush; a peer that stops reading is cut off.
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()
            except (TimeoutError, ConnectionError):
                writer.transport.abort()
            finally:
                self._connections.pop(task, None)

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Responder | None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            await _send(writer, 431, "text/plain", b"headers too large\n")
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            await _send(writer, 400, "text/plain", b"bad request\n")
            return None
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if self.routes is not None:
            responder = self.routes.route(method, path, headers)
            if responder is not None:
                return responder
        if method not in ("GET", "HEAD"):
            await _send(writer, 405, "text/plain", b"read-only: GET /metrics\n")
            return None
        if path == "/":
            await _send(writer, 200, "text/html", _INDEX, head_only=method == "HEAD")
            return None
        if path != "/metrics":
            await _send(writer, 404, "text/plain", b"not found: try /metrics\n")
            return None
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        # Rendering thousands of samples takes tens of milliseconds: do it in a thread so the
        # control loop is not held up. collect() only reads immutable snapshots/plans and
        # takes C-level (GIL-atomic) copies of the state's dicts, so this is safe.
        try:
            body = await asyncio.to_thread(encoder, self.registry)
        except Exception:  # a collector bug: say so to the scraper, keep serving
            log.exception("metrics: collecting failed")
            await _send(writer, 500, "text/plain", b"collecting metrics failed\n")
            return None
        await _send(writer, 200, content_type, body, head_only=method == "HEAD")
        return None


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    head_only: bool = False,
) -> None:
    reasons = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        500: "Internal Server Error",
    }
    reason = reasons.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer.write(head if head_only else head + body)
    await writer.drain()


class MetricsService:
    """The metrics listener as a runtime service: ``await service(stop)`` serves until ``stop``.

    It serves ``/metrics`` and the operator's page (:class:`agent.outputs.page.OperatorPage`,
    whose watcher runs here, reading the same state). Build it from the state the agent will
    write, and hand it in with the agent's services (``Components.services``). ``host`` and
    ``port`` default to ``config.metrics``; :attr:`port` is the bound port once :attr:`started`
    is set (port 0 binds an ephemeral one). ``page`` replaces the default page (a bench that
    opens more streams than the default client bound).
    """

    def __init__(
        self,
        state: AgentState,
        config: AgentConfig,
        *,
        host: str | None = None,
        port: int | None = None,
        clock: Callable[[], datetime] = _utcnow,
        page: OperatorPage | None = None,
        tasks: TaskBoard | None = None,
    ) -> None:
        self.registry = build_registry(state, config, clock, tasks=tasks)
        self.page = page if page is not None else OperatorPage(state, config, clock=clock)
        self.server = MetricsServer(
            self.registry,
            host if host is not None else config.metrics.host,
            port if port is not None else config.metrics.port,
            routes=self.page,
        )
        self.started = asyncio.Event()

    task_name = "metrics"  # the supervised task's name in /metrics and the retained state

    @property
    def port(self) -> int:
        return self.server.port

    async def __call__(self, stop: asyncio.Event) -> None:
        await self.server.start()
        self.started.set()
        try:
            await self.page.run(stop)  # returns once stop is set
        finally:
            await self.server.close()  # the listener first, then the page's streams


async def start_metrics_server(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Start serving ``/metrics``; returns the server (``.port`` is the bound port)."""
    server = MetricsServer(registry, host, port)
    await server.start()
    return server
