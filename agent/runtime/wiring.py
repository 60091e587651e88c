"""Builds the runtime's components from a config: drivers for every device and signal.

This is the one place that knows which driver class serves which config ``type``; the rest of
the agent sees only the protocols in ``drivers/*/base.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agent.control.config import AgentConfig, ConstantPriceConfig, CsvPriceConfig
from agent.control.economics import mining_revenue_usd_per_h
from agent.runtime.events import EventSource
from agent.runtime.gpu_fleet import build_gpu_fleet
from agent.runtime.loop import Agent, Components, MinerDevice
from drivers.errors import SourceError
from drivers.grid.base import GridEvent
from drivers.grid.mqtt_curtail import MqttCurtailSource
from drivers.grid.openadr import OpenAdrVen
from drivers.miners.pyasic_driver import PyasicMiner
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
        return CsvPriceReplay(series, start=rt.start, speed=rt.speed, clock=clock)
    if isinstance(rt, HttpJsonSettings):
        return HttpJsonSource(rt)
    raise AssertionError(f"unhandled price config {rt!r}")


def build_miners(config: AgentConfig) -> dict[str, MinerDevice]:
    """One pyasic driver per configured miner, sharing one fleet semaphore."""
    semaphore = asyncio.Semaphore(config.control.max_concurrency)
    timeout_s = config.control.device_timeout_s
    return {
        device_id: PyasicMiner.luxos(address, semaphore, device_id=device_id, timeout_s=timeout_s)
        for device_id, address, _line in config.expanded_miners()
    }


def build_signals(config: AgentConfig, components: Components) -> None:
    """Hashprice feed, day-ahead forecast and system load (4CP), where configured.

    A replayed system load or day-ahead file follows the real-time price replay's clock (the
    coordinator looks both up at the market's time), so they stay in step in demos and tests.
    """
    hp = config.economics.hashprice
    if isinstance(hp.feed, HttpJsonSettings):
        components.hashprice_source = HttpJsonSource(hp.feed, name="hashprice")
    elif isinstance(hp.feed, ComputedHashpriceSettings):
        components.hashprice_source = ComputedHashprice.from_settings(hp.feed)
    elif isinstance(hp.feed, CsvHashpriceSettings):
        # On the market's clock: a replayed price year reads that year's hashprice.
        sim_now = getattr(components.price_source, "sim_now", None)
        clock = sim_now if callable(sim_now) else (lambda: datetime.now(UTC))
        components.hashprice_source = HashpriceReplay.from_settings(hp.feed, clock=clock)
    da = config.prices.day_ahead
    if da is not None:
        components.day_ahead = DayAheadForecast(
            load_day_ahead_csv(da.path, da.column, collect_errors=True)
        )
    load_csv = config.grid.fourcp.system_load_csv
    if config.grid.fourcp.enabled and load_csv is not None:
        if not load_csv.is_file():
            raise SourceError("system-load", f"system-load file {load_csv} not found")
        components.system_load = SystemLoadReplay(
            load_system_load_csv(load_csv, collect_errors=True)
        )


def build_components(config: AgentConfig) -> Components:
    fleet = build_gpu_fleet(config) if config.gpu_nodes else None
    components = Components(
        miners=build_miners(config), price_source=build_price_source(config), gpu_fleet=fleet
    )
    if fleet is not None:
        components.services.append(fleet.run)  # opens the GPU drivers, closes them at stop
    build_signals(config, components)
    return components


def attach_grid_sources(agent: Agent, config: AgentConfig) -> None:
    """Add the configured grid event sources to a built agent (they need its live state)."""
    grid = config.grid

    def site_power_w() -> float:
        snap = agent.state.snapshot
        if snap is None or snap.measured_site_power_w is None:
            return 0.0
        return snap.measured_site_power_w

    def opt_in(event: GridEvent) -> bool:
        """Join an economic event when payment + price beats the best value it would shed."""
        if event.mandatory:
            return True
        snap, plan = agent.state.snapshot, agent.state.plan
        if snap is None or plan is None:
            return False
        price = plan.effective_price_usd_per_mwh
        best = best_mining_value_usd_per_mwh(config, snap.hashprice_usd_per_ph_day)
        gain = event.payment_usd_per_mwh + price - grid.economic_opt_in_margin_usd_per_mwh
        return gain >= best

    sources: list[EventSource] = []
    if grid.openadr is not None:
        sources.append(OpenAdrVen(grid.openadr, opt_rule=opt_in, site_power_w=site_power_w))
    if grid.mqtt_curtail is not None:
        sources.append(MqttCurtailSource(grid.mqtt_curtail))
    for source in sources:
        agent.components.grid_sources.append(source)
        agent.components.services.append(source.run)  # type: ignore[attr-defined]


def best_mining_value_usd_per_mwh(config: AgentConfig, hashprice: float) -> float:
    """The highest value per MWh of any configured miner profile (what an event sheds last)."""
    best = 0.0
    for model in config.miner_models.values():
        for p in model.profiles:
            rev = mining_revenue_usd_per_h(p.hashrate_ths, hashprice, config.economics.pool_fee)
            best = max(best, rev / (p.power_w / 1e6))
    return best
