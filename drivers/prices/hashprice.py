"""Hashprice sources (USD per PH/s per day): a constant, an HTTP JSON feed, or computed.

Hashprice is what one PH/s of hashrate earns in a day::

    hashprice = (subsidy_btc + fees_btc_per_block) × btc_usd × 86400 × 1e15 / (difficulty × 2**32)

because a hash wins a block with probability 1 / (difficulty × 2^32) and 1 PH/s makes
86400 × 1e15 hashes a day. The computed source polls the BTC price and the network difficulty
(two :class:`~drivers.prices.http_json.HttpJsonSource`, ``unit: raw``) and applies the formula;
all three sources give a :class:`~drivers.prices.base.PriceReading` whose value is hashprice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from drivers.errors import BadInput, SourceError
from drivers.inputs import StrictSettings, finite_in_range
from drivers.prices.base import PriceReading
from drivers.prices.csv_replay import PriceSeries, load_series_csv
from drivers.prices.http_json import (
    HASHPRICE_RANGE_USD_PER_PH_DAY,
    HttpJsonSettings,
    HttpJsonSource,
)

SUBSIDY_BTC_2024 = 3.125  # block subsidy since the April 2024 halving
SECONDS_PER_DAY = 86400
HASHES_PER_PH = 1e15
TWO_32 = 2**32


def hashprice_usd_per_ph_day(
    btc_usd: float,
    difficulty: float,
    *,
    subsidy_btc: float = SUBSIDY_BTC_2024,
    fees_btc_per_block: float = 0.0,
) -> float:
    """Expected USD per PH/s per day at this BTC price and difficulty (see module docstring)."""
    for label, value in (("btc_usd", btc_usd), ("difficulty", difficulty)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    for label, value in (("subsidy_btc", subsidy_btc), ("fees_btc_per_block", fees_btc_per_block)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} must be a non-negative finite number, got {value!r}")
    btc_per_block = subsidy_btc + fees_btc_per_block
    return btc_per_block * btc_usd * SECONDS_PER_DAY * HASHES_PER_PH / (difficulty * TWO_32)


def _now_utc() -> datetime:
    return datetime.now(UTC)


class ConstantHashpriceSettings(StrictSettings):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["constant"] = "constant"
    usd_per_ph_day: float = Field(gt=0, allow_inf_nan=False)


class ComputedHashpriceSettings(StrictSettings):
    """BTC price and difficulty feeds (``unit: raw``) plus the block reward."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["computed"] = "computed"
    btc_usd: HttpJsonSettings
    difficulty: HttpJsonSettings
    subsidy_btc: float = Field(default=SUBSIDY_BTC_2024, ge=0, allow_inf_nan=False)
    fees_btc_per_block: float = Field(default=0.0, ge=0, allow_inf_nan=False)


HashpriceSettings = Annotated[
    ConstantHashpriceSettings | HttpJsonSettings | ComputedHashpriceSettings,
    Field(discriminator="type"),
]


class ConstantHashprice:
    """A fixed hashprice from config."""

    def __init__(self, usd_per_ph_day: float, *, clock: Callable[[], datetime] = _now_utc) -> None:
        if not math.isfinite(usd_per_ph_day) or usd_per_ph_day <= 0:
            raise ValueError(f"hashprice must be positive and finite, got {usd_per_ph_day!r}")
        self._value = usd_per_ph_day
        self._clock = clock

    @property
    def name(self) -> str:
        return "hashprice:constant"

    async def latest(self) -> PriceReading:
        now = self._clock()
        return PriceReading(self.name, now, 86400.0, self._value, now)


class ComputedHashprice:
    """Hashprice from live BTC price and difficulty feeds; fails if either feed fails."""

    def __init__(
        self,
        btc_usd: HttpJsonSource,
        difficulty: HttpJsonSource,
        *,
        subsidy_btc: float = SUBSIDY_BTC_2024,
        fees_btc_per_block: float = 0.0,
        clock: Callable[[], datetime] = _now_utc,
    ) -> None:
        self._btc = btc_usd
        self._difficulty = difficulty
        self._subsidy_btc = subsidy_btc
        self._fees_btc = fees_btc_per_block
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: ComputedHashpriceSettings) -> ComputedHashprice:
        return cls(
            HttpJsonSource(settings.btc_usd, name="btc_usd"),
            HttpJsonSource(settings.difficulty, name="difficulty"),
            subsidy_btc=settings.subsidy_btc,
            fees_btc_per_block=settings.fees_btc_per_block,
        )

    @property
    def name(self) -> str:
        return "hashprice:computed"

    async def aclose(self) -> None:
        await self._btc.aclose()
        await self._difficulty.aclose()

    async def latest(self) -> PriceReading:
        btc = await self._btc.latest()
        difficulty = await self._difficulty.latest()
        try:
            value = hashprice_usd_per_ph_day(
                btc.value,
                difficulty.value,
                subsidy_btc=self._subsidy_btc,
                fees_btc_per_block=self._fees_btc,
            )
        except ValueError as exc:
            raise BadInput(self.name, f"cannot compute hashprice: {exc}") from None
        lo, hi = HASHPRICE_RANGE_USD_PER_PH_DAY
        # Each input may be in range while the result is absurd (a difficulty of 1e-6).
        value = finite_in_range(
            value, lo, hi, "computed hashprice", source=self.name, unit="USD/PH/day"
        )
        now = self._clock()
        # The reading is as old as its older input.
        at = min(btc.at, difficulty.at)
        return PriceReading(self.name, now, 86400.0, value, at)


class CsvHashpriceSettings(StrictSettings):
    """A daily hashprice series from a CSV (``type: csv_replay``), e.g. the shared
    ``btc/btc_daily_2021_2024.csv``: one row per UTC day."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["csv_replay"] = "csv_replay"
    path: Path
    column: str = "hashprice_usd_per_ph_day"
    time_column: str = "date"


class HashpriceReplay:
    """A daily hashprice series read at a clock: the market's when prices replay history (a
    demo, a soak), so the hashprice is the replayed day's, not today's."""

    def __init__(self, series: PriceSeries, *, clock: Callable[[], datetime] = _now_utc) -> None:
        self.series = series
        self._clock = clock

    @classmethod
    def from_settings(
        cls, settings: CsvHashpriceSettings, *, clock: Callable[[], datetime] = _now_utc
    ) -> HashpriceReplay:
        series = load_series_csv(
            settings.path,
            time_column=settings.time_column,
            value_column=settings.column,
            unit="USD/PH/day",
        )
        lo, hi = HASHPRICE_RANGE_USD_PER_PH_DAY
        if not all(lo <= v <= hi for v in series.values):
            raise BadInput(
                settings.path.name, f"{settings.path}: hashprice must be within {lo:g}..{hi:g}"
            )
        return cls(series, clock=clock)

    @property
    def name(self) -> str:
        return "hashprice-csv"

    async def latest(self) -> PriceReading:
        now = self._clock()
        i = self.series.index_at_or_before(now.timestamp())
        if i is None or now.timestamp() >= self.series.times_s[-1] + self.series.interval_s:
            first = datetime.fromtimestamp(self.series.times_s[0], tz=UTC)
            last = datetime.fromtimestamp(self.series.times_s[-1], tz=UTC)
            raise SourceError(
                self.name,
                f"no hashprice for {now:%Y-%m-%d}: the series covers {first:%Y-%m-%d}"
                f" .. {last:%Y-%m-%d}",
            )
        start = datetime.fromtimestamp(self.series.times_s[i], tz=UTC)
        return PriceReading(self.name, start, self.series.interval_s, self.series.values[i], now)
