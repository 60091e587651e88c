"""System-load feed for 4CP avoidance: a validated replay of ERCOT generation as load in MW.

The file ``generation_by_fuel_15min_2023.csv`` stamps each 15-minute interval with its END
(``interval_end_utc``) and gives ``total_mwh`` for it; × 4 is the average MW, our proxy for ERCOT
system load. Rows are validated exactly like price rows (:mod:`drivers.prices.csv_replay`).
:class:`SystemLoadReplay` plays the series like the price replay and hands out the current
month's settled history, which is what the pure estimator ``agent.control.fourcp.peak_risk`` needs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import ConfigDict, Field

from drivers.errors import SourceError
from drivers.inputs import StrictSettings
from drivers.prices.csv_replay import BadRow, PriceSeries, load_series_csv

CENTRAL = ZoneInfo("America/Chicago")


def load_system_load_csv(
    path: Path | str,
    *,
    time_column: str = "interval_end_utc",
    column: str = "total_mwh",
    mwh_to_mw: float = 4.0,
    collect_errors: bool = False,
) -> PriceSeries:
    """Load system load in MW (``column`` × ``mwh_to_mw``); timestamps are interval ends."""
    return load_series_csv(
        path,
        time_column=time_column,
        value_column=column,
        unit="MWh",
        scale=mwh_to_mw,
        interval_s=900.0,
        time_is="end",
        collect_errors=collect_errors,
    )


@dataclass(frozen=True, slots=True)
class LoadHistory:
    """Settled system load of the current (Central-time) month up to an instant."""

    times: tuple[datetime, ...]  # interval ends, UTC
    loads_mw: tuple[float, ...]
    now: datetime


class SystemLoadSettings(StrictSettings):
    """Config of a system-load replay (``type: csv_replay``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["csv_replay"] = "csv_replay"
    path: Path
    column: str = "total_mwh"
    time_column: str = "interval_end_utc"
    mwh_to_mw: float = Field(default=4.0, gt=0)
    start: datetime | None = None
    speed: float = Field(default=1.0, gt=0)


class SystemLoadReplay:
    """Plays a system-load series; ``month_history()`` is the causal input of the estimator."""

    def __init__(
        self,
        series: PriceSeries,
        *,
        start: datetime | None = None,
        speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ) -> None:
        if not series.times_s:
            raise SourceError(series.source, "the series has no valid rows to replay")
        if series.time_is != "end":
            raise ValueError("a system-load series is stamped with interval ends")
        self._series = series
        self._speed = speed
        self._clock = clock
        self._clock0 = clock()
        self._start_s = start.timestamp() if start is not None else series.times_s[0]
        self._name = name or f"load:{series.source}"

    @classmethod
    def from_settings(
        cls, settings: SystemLoadSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> SystemLoadReplay:
        series = load_system_load_csv(
            settings.path,
            time_column=settings.time_column,
            column=settings.column,
            mwh_to_mw=settings.mwh_to_mw,
            collect_errors=True,
        )
        return cls(series, start=settings.start, speed=settings.speed, clock=clock)

    @property
    def name(self) -> str:
        return self._name

    @property
    def series(self) -> PriceSeries:
        return self._series

    @property
    def rejected(self) -> tuple[BadRow, ...]:
        return self._series.rejected

    def sim_now(self) -> datetime:
        return datetime.fromtimestamp(
            self._start_s + (self._clock() - self._clock0) * self._speed, tz=UTC
        )

    def month_history(self, now: datetime | None = None) -> LoadHistory:
        """Loads of the intervals ended by ``now`` (default: simulated now) in now's month."""
        now = now or self.sim_now()
        return month_history(self._series, now)


def month_history(series: PriceSeries, now: datetime) -> LoadHistory:
    """The settled loads of ``series`` in ``now``'s Central-time month, ending at ``now``."""
    local = now.astimezone(CENTRAL)
    month_start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # An interval ending exactly at local midnight on the 1st belongs to the previous month.
    lo = bisect.bisect_right(series.times_s, month_start.timestamp())
    hi = bisect.bisect_right(series.times_s, now.timestamp())
    times = tuple(datetime.fromtimestamp(t, tz=UTC) for t in series.times_s[lo:hi])
    return LoadHistory(times=times, loads_mw=series.values[lo:hi], now=now)
