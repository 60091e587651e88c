"""The coordinator: the only poller of devices and signals, keeper of the last good values.

It polls the fleets (through :meth:`Coordinator.poll_fleet`), the price source, the hashprice
feed, on their own schedules (with jitter), keeps each signal's last good reading with its age
and each source's health (last success, last error), and hands out one immutable
:class:`~agent.control.domain.Snapshot` per control cycle, built from the fleets' views. Consumers
never poll. A source that fails is logged once when it starts failing and once when it recovers
(Home Assistant's coordinator habit), not on every poll. What each device was commanded, its
readings and faults belong to its fleet (:mod:`agent.runtime.fleet`), not to the coordinator.

Each snapshot passes the fleets' views through the thermal guard (:mod:`agent.runtime.thermal`)
and turns the device sum into power at the meter through the meter watch
(:mod:`agent.runtime.meter`), which polls the site meter and the ambient source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

from agent.control.config import AgentConfig
from agent.control.domain import ActiveEvent, MinerView, Snapshot
from agent.control.fourcp import peak_risk
from agent.control.planner import (
    HorizonInput,
    HorizonPlan,
    MinerBlock,
    PlanStatus,
    SwitchingCost,
    plan_horizon,
)
from agent.control.settlement import fourcp_step_adders
from agent.control.site import (
    RampBudget,
    assemble_snapshot,
    deferrable_jobs,
    device_power_w,
    planner_switching,
    ramp_capacity_w,
    site_limit_w,
)
from agent.runtime.fleet import Fleet
from agent.runtime.meter import MeterWatch
from agent.runtime.state import SourceHealth
from agent.runtime.thermal import ThermalGuard
from drivers.errors import AgentError, BadInput
from drivers.meters.base import Meter
from drivers.prices.base import PriceReading, PriceSource
from drivers.prices.csv_replay import DayAheadForecast
from drivers.prices.system_load import SystemLoadReplay

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Coordinator:
    """Polls sources, keeps last good data, builds snapshots."""

    def __init__(
        self,
        config: AgentConfig,
        fleets: Sequence[Fleet],
        price_source: PriceSource | None,
        *,
        hashprice_source: PriceSource | None = None,
        day_ahead: DayAheadForecast | None = None,
        system_load: SystemLoadReplay | None = None,
        meter: Meter | None = None,
        ambient_source: PriceSource | None = None,
        count_rejected: Callable[[str, str], None] = lambda _source, _reason: None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.fleets = tuple(fleets)
        self.price_source = price_source
        self.hashprice_source = hashprice_source
        self.day_ahead = day_ahead
        self.system_load = system_load
        self.clock = clock
        self.monotonic = monotonic
        self.hashprice_usd_per_ph_day = config.economics.hashprice.usd_per_ph_day
        self.price: PriceReading | None = None
        # Monotonic time the newest price interval was first seen: its age is how long no *new*
        # price has arrived, whether the source errs or keeps repeating an old interval.
        self.price_read_at: float | None = None
        self.hashprice_read_at: float | None = None
        self.events: dict[str, ActiveEvent] = {}
        # The latest usable horizon plan, and what it was made from (re-plan when that changes).
        self.horizon: HorizonPlan | None = None
        self._horizon_key: tuple[object, ...] | None = None
        # The planner's last solve (None: never solved): its time, status and reason. The loop
        # publishes them with the rest.
        self.planner_solve_s: float | None = None
        self.planner_status: str | None = None
        self.planner_reason = ""
        self._ramp = RampBudget.of(config)
        # Health of every polled source, by name: the loop publishes copies to outputs.
        self.health: dict[str, SourceHealth] = {}
        # Counts one rejected input (source, reason): the runtime's counter, given by the loop.
        self.count_rejected = count_rejected
        self.price_changed = asyncio.Event()
        # Refused feed answers (source, one-line reason) waiting for the runtime's audit sink.
        self.rejected_to_audit: deque[tuple[str, str]] = deque(maxlen=100)
        # The meter and the ambient source: the load model of every snapshot.
        self.meter_watch = MeterWatch(
            config,
            meter,
            ambient_source=ambient_source,
            health=self.health,
            monotonic=monotonic,
        )
        # Thermal derates: one ceiling per hot device, applied to every snapshot's views.
        self.thermal = ThermalGuard(config.thermal, config.control.gpu_cap_step_w)

    def source(self, name: str) -> SourceHealth:
        health = self.health.get(name)
        if health is None:
            health = self.health[name] = SourceHealth(name)
        return health

    # --- polling -------------------------------------------------------------------------

    async def poll_fleet(self, fleet: Fleet) -> None:
        """Poll one fleet; a fleet where nothing answered keeps its last good readings."""
        health = self.source(fleet.name)
        started = self.monotonic()
        try:
            problem = await fleet.poll()
        except AgentError as exc:
            if health.last_error is None:
                log.warning("%s poll failed: %s", fleet.name, exc)
            health.last_error, health.failures = str(exc), health.failures + 1
            return
        finally:
            health.last_duration_s = self.monotonic() - started
        health.last_error, health.last_success = problem, self.clock()
        health.successes += 1

    async def poll_price(self) -> None:
        if self.price_source is None:
            return
        health = self.source(f"price:{self.price_source.name}")
        started = self.monotonic()
        try:
            reading = await self.price_source.latest()
        except AgentError as exc:
            if health.last_error is None:
                log.warning("price source %s failed: %s", self.price_source.name, exc)
            self._note_rejected(health.last_error, exc)
            health.last_error = str(exc)
            health.failures += 1
            return
        finally:
            health.last_duration_s = self.monotonic() - started
        if health.last_error is not None:
            log.info("price source %s recovered", self.price_source.name)
        health.last_error, health.last_success = None, self.clock()
        health.successes += 1
        if self.price is None or reading.interval_start != self.price.interval_start:
            self.price_changed.set()
            self.price_read_at = self.monotonic()
        self.price = reading

    async def poll_hashprice(self) -> None:
        """Read the hashprice feed; a bad or failing feed keeps the last good value."""
        source = self.hashprice_source
        if source is None:
            return
        health = self.source(f"hashprice:{source.name}")
        try:
            reading = await source.latest()
            # The feed checks its range (drivers/prices); this guards any other source.
            if not (math.isfinite(reading.value) and reading.value > 0):
                raise BadInput(
                    source.name, f"hashprice must be a positive number, got {reading.value}"
                )
        except AgentError as exc:
            if health.last_error is None:
                log.warning("hashprice feed %s failed: %s", source.name, exc)
            self._note_rejected(health.last_error, exc)
            health.last_error, health.failures = str(exc), health.failures + 1
            return
        if health.last_error is not None:
            log.info("hashprice feed %s recovered", source.name)
        health.last_error, health.last_success = None, self.clock()
        health.successes += 1
        self.hashprice_usd_per_ph_day, self.hashprice_read_at = reading.value, self.monotonic()

    def _note_rejected(self, previous: str | None, exc: AgentError) -> None:
        """Queue a refused answer for the audit trail: once per failing streak and reason, not
        once per poll (a feed answering NaN every second must not flood the journal)."""
        if isinstance(exc, BadInput) and str(exc) != previous:
            self.rejected_to_audit.append((exc.source, str(exc)))

    def market_now(self) -> datetime:
        """The market's clock: simulated time when the price source replays history."""
        sim_now = getattr(self.price_source, "sim_now", None)
        return sim_now() if callable(sim_now) else self.clock()

    def current_hashprice(self, mono: float) -> float:
        hp = self.config.economics.hashprice
        if self.hashprice_read_at is not None and mono - self.hashprice_read_at > hp.max_age_s:
            return hp.usd_per_ph_day  # the feed went stale: back to the configured constant
        return self.hashprice_usd_per_ph_day

    def fourcp(self, market_now: datetime) -> tuple[float, str]:
        """The 4CP risk of the current interval from the system-load history, with its reason."""
        if self.system_load is None or not self.config.grid.fourcp.enabled:
            return 0.0, ""
        history = self.system_load.month_history(market_now)
        if not history.loads_mw:
            return 0.0, ""
        assessment = peak_risk(history.loads_mw, history.times, market_now)
        return assessment.risk, assessment.reason

    async def run_poller(
        self, poll: Callable[[], Awaitable[None]], interval_s: float, stop: asyncio.Event
    ) -> None:
        """Call ``poll`` every ``interval_s`` (± jitter) until ``stop`` is set."""
        jitter = self.config.control.poll_jitter_s
        while not stop.is_set():
            await poll()
            delay = max(0.05, interval_s + random.uniform(-jitter, jitter))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    # --- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        now = self.clock()
        mono = self.monotonic()
        views = [fleet.views(now) for fleet in self.fleets]
        miners = tuple(m for v in views for m in v.miners)
        gpu_nodes = tuple(n for v in views for n in v.gpu_nodes)
        miners = self.thermal.apply_miners(miners, mono)
        gpu_nodes = self.thermal.apply_gpu_nodes(gpu_nodes, mono)
        device_w = device_power_w(miners, gpu_nodes)
        load, site_w = self.meter_watch.load_model(device_w, mono)
        price = None
        if self.price is not None and self.price_read_at is not None:
            price = (self.price.value, self.price.interval_start, mono - self.price_read_at)
        ramp_w = self.ramp_headroom_w(mono)
        market_now = self.market_now()
        day_ahead = None if self.day_ahead is None else self.day_ahead.price_at(market_now)
        return assemble_snapshot(
            now,
            price=price,
            hashprice_usd_per_ph_day=self.current_hashprice(mono),
            miners=miners,
            gpu_nodes=gpu_nodes,
            events=tuple(e for e in self.events.values() if e.event.active_at(now)),
            day_ahead_usd_per_mwh=day_ahead,
            fourcp=self.fourcp(market_now),
            site_power_w=site_w,
            device_power_w=device_w,
            load_model=load,
            ramp_headroom_w=ramp_w,
            horizon=self.horizon,
        )

    # --- the horizon plan ----------------------------------------------------------------

    HORIZON_H = 36

    def horizon_input(self) -> HorizonInput | None:
        """The planner's input now: the day-ahead prices of the next 36 h (from the current
        hour), the hashprice, the miners by model with the units awake, the GPU load as it is
        now (flat), the interconnect. None without day-ahead prices, or while the market runs on
        a simulated clock (the plan's times must be the policy's)."""
        if self.day_ahead is None or callable(getattr(self.price_source, "sim_now", None)):
            return None
        now = self.clock()
        hour = now.replace(minute=0, second=0, microsecond=0)
        prices = self.day_ahead.prices_between(hour, hour + timedelta(hours=self.HORIZON_H))
        # Contiguous hours from the current one only: a gap ends the horizon.
        hours: list[tuple[datetime, float]] = []
        for k, (start, value) in enumerate(prices):
            if start != hour + timedelta(hours=k):
                break
            hours.append((start, value))
        if not hours:
            return None
        # Blocks by model, from what the fleets hold now (a view may stand for ``count`` units).
        views = [fleet.views(now) for fleet in self.fleets]
        by_model: dict[str, list[MinerView]] = {}
        for miner in (m for v in views for m in v.miners):
            by_model.setdefault(miner.model, []).append(miner)
        # The site model's switching costs (what the policy and settlement charge); a model the
        # config does not know (a fleet of its own) loses the site default per wake.
        models = self.config.miner_models
        default = SwitchingCost(wake_lost_s=self.config.control.miner_wake_lost_s)
        blocks = tuple(
            MinerBlock(
                model,
                sum(m.count for m in miners),
                miners[0].points,
                planner_switching(self.config, models[model]) if model in models else default,
                units_on=sum(m.count for m in miners if m.commanded != m.points[0].name),
            )
            for model, miners in sorted(by_model.items())
        )
        nodes = [n for v in views for n in v.gpu_nodes]
        # Deferrable jobs (a deadline and work left) are the plan's to place: the committed load
        # is every node's worst case less what those running now add above idle.
        jobs = deferrable_jobs(self.config, nodes)
        gpu_w = sum(n.worst_case_power_w * n.count for n in nodes)
        gpu_w -= sum(j.gpus * j.gpu_w for j in jobs if j.running)
        control = self.config.control
        # The real-time price so far stands for the hour now running (persistence), when fresh.
        realtime = None
        if self.price is not None and self.price_read_at is not None:
            fresh = self.monotonic() - self.price_read_at <= self.config.prices.max_age_s
            if fresh and math.isfinite(self.price.value):
                realtime = self.price.value
        # The 4CP risk the policy prices now, for the hour it falls in (the same priced risk).
        risk, _ = self.fourcp(now)
        return HorizonInput(
            at=now,
            starts=tuple(h for h, _ in hours),
            interval_s=3600.0,
            price_usd_per_mwh=tuple(v for _, v in hours),
            hashprice_usd_per_ph_day=self.current_hashprice(self.monotonic()),
            pool_fee=self.config.economics.pool_fee,
            blocks=blocks,
            # Limits are judged at the meter: the miners and GPUs get what cooling, base load
            # and the meter trim (or fallback margin) leave, as in the policy's dispatch.
            limit_w=self.meter_watch.model.device_budget_w(site_limit_w(self.config)),
            base_load_w=(max(gpu_w, 0.0),) * len(hours),
            jobs=jobs,
            min_on_s=control.min_on_s,
            min_off_s=control.min_off_s,
            # A curtailment lasts at least its minimum off time, and a real-time price holds for
            # its settlement interval (15 minutes in ERCOT): the shortest spike worth weighing.
            spike_h=max(control.min_off_s, control.interval_s, 900.0) / 3600.0,
            realtime_usd_per_mwh=realtime,
            fourcp_adder_usd_per_mwh=fourcp_step_adders(
                self.config.grid.fourcp, risk, len(hours), 3600.0
            ),
        )

    async def refresh_horizon(self) -> None:
        """Re-plan every hour and whenever the forecast, the real-time price, the hashprice or
        the set of deferrable jobs changes, off the event loop (a solve of 36 hourly intervals
        takes milliseconds). A failed solve drops the plan (the rule alone decides) and logs
        the reason once."""
        inp = self.horizon_input()
        if inp is None:
            return
        key = (
            inp.starts[0],
            inp.price_usd_per_mwh,
            inp.realtime_usd_per_mwh,
            inp.hashprice_usd_per_ph_day,
            inp.fourcp_adder_usd_per_mwh,
            frozenset(j.job_id for j in inp.jobs),
        )
        if key == self._horizon_key:
            return
        self._horizon_key = key
        try:
            plan = await asyncio.to_thread(plan_horizon, inp)
        except Exception as exc:  # the planner is advisory: it must never stop the agent
            plan = HorizonPlan(
                PlanStatus.FAILED, f"planner raised {type(exc).__name__}: {exc}", inp.at
            )
        was = self.planner_status
        self.planner_solve_s, self.planner_status = plan.solve_s, plan.status.value
        self.planner_reason = plan.reason
        if plan.usable:
            if was != plan.status.value:
                log.info("horizon plan %s in %.3f s: %s", plan.status, plan.solve_s, plan.reason)
            self.horizon = plan
        else:
            if was != plan.status.value:
                log.warning("horizon planner fell back to the rule: %s", plan.reason)
            self.horizon = None

    def ramp_headroom_w(self, mono: float) -> float:
        """The ramp budget (:class:`agent.control.site.RampBudget`), holding at most one control
        interval's worth of ramp or the largest single step of any device, so that a large unit
        can still start when the per-cycle budget is smaller than its step. Starting devices
        spends it (:meth:`spend_ramp`)."""
        biggest = max((fleet.largest_step_w() for fleet in self.fleets), default=0.0)
        cap = ramp_capacity_w(self.config, self.config.control.interval_s, biggest)
        return self._ramp.headroom_w(mono, cap)

    def spend_ramp(self, added_w: float) -> None:
        """Power was added: take it out of the ramp budget."""
        self._ramp.spend(added_w)
