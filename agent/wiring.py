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

from agent.config import AgentConfig, ConstantPriceConfig, CsvPriceConfig
from agent.runtime import Components, MinerDevice
from drivers.errors import SourceError
from drivers.miners.pyasic_driver import PyasicMiner
from drivers.prices.base import PriceReading, PriceSource
from drivers.prices.csv_replay import CsvPriceReplay, load_price_csv
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource

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


def build_components(config: AgentConfig) -> Components:
    return Components(miners=build_miners(config), price_source=build_price_source(config))
