"""Price CSV loading and replay: real-time prices played at real or accelerated speed.

A price CSV has a UTC timestamp column (ISO 8601, e.g. ``2023-01-01T06:00:00Z``) and one value
column per settlement point. :func:`load_price_csv` validates every row and returns a compact,
immutable :class:`PriceSeries` that the backtest indexes directly. A bad row (empty, NaN, inf,
unparseable, missing column, unparseable / duplicate / non-monotonic timestamp) raises
:class:`BadRow` naming the file, the line, the column and what was expected; with
``collect_errors=True`` it is skipped and recorded in ``PriceSeries.rejected`` instead, so a
replay never acts on it. Negative prices are valid (they are real in ERCOT).

:class:`CsvPriceReplay` is a :class:`~drivers.prices.base.PriceSource` that plays a series from a
chosen start at ``speed`` times real time (``speed=600``: a 15-minute interval every 1.5 s), with
an injectable monotonic clock. ``latest()`` gives the last *settled* interval (one whose end has
passed): a causal policy never sees the price of the interval it is in.

:func:`load_day_ahead_csv` and :class:`DayAheadForecast` read the hourly day-ahead file and answer
"what did the day-ahead market price the hour containing this instant at?".
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TextIO

from pydantic import ConfigDict, Field

from drivers.errors import BadInput, SourceError
from drivers.inputs import (
    MAX_CSV_BYTES,
    MAX_CSV_FIELD_BYTES,
    InputRejected,
    Reason,
    StrictSettings,
    shown,
)
from drivers.prices.base import PriceReading


class BadRow(BadInput):
    """One CSV row (or the header) is unusable. Carries where and why."""

    def __init__(
        self, path: Path, line: int, column: str, message: str, reason: Reason = "bad_syntax"
    ) -> None:
        super().__init__(path.name, f"{path}:{line}: column {column!r}: {message}")
        self.reason: Reason = reason  # for rejected_inputs_total (drivers/inputs.py)
        self.path = path
        self.line = line
        self.column = column
        # The row's timestamp when it could be read (epoch s), so a replay can report the
        # rejected interval at the moment it would have been acted on.
        self.time_s: float | None = None


@dataclass(frozen=True, slots=True)
class PriceSeries:
    """A validated, strictly increasing series of values at UTC instants (epoch seconds).

    ``times_s[i]`` is the instant the CSV names for row i (interval start for price files,
    interval end for the system-load file: see ``time_is``). ``rejected`` lists the rows skipped
    when loading with ``collect_errors=True``.
    """

    source: str
    column: str
    interval_s: float
    times_s: tuple[float, ...]
    values: tuple[float, ...]
    time_is: Literal["start", "end"] = "start"
    rejected: tuple[BadRow, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.times_s)

    def index_at_or_before(self, t_s: float) -> int | None:
        """Index of the last row whose timestamp is ≤ ``t_s``, or None if none is."""
        i = bisect.bisect_right(self.times_s, t_s) - 1
        return i if i >= 0 else None

    def value_for_interval_containing(self, t_s: float) -> float | None:
        """Value of the interval that contains ``t_s``, or None when that interval has no row."""
        if self.time_is == "start":
            i = self.index_at_or_before(t_s)
            if i is None or t_s >= self.times_s[i] + self.interval_s:
                return None
            return self.values[i]
        # Rows are stamped with their end: the interval containing t is the first ending after t.
        j = bisect.bisect_right(self.times_s, t_s)
        if j < len(self.times_s) and self.times_s[j] - self.interval_s <= t_s:
            return self.values[j]
        return None

    def last_settled_index(self, now_s: float) -> int | None:
        """Index of the newest interval whose end is at or before ``now_s`` (causal view)."""
        end_offset = self.interval_s if self.time_is == "start" else 0.0
        return self.index_at_or_before(now_s - end_offset)

    def interval_start_s(self, i: int) -> float:
        return self.times_s[i] if self.time_is == "start" else self.times_s[i] - self.interval_s


def _utc(t_s: float) -> datetime:
    return datetime.fromtimestamp(t_s, tz=UTC)


def _parse_time(text: str) -> float:
    """Epoch seconds of an ISO-8601 instant with an explicit zone, or of a plain date (a UTC
    day: daily series such as hashprice); ValueError otherwise."""
    text = text.strip()
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None and len(text) == 10:
        stamp = stamp.replace(tzinfo=UTC)
    if stamp.tzinfo is None:
        raise ValueError("no time zone")
    return stamp.timestamp()


def load_series_csv(
    path: Path | str,
    *,
    time_column: str,
    value_column: str,
    unit: str,
    scale: float = 1.0,
    interval_s: float | None = None,
    time_is: Literal["start", "end"] = "start",
    collect_errors: bool = False,
    max_bytes: int = MAX_CSV_BYTES,
) -> PriceSeries:
    """Load and validate one value column of a time-indexed CSV (see the module docstring).

    ``scale`` multiplies every value (e.g. 4 to turn 15-minute MWh into average MW). ``unit``
    only names the unit in error messages. ``interval_s`` defaults to the most common step.
    The file is refused whole (:class:`~drivers.inputs.InputRejected`) when it is larger than
    ``max_bytes``, not UTF-8, or has a field longer than the csv module's field limit; a field
    over :data:`~drivers.inputs.MAX_CSV_FIELD_BYTES` rejects its row.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8", errors="strict")
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(path.name, f"cannot open {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        handle.close()
        raise InputRejected(
            path.name, "too_large", f"{path} is {size:,} bytes (limit {max_bytes:,})"
        )
    try:
        return _read_series(
            handle,
            path,
            time_column,
            value_column,
            unit,
            scale,
            interval_s,
            time_is,
            collect_errors,
        )
    except UnicodeDecodeError as exc:
        raise InputRejected(
            path.name, "not_utf8", f"{path}: not UTF-8 (byte offset {exc.start} of a chunk)"
        ) from None
    except csv.Error as exc:
        # The csv module's own field cap (128 KiB by default) stops a huge quoted field
        # before it is held in memory; it is reported, never a traceback.
        reason: Reason = "too_large" if "larger than field limit" in str(exc) else "bad_syntax"
        raise InputRejected(path.name, reason, f"{path}: {exc}") from None
    finally:
        handle.close()


def _read_series(
    handle: TextIO,
    path: Path,
    time_column: str,
    value_column: str,
    unit: str,
    scale: float,
    interval_s: float | None,
    time_is: Literal["start", "end"],
    collect_errors: bool,
) -> PriceSeries:
    times: list[float] = []
    values: list[float] = []
    rejected: list[BadRow] = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise BadRow(path, 1, time_column, "expected a header row, the file is empty")
        header = [name.strip() for name in header]
        for needed in (time_column, value_column):
            if needed not in header:
                raise BadRow(path, 1, needed, f"expected this column in the header, found {header}")
        ti = header.index(time_column)
        vi = header.index(value_column)
        width = max(ti, vi)
        last_s = -math.inf
        for line, row in enumerate(reader, start=2):
            try:
                if len(row) <= width:
                    missing = time_column if len(row) <= ti else value_column
                    raise BadRow(
                        path, line, missing, f"expected a value, the row has {len(row)}", "missing"
                    )
                for name, index in ((time_column, ti), (value_column, vi)):
                    if len(row[index]) > MAX_CSV_FIELD_BYTES:
                        raise BadRow(
                            path,
                            line,
                            name,
                            f"a field of {len(row[index]):,} characters "
                            f"(limit {MAX_CSV_FIELD_BYTES:,})",
                            "too_large",
                        )
                stamp_text = row[ti]
                try:
                    t_s = _parse_time(stamp_text)
                except ValueError:
                    raise BadRow(
                        path,
                        line,
                        time_column,
                        f"expected an ISO-8601 UTC timestamp like 2023-01-01T06:00:00Z, "
                        f"got {shown(stamp_text)}",
                    ) from None
                if t_s <= last_s:
                    what = "duplicate" if t_s == last_s else "non-monotonic"
                    bad = BadRow(
                        path,
                        line,
                        time_column,
                        f"expected a timestamp after {_utc(last_s).isoformat()}, got {what} "
                        f"{shown(stamp_text)}",
                        "duplicate_key" if t_s == last_s else "out_of_range",
                    )
                    raise bad
                text = row[vi].strip()
                if not text:
                    bad = BadRow(
                        path, line, value_column, f"expected a number in {unit}, empty", "missing"
                    )
                    bad.time_s = t_s
                    raise bad
                try:
                    value = float(text)
                except ValueError:
                    bad = BadRow(
                        path,
                        line,
                        value_column,
                        f"expected a number in {unit}, got {shown(text)}",
                        "bad_type",
                    )
                    bad.time_s = t_s
                    raise bad from None
                value *= scale  # finite after conversion, not only as written
                if not math.isfinite(value):
                    bad = BadRow(
                        path,
                        line,
                        value_column,
                        f"expected a finite number in {unit}, got {shown(text)}",
                        "not_finite",
                    )
                    bad.time_s = t_s
                    raise bad
            except BadRow as exc:
                if not collect_errors:
                    raise
                rejected.append(exc)
                # A row with a readable, later timestamp still advances time so that a
                # NaN row does not make its successor look non-monotonic.
                if exc.time_s is not None and exc.time_s > last_s:
                    last_s = exc.time_s
                continue
            times.append(t_s)
            values.append(value)
            last_s = t_s
    if interval_s is None:
        steps = Counter(round(b - a, 3) for a, b in itertools.pairwise(times))
        if not steps:
            raise BadRow(path, 2, time_column, "expected at least two rows to infer the interval")
        interval_s = float(steps.most_common(1)[0][0])
    return PriceSeries(
        source=f"{path.name}:{value_column}",
        column=value_column,
        interval_s=interval_s,
        times_s=tuple(times),
        values=tuple(values),
        time_is=time_is,
        rejected=tuple(rejected),
    )


def load_price_csv(
    path: Path | str,
    column: str,
    *,
    time_column: str = "interval_start_utc",
    interval_s: float | None = None,
    collect_errors: bool = False,
) -> PriceSeries:
    """Load a real-time price column in USD/MWh; the timestamp is the interval start."""
    return load_series_csv(
        path,
        time_column=time_column,
        value_column=column,
        unit="USD/MWh",
        interval_s=interval_s,
        collect_errors=collect_errors,
    )


def load_day_ahead_csv(
    path: Path | str, column: str, *, collect_errors: bool = False
) -> PriceSeries:
    """Load an hourly day-ahead price column (start of the delivery hour) in USD/MWh."""
    return load_series_csv(
        path,
        time_column="interval_start_utc",
        value_column=column,
        unit="USD/MWh",
        interval_s=3600.0,
        collect_errors=collect_errors,
    )


class DayAheadSettings(StrictSettings):
    """Config of day-ahead prices read from an hourly CSV (``type: csv``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["csv"] = "csv"
    path: Path
    column: str = Field(min_length=1, description="value column, e.g. HB_WEST")


@dataclass(frozen=True, slots=True)
class DayAheadForecast:
    """Day-ahead prices used as a forecast: the hourly price of the hour containing an instant.

    Day-ahead prices are published the day before delivery, so looking one up for any instant
    of today or tomorrow is causal; bad rows are skipped (see ``series.rejected``).
    """

    series: PriceSeries

    @classmethod
    def from_settings(cls, settings: DayAheadSettings) -> DayAheadForecast:
        return cls(load_day_ahead_csv(settings.path, settings.column, collect_errors=True))

    def price_at(self, at: datetime) -> float | None:
        """Day-ahead USD/MWh for the hour containing ``at``, or None when the file lacks it."""
        return self.series.value_for_interval_containing(at.timestamp())

    def prices_between(self, start: datetime, end: datetime) -> list[tuple[datetime, float]]:
        """(hour start, USD/MWh) for every hour with a price starting in ``[start, end)``."""
        lo = bisect.bisect_left(self.series.times_s, start.timestamp())
        hi = bisect.bisect_left(self.series.times_s, end.timestamp())
        return [(_utc(self.series.times_s[i]), self.series.values[i]) for i in range(lo, hi)]


class CsvReplaySettings(StrictSettings):
    """Config of a CSV price replay (``type: csv_replay``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["csv_replay"] = "csv_replay"
    path: Path
    column: str = Field(min_length=1, description="value column, e.g. HB_WEST")
    time_column: str = "interval_start_utc"
    start: datetime | None = Field(
        default=None, description="replay start (UTC); default: end of the first interval"
    )
    speed: float = Field(default=1.0, gt=0, description="simulated seconds per real second")


class CsvPriceReplay:
    """Plays a :class:`PriceSeries` at ``speed`` from ``start`` (see the module docstring).

    Simulated time is ``start + (clock() - clock_at_creation) × speed``. ``latest()`` returns the
    newest settled interval; its ``at`` is the simulated instant it settled (its end), so the
    reading's age is how long ago the newest known price became known. If the newest settled
    interval is a rejected row, ``latest()`` raises that row's :class:`BadRow` (never its value):
    the caller keeps its last good price and its age grows.
    """

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
        if not speed > 0 or not math.isfinite(speed):
            raise ValueError(f"speed must be a positive finite number, got {speed}")
        if start is not None and start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")
        self._series = series
        self._speed = speed
        self._clock = clock
        self._clock0 = clock()
        first_end_s = series.interval_start_s(0) + series.interval_s
        self._start_s = start.timestamp() if start is not None else first_end_s
        self._name = name or f"csv:{series.source}"
        # Rejected rows with a known time, sorted, for reporting them when replay reaches them.
        timed = sorted(
            ((r.time_s, r) for r in series.rejected if r.time_s is not None),
            key=lambda pair: pair[0],
        )
        self._rejected_times = [t for t, _ in timed]
        self._rejected_rows = [r for _, r in timed]

    @classmethod
    def from_settings(
        cls, settings: CsvReplaySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> CsvPriceReplay:
        series = load_price_csv(
            settings.path, settings.column, time_column=settings.time_column, collect_errors=True
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
        """Rows skipped when loading, each with file, line, column and reason."""
        return self._series.rejected

    def restart(self) -> None:
        """Replay from the start again, from now (a demo that spent its start-up time)."""
        self._clock0 = self._clock()

    def sim_now_s(self) -> float:
        """The simulated instant, epoch seconds."""
        return self._start_s + (self._clock() - self._clock0) * self._speed

    def sim_now(self) -> datetime:
        return _utc(self.sim_now_s())

    @property
    def finished(self) -> bool:
        """True once the last row has settled: ``latest()`` will not change any more."""
        s = self._series
        return self.sim_now_s() >= s.interval_start_s(len(s) - 1) + s.interval_s

    def latest_at(self, now_s: float) -> PriceReading:
        """The newest interval settled at simulated ``now_s`` (pure: no clock)."""
        s = self._series
        i = s.last_settled_index(now_s)
        good_start_s = s.interval_start_s(i) if i is not None else -math.inf
        # A rejected row newer than the newest good one has settled: report it, act on nothing.
        # (Rejected rows carry their own timestamp; for price files that is the interval start.)
        k = bisect.bisect_right(self._rejected_times, now_s - s.interval_s) - 1
        if k >= 0 and self._rejected_times[k] > good_start_s:
            raise self._rejected_rows[k]
        if i is None:
            raise SourceError(
                self._name, f"no interval has settled yet at {_utc(now_s).isoformat()}"
            )
        start_s = s.interval_start_s(i)
        return PriceReading(
            source=self._name,
            interval_start=_utc(start_s),
            interval_s=s.interval_s,
            value=s.values[i],
            at=_utc(start_s + s.interval_s),
        )

    async def latest(self) -> PriceReading:
        return self.latest_at(self.sim_now_s())


def values_between(series: PriceSeries, start_s: float, end_s: float) -> Sequence[float]:
    """Values of the rows with timestamps in ``[start_s, end_s)`` (a slice, no copy of the rest)."""
    lo = bisect.bisect_left(series.times_s, start_s)
    hi = bisect.bisect_left(series.times_s, end_s)
    return series.values[lo:hi]
