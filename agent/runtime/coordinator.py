"""The coordinator: the only reader of devices and signals, keeper of the last good values.

It polls the miner fleet and the price source on their own schedules (with jitter), keeps each
source's last good reading with its age and last error, and hands out one immutable
:class:`~agent.control.domain.Snapshot` per control cycle. Consumers never poll. A source that
fails is
logged once when it starts failing and once when it recovers (Home Assistant's coordinator
habit), not on every poll.

The coordinator also holds what was *commanded* to each device (set by the actuator, loaded from
the journal on restart), because the policy's dwell times and the limit arithmetic need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agent.control.config import AgentConfig
from agent.control.domain import (
    SLEEP,
    ActiveEvent,
    MinerView,
    OperatingPoint,
    PriceView,
    Snapshot,
)
from agent.control.fourcp import peak_risk
from agent.control.site import RampBudget, miner_ladder, ramp_capacity_w
from agent.runtime.fleet import GpuFleet
from agent.runtime.state import AgentState
from drivers.errors import AgentError, BadInput, DeviceError
from drivers.miners.base import MinerMode, MinerReading, MinerTelemetry
from drivers.prices.base import PriceReading, PriceSource
from drivers.prices.csv_replay import DayAheadForecast
from drivers.prices.system_load import SystemLoadReplay

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class MinerSlot:
    """Everything the coordinator tracks for one miner."""

    device_id: str
    address: str
    model: str
    points: tuple[OperatingPoint, ...]
    nameplate_w: float
    circuit: str | None
    commanded: str
    commanded_since: datetime
    reading: MinerReading | None = None
    read_at: float | None = None  # monotonic time of the last good reading
    last_error: str | None = None
    consecutive_failures: int = 0
    fault: str | None = None
    fault_since: float | None = None  # monotonic time the fault was set
    # Given another chance after a fault: not trusted to follow a command until telemetry
    # confirms one (the actuator clears it), so it counts at what it draws meanwhile.
    probation: bool = False


class Coordinator:
    """Polls sources, keeps last good data, builds snapshots."""

    def __init__(
        self,
        config: AgentConfig,
        state: AgentState,
        miners: Mapping[str, MinerTelemetry],
        price_source: PriceSource | None,
        *,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.state = state
        self.drivers = dict(miners)
        self.price_source = price_source
        self.clock = clock
        self.monotonic = monotonic
        self.hashprice_usd_per_ph_day = config.economics.hashprice.usd_per_ph_day
        self.price: PriceReading | None = None
        # Monotonic time the newest price interval was first seen: its age is how long no *new*
        # price has arrived, whether the source errs or keeps repeating an old interval.
        self.price_read_at: float | None = None
        self.events: dict[str, ActiveEvent] = {}
        self.gpu_fleet: GpuFleet | None = None  # set by the runtime when the site has GPUs
        # Optional signals, set by the wiring: a hashprice feed, day-ahead prices, system load.
        self.hashprice_source: PriceSource | None = None
        self.hashprice_read_at: float | None = None
        self.day_ahead: DayAheadForecast | None = None
        self.system_load: SystemLoadReplay | None = None
        self.started_mono = monotonic()
        self._ramp = RampBudget.of(config)
        now = clock()
        self.slots: dict[str, MinerSlot] = {}
        for device_id, address, line in config.expanded_miners():
            model = config.miner_models[line.model]
            self.slots[device_id] = MinerSlot(
                device_id=device_id,
                address=address,
                model=line.model,
                points=miner_ladder(model),
                nameplate_w=model.max_power_w,
                circuit=line.circuit,
                # Until the journal or telemetry says otherwise, assume the worst: running flat out.
                commanded=miner_ladder(model)[-1].name,
                commanded_since=now,
            )
        # Devices whose commanded state came from the journal: adoption must not overwrite it.
        self.journaled: set[str] = set()
        self.miners_polled = asyncio.Event()  # set after the first full fleet poll
        self.price_changed = asyncio.Event()

    # --- commanded state (written by the actuator and by restart) --------------------------

    def set_commanded(self, device_id: str, point: str, since: datetime) -> None:
        slot = self.slots[device_id]
        slot.commanded, slot.commanded_since = point, since

    def set_fault(self, device_id: str, reason: str | None) -> None:
        slot = self.slots[device_id]
        if slot.fault == reason:
            return
        if reason is None:
            log.info("device %s recovered from fault: %s", device_id, slot.fault)
            self.state.faults.pop(device_id, None)
        else:
            log.warning("device %s faulted: %s", device_id, reason)
            self.state.faults[device_id] = reason
        slot.fault = reason
        slot.fault_since = None if reason is None else self.monotonic()

    # --- polling -------------------------------------------------------------------------

    async def poll_miners(self) -> None:
        """Read every miner once, concurrently (drivers bound the concurrency)."""
        health = self.state.source("miners")
        started = self.monotonic()

        async def one(device_id: str, driver: MinerTelemetry) -> None:
            slot = self.slots[device_id]
            try:
                reading = await driver.read()
            except DeviceError as exc:
                if slot.last_error is None:
                    log.warning("miner %s read failed: %s", device_id, exc.message)
                slot.last_error = exc.message
                slot.consecutive_failures += 1
                return
            if slot.last_error is not None:
                log.info("miner %s answers again", device_id)
            slot.reading, slot.read_at = reading, self.monotonic()
            slot.last_error, slot.consecutive_failures = None, 0

        async with asyncio.TaskGroup() as tg:
            for device_id, driver in self.drivers.items():
                tg.create_task(one(device_id, driver))
        health.last_duration_s = self.monotonic() - started
        failed = sum(1 for s in self.slots.values() if s.last_error is not None)
        health.last_error = f"{failed} miner(s) not answering" if failed else None
        health.last_success = self.clock()
        health.successes += 1
        self.miners_polled.set()

    async def poll_price(self) -> None:
        if self.price_source is None:
            return
        health = self.state.source(f"price:{self.price_source.name}")
        started = self.monotonic()
        try:
            reading = await self.price_source.latest()
        except AgentError as exc:
            if health.last_error is None:
                log.warning("price source %s failed: %s", self.price_source.name, exc)
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
        health = self.state.source(f"hashprice:{source.name}")
        try:
            reading = await source.latest()
            if not (math.isfinite(reading.value) and reading.value > 0):
                raise BadInput(
                    source.name, f"hashprice must be a positive number, got {reading.value}"
                )
        except AgentError as exc:
            if health.last_error is None:
                log.warning("hashprice feed %s failed: %s", source.name, exc)
            health.last_error, health.failures = str(exc), health.failures + 1
            return
        if health.last_error is not None:
            log.info("hashprice feed %s recovered", source.name)
        health.last_error, health.last_success = None, self.clock()
        health.successes += 1
        self.hashprice_usd_per_ph_day, self.hashprice_read_at = reading.value, self.monotonic()

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

    def miner_view(self, slot: MinerSlot, now_mono: float) -> MinerView:
        # Never read: its age is the agent's age, so the policy treats it as unknown (nameplate).
        age = now_mono - (self.started_mono if slot.read_at is None else slot.read_at)
        fresh = slot.read_at is not None and age <= self.max_reading_age_s
        fault = slot.fault
        if fault is None and slot.consecutive_failures >= 3:
            fault = f"unreachable: {slot.last_error}"
        reading = slot.reading if fresh else None
        if fault is None and slot.probation and reading is not None:
            commanded_w = next(p.power_w for p in slot.points if p.name == slot.commanded)
            # A device that once accepted a command and ignored it may do so again: while it
            # draws well above its commanded point, the policy must count (and not move) it.
            if reading.power_w > commanded_w + 0.1 * slot.nameplate_w:
                fault = (
                    f"unconfirmed after a fault: draws {reading.power_w:.0f} W, "
                    f"commanded {slot.commanded} ({commanded_w:.0f} W)"
                )
        return MinerView(
            device_id=slot.device_id,
            model=slot.model,
            points=slot.points,
            nameplate_w=slot.nameplate_w,
            commanded=slot.commanded,
            commanded_since=slot.commanded_since,
            measured_power_w=None if reading is None else reading.power_w,
            measured_hashrate_ths=None if reading is None else reading.hashrate_ths,
            reading_age_s=age,
            fault=fault,
            circuit=slot.circuit,
        )

    @property
    def max_reading_age_s(self) -> float:
        return 3 * self.config.control.poll_interval_s + self.config.control.device_timeout_s

    def snapshot(self) -> Snapshot:
        now = self.clock()
        mono = self.monotonic()
        miners = tuple(self.miner_view(s, mono) for s in self.slots.values())
        gpu_nodes = () if self.gpu_fleet is None else self.gpu_fleet.views(now)
        measured = [m.measured_power_w for m in miners] + [n.measured_power_w for n in gpu_nodes]
        site_w = None if any(p is None for p in measured) else sum(p for p in measured if p)
        price = None
        if self.price is not None and self.price_read_at is not None:
            price = PriceView(
                usd_per_mwh=self.price.value,
                interval_start=self.price.interval_start,
                age_s=mono - self.price_read_at,
            )
        ramp_w = self.ramp_headroom_w(mono)
        market_now = self.market_now()
        risk, reason = self.fourcp(market_now)
        day_ahead = None if self.day_ahead is None else self.day_ahead.price_at(market_now)
        return Snapshot(
            at=now,
            price=price,
            hashprice_usd_per_ph_day=self.current_hashprice(mono),
            miners=miners,
            gpu_nodes=gpu_nodes,
            events=tuple(e for e in self.events.values() if e.event.active_at(now)),
            measured_site_power_w=site_w,
            ramp_headroom_w=ramp_w,
            day_ahead_usd_per_mwh=day_ahead,
            fourcp_risk=risk,
            fourcp_reason=reason,
        )

    def ramp_headroom_w(self, mono: float) -> float:
        """The ramp budget (:class:`agent.control.site.RampBudget`), holding at most one control
        interval's worth of ramp or the largest single step of any device. Starting devices
        spends it (:meth:`spend_ramp`)."""
        biggest = max(
            (s.points[-1].power_w - s.points[0].power_w for s in self.slots.values()), default=0.0
        )
        if self.gpu_fleet is not None:
            biggest = max(
                [biggest, *(n.gpu_count * n.max_cap_w for n in self.gpu_fleet.views(self.clock()))]
            )
        cap = ramp_capacity_w(self.config, self.config.control.interval_s, biggest)
        return self._ramp.headroom_w(mono, cap)

    def spend_ramp(self, added_w: float) -> None:
        """Power was added: take it out of the ramp budget."""
        self._ramp.spend(added_w)

    def observed_point(self, slot: MinerSlot) -> str | None:
        """The operating point telemetry shows the miner at, or None if unclear."""
        r = slot.reading
        if r is None:
            return None
        if r.mode is MinerMode.SLEEPING:
            return SLEEP
        if r.profile is not None and any(p.name == r.profile for p in slot.points):
            return r.profile
        return None

    def adopt_observed_state(self) -> int:
        """On start, take each miner's observed operating point as its commanded state.

        Without a journal entry the agent must not assume it put a miner where it is; adopting
        what telemetry shows avoids a storm of commands on the first cycle. Returns how many
        miners were adopted.
        """
        adopted = 0
        # The agent did not put it there, so no dwell time protects that state: date it back.
        control = self.config.control
        since = self.clock() - timedelta(seconds=max(control.min_on_s, control.min_off_s))
        for slot in self.slots.values():
            if slot.device_id in self.journaled:
                continue
            observed = self.observed_point(slot)
            if observed is not None:
                slot.commanded, slot.commanded_since = observed, since
                adopted += 1
        return adopted

    def reconcile_drift(self, pending: set[str]) -> list[tuple[str, str, str]]:
        """Adopt the observed point of devices that drifted from their commanded one.

        A miner restored by hand, rebooted into its default profile, or woken by its own
        firmware is no longer where the agent put it. Taking what telemetry shows as the
        commanded state (dated back, so no dwell time protects it) makes the policy decide
        afresh, and re-shed it if a grid event is still in force: an OFF signal is a level.
        Devices with a command in flight or a fault are skipped. Returns (id, was, now).
        """
        control = self.config.control
        since = self.clock() - timedelta(seconds=max(control.min_on_s, control.min_off_s))
        drifted = []
        mono = self.monotonic()
        for slot in self.slots.values():
            if slot.device_id in pending or slot.fault is not None or slot.read_at is None:
                continue
            if mono - slot.read_at > self.max_reading_age_s:
                continue
            observed = self.observed_point(slot)
            if observed is None or observed == slot.commanded:
                continue
            drifted.append((slot.device_id, slot.commanded, observed))
            log.warning(
                "miner %s drifted: commanded %s, telemetry shows %s",
                slot.device_id,
                slot.commanded,
                observed,
            )
            slot.commanded, slot.commanded_since = observed, since
        return drifted
