"""Builds the runtime's components from a config: fleets, signals, grid sources, the meter.

Device drivers come from the driver registry (:mod:`agent.runtime.registry`, keyed by
``firmware:``, ``driver:`` and ``ai.scheduler:``); price and signal sources are chosen here by
their config ``type``. The rest of the agent sees only the protocols in ``drivers/*/base.py``
and the fleet protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from agent.control.config import AgentConfig, ConfigError, ConstantPriceConfig, CsvPriceConfig
from agent.control.economics import mining_revenue_usd_per_h
from agent.journal.store import Store
from agent.runtime.fleet import Fleet
from agent.runtime.gpu_fleet import build_gpu_fleet
from agent.runtime.loop import Components, Service
from agent.runtime.miner_fleet import MinerDevice, MinerFleet
from agent.runtime.registry import DriverConfigError, DriverRegistry, MinerLine, live_drivers
from agent.runtime.state import AgentState
from drivers.errors import SourceError
from drivers.grid.base import GridEvent
from drivers.grid.mqtt_curtail import MqttCurtailSource
from drivers.grid.openadr import OpenAdrVen
from drivers.inputs import record
from drivers.meters.base import Meter
from drivers.miners.base import MinerProfile
from drivers.prices.base import PriceReading, PriceSource
from drivers.prices.csv_replay import (
    CsvPriceReplay,
    DayAheadForecast,
    load_day_ahead_csv,
    load_price_csv,
)
from drivers.prices.hashprice import (
    ComputedHashprice,
    ComputedHashpriceSettings,
    CsvHashpriceSettings,
    HashpriceReplay,
)
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource
from drivers.prices.system_load import SystemLoadReplay, load_system_load_csv

log = logging.getLogger(__name__)


class GridSource(Protocol):
    """A grid event source the runtime runs as a service (it holds its connection)."""

    @property
    def name(self) -> str: ...

    def events(self) -> tuple[GridEvent, ...]: ...

    async def run(self, stop: asyncio.Event) -> None: ...


class ConstantPrice:
    """A fixed energy price (tests, sites on a flat tariff)."""

    def __init__(self, value: float, name: str = "constant") -> None:
        self._value = value
        self._name = name
        self._start = datetime.now(UTC).replace(second=0, microsecond=0)

    @property
    def name(self) -> str:
        return self._name

    async def latest(self) -> PriceReading:
        return PriceReading(self._name, self._start, 900.0, self._value, self._start)


def build_price_source(
    config: AgentConfig, *, clock: Callable[[], float] = time.monotonic
) -> PriceSource:
    rt = config.prices.realtime
    if isinstance(rt, ConstantPriceConfig):
        return ConstantPrice(rt.value)
    if isinstance(rt, CsvPriceConfig):
        if not rt.path.is_file():
            raise SourceError(
                f"csv:{rt.path.name}",
                f"price file {rt.path} not found (the real ERCOT data lives in ../shared/data)",
            )
        series = load_price_csv(rt.path, rt.column, collect_errors=True)
        for row in series.rejected[:5]:
            log.warning("price row rejected: %s", row)
        for row in series.rejected:  # each counted in rejected_inputs_total
            record(None, f"csv:{rt.path.name}", row)
        return CsvPriceReplay(series, start=rt.start, speed=rt.speed, clock=clock)
    if isinstance(rt, HttpJsonSettings):
        return HttpJsonSource(rt)
    raise AssertionError(f"unhandled price config {rt!r}")


def build_miners(
    config: AgentConfig, drivers: DriverRegistry | None = None, *, source: str = "<config>"
) -> dict[str, MinerDevice]:
    """One driver per configured miner, by its ``firmware:``, sharing one fleet semaphore.

    Each line's ``firmware`` picks the family (``auto``: pyasic identifies it on first
    contact); its ``credentials`` log in where the family needs them.
    """
    registry = live_drivers() if drivers is None else drivers
    semaphore = asyncio.Semaphore(config.control.max_concurrency)
    timeout_s = config.control.device_timeout_s
    line_of = {id(line): i for i, line in enumerate(config.miners)}
    miners: dict[str, MinerDevice] = {}
    problems: dict[int, str] = {}
    for device_id, address, line in config.expanded_miners():
        i = line_of[id(line)]
        if i in problems:
            continue
        # The model's profiles: the ladder a power-target or power-limit family maps onto.
        ladder = tuple(
            MinerProfile(p.name, p.power_w, p.hashrate_ths)
            for p in config.miner_models[line.model].profiles
        )
        try:
            miners[device_id] = registry.miner(
                MinerLine(device_id, address, line, semaphore, timeout_s, ladder)
            )
        except DriverConfigError as exc:
            problems[i] = f"{source}: {exc.where(f'miners.{i}', 'firmware')}: {exc}"
    if problems:
        raise ConfigError(source, list(problems.values()))
    return miners


@dataclass(frozen=True, slots=True)
class Signals:
    """The optional signals: hashprice feed, day-ahead forecast, system load (4CP)."""

    hashprice_source: PriceSource | None = None
    day_ahead: DayAheadForecast | None = None
    system_load: SystemLoadReplay | None = None


def build_signals(config: AgentConfig, price_source: PriceSource | None = None) -> Signals:
    """Hashprice feed, day-ahead forecast and system load (4CP), where configured.

    A replayed hashprice series (``csv_replay``) reads ``price_source``'s clock when it has one
    (a real-time price replay), so a replayed price year reads that year's hashprice.

    A replayed system load or day-ahead file follows the real-time price replay's clock (the
    coordinator looks both up at the market's time), so they stay in step in demos and tests.
    """
    hashprice: PriceSource | None = None
    hp = config.economics.hashprice
    if isinstance(hp.feed, HttpJsonSettings):
        hashprice = HttpJsonSource(hp.feed, name="hashprice")
    elif isinstance(hp.feed, ComputedHashpriceSettings):
        hashprice = ComputedHashprice.from_settings(hp.feed)
    elif isinstance(hp.feed, CsvHashpriceSettings):
        # On the market's clock: a replayed price year reads that year's hashprice.
        sim_now = getattr(price_source, "sim_now", None)
        clock = sim_now if callable(sim_now) else (lambda: datetime.now(UTC))
        hashprice = HashpriceReplay.from_settings(hp.feed, clock=clock)
    da = config.prices.day_ahead
    day_ahead = None
    if da is not None:
        day_ahead = DayAheadForecast(load_day_ahead_csv(da.path, da.column, collect_errors=True))
    system_load = None
    load_csv = config.grid.fourcp.system_load_csv
    if config.grid.fourcp.enabled and load_csv is not None:
        if not load_csv.is_file():
            raise SourceError("system-load", f"system-load file {load_csv} not found")
        system_load = SystemLoadReplay(load_system_load_csv(load_csv, collect_errors=True))
    return Signals(hashprice, day_ahead, system_load)


def build_meter(config: AgentConfig) -> Meter | None:
    """The site meter, where the config has a ``meter:`` block."""
    if config.meter is None:
        return None
    # pymodbus loads only for metered sites.
    from drivers.meters.maps import MeterLimits
    from drivers.meters.modbus import ModbusMeter

    # A reading beyond three times the interconnect is a broken meter, not a site.
    plausible_w = min(config.meter.max_abs_site_w, 3 * config.site.interconnect_limit_kw * 1e3)
    return ModbusMeter(config.meter, limits=MeterLimits(max_abs_site_w=plausible_w))


def build_ambient_source(config: AgentConfig) -> PriceSource | None:
    """The weather feed, where ``ambient.source`` is ``http_json``."""
    feed = config.ambient.feed
    if config.ambient.source == "http_json" and feed is not None:
        return HttpJsonSource(feed, name="ambient")
    return None


def build_fleets(
    config: AgentConfig,
    drivers: DriverRegistry | None = None,
    *,
    source: str = "<config>",
    state: AgentState | None = None,
) -> list[Fleet]:
    """The miner fleet, the GPU fleet when the site has GPU nodes, and the node agents
    (``remote_nodes:``) when it has them."""
    fleets: list[Fleet] = [MinerFleet(config, build_miners(config, drivers, source=source))]
    if config.gpu_nodes:
        fleets.append(build_gpu_fleet(config, drivers=drivers, source=source))
    if config.remote_nodes is not None:
        fleets.append(build_remote_fleet(config, state))
    return fleets


def build_remote_fleet(config: AgentConfig, state: AgentState | None) -> Fleet:
    """Node agents over MQTT: one fleet, one broker session (aiomqtt loads here)."""
    from agent.runtime.remote_fleet import RemoteNodeFleet, controller_will
    from drivers.bus.mqtt import MqttBus

    assert config.remote_nodes is not None
    fleet_clock = datetime.now(UTC)
    epoch = int(fleet_clock.timestamp() * 1000)
    will = controller_will(config.site.id, epoch)
    bus = MqttBus(config.remote_nodes.broker.bus_settings(f"site-agent-{config.site.id}", will))
    return RemoteNodeFleet(config, bus, state=state, epoch=epoch)


def build_components(
    config: AgentConfig,
    state: AgentState,
    *,
    drivers: DriverRegistry | None = None,
    fleets: Sequence[Fleet] | None = None,
    price_source: PriceSource | None = None,
    store: Store | None = None,
    services: Sequence[Service] = (),
) -> Components:
    """Everything the agent drives, from config, with drivers from ``drivers`` (the live
    registry by default); ``fleets`` and ``price_source`` replace the configured ones.

    ``state`` is the one the agent will write: the grid sources read the latest snapshot and
    plan from it (an economic event is joined only when it pays).
    """
    grid_sources = build_grid_sources(config, state)
    prices = build_price_source(config) if price_source is None else price_source
    signals = build_signals(config, prices)
    return Components(
        fleets=build_fleets(config, drivers, state=state) if fleets is None else fleets,
        price_source=prices,
        store=store,
        grid_sources=grid_sources,
        hashprice_source=signals.hashprice_source,
        day_ahead=signals.day_ahead,
        system_load=signals.system_load,
        meter=build_meter(config),
        ambient_source=build_ambient_source(config),
        # Grid sources keep their connections in their own service.
        services=(*services, *(source.run for source in grid_sources)),
    )


def build_grid_sources(config: AgentConfig, state: AgentState) -> list[GridSource]:
    """The configured grid event sources (OpenADR VEN, MQTT curtailment topic)."""
    grid = config.grid

    def site_power_w() -> float:
        snap = state.snapshot
        if snap is None or snap.measured_site_power_w is None:
            return 0.0
        return snap.measured_site_power_w

    def opt_in(event: GridEvent) -> bool:
        """Join an economic event when payment + price beats the best value it would shed."""
        if event.mandatory:
            return True
        snap, plan = state.snapshot, state.plan
        if snap is None or plan is None:
            return False
        price = plan.effective_price_usd_per_mwh
        best = best_mining_value_usd_per_mwh(config, snap.hashprice_usd_per_ph_day)
        gain = event.payment_usd_per_mwh + price - grid.economic_opt_in_margin_usd_per_mwh
        return gain >= best

    sources: list[GridSource] = []
    if grid.openadr is not None:
        sources.append(OpenAdrVen(grid.openadr, opt_rule=opt_in, site_power_w=site_power_w))
    if grid.mqtt_curtail is not None:
        sources.append(MqttCurtailSource(grid.mqtt_curtail))
    return sources


def best_mining_value_usd_per_mwh(config: AgentConfig, hashprice: float) -> float:
    """The highest value per MWh of any configured miner profile (what an event sheds last)."""
    best = 0.0
    for model in config.miner_models.values():
        for p in model.profiles:
            rev = mining_revenue_usd_per_h(p.hashrate_ths, hashprice, config.economics.pool_fee)
            best = max(best, rev / (p.power_w / 1e6))
    return best
