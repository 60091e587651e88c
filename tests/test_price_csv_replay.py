"""CSV price loading and replay: every kind of bad row, causality, speed, the real ERCOT file."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drivers.errors import BadInput, SourceError
from drivers.prices.base import PriceSource
from drivers.prices.csv_replay import (
    BadRow,
    CsvPriceReplay,
    CsvReplaySettings,
    DayAheadForecast,
    DayAheadSettings,
    load_day_ahead_csv,
    load_price_csv,
)

HEADER = "interval_start_utc,HB_NORTH,HB_WEST\n"
GOOD = [
    "2023-09-06T20:00:00Z,100.5,200.25",
    "2023-09-06T20:15:00Z,-12.0,5333.97",
    "2023-09-06T20:30:00Z,30,40",
    "2023-09-06T20:45:00Z,31,41",
]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    return path


def test_loads_good_rows_with_negative_prices(tmp_path: Path) -> None:
    series = load_price_csv(write(tmp_path, GOOD), "HB_WEST")
    assert series.values == (200.25, 5333.97, 40.0, 41.0)
    assert series.interval_s == 900.0
    assert series.times_s[0] == datetime(2023, 9, 6, 20, tzinfo=UTC).timestamp()
    north = load_price_csv(write(tmp_path, GOOD), "HB_NORTH")
    assert north.values[1] == -12.0  # negative prices are real and valid


BAD_CASES = [
    # (row replacing GOOD[2], column named in the error, words in the error)
    ("2023-09-06T20:30:00Z,30,nan", "HB_WEST", "finite number"),
    ("2023-09-06T20:30:00Z,30,inf", "HB_WEST", "finite number"),
    ("2023-09-06T20:30:00Z,30,-Infinity", "HB_WEST", "finite number"),
    ("2023-09-06T20:30:00Z,30,", "HB_WEST", "empty"),
    ('2023-09-06T20:30:00Z,30,"12,5"', "HB_WEST", "got '12,5'"),  # a decimal comma
    ("2023-09-06T20:30:00Z,30,cheap", "HB_WEST", "expected a number in USD/MWh, got 'cheap'"),
    ("2023-09-06T20:30:00Z,30", "HB_WEST", "expected a value"),
    ("yesterday,30,40", "interval_start_utc", "ISO-8601"),
    ("2023-09-06T20:30:00,30,40", "interval_start_utc", "ISO-8601"),  # no zone
    ("2023-09-06T20:15:00Z,30,40", "interval_start_utc", "duplicate"),
    ("2023-09-06T20:00:00Z,30,40", "interval_start_utc", "non-monotonic"),
]


@pytest.mark.parametrize(("row", "column", "words"), BAD_CASES)
def test_bad_row_names_file_line_column_and_expectation(
    tmp_path: Path, row: str, column: str, words: str
) -> None:
    rows = [*GOOD[:2], row, GOOD[3]]
    path = write(tmp_path, rows)
    with pytest.raises(BadRow) as info:
        load_price_csv(path, "HB_WEST")
    err = info.value
    assert isinstance(err, BadInput)
    assert err.line == 4  # header is line 1, the bad row is the third data row
    assert err.column == column
    assert str(path) in str(err)
    assert ":4:" in str(err)
    assert words in str(err)


@pytest.mark.parametrize(("row", "column", "words"), BAD_CASES)
def test_collect_errors_skips_the_bad_row_only(
    tmp_path: Path, row: str, column: str, words: str
) -> None:
    series = load_price_csv(
        write(tmp_path, [*GOOD[:2], row, GOOD[3]]), "HB_WEST", collect_errors=True
    )
    assert series.values == (200.25, 5333.97, 41.0)
    assert [r.line for r in series.rejected] == [4]
    assert series.rejected[0].column == column


def test_missing_column_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(BadRow, match=r"column 'HB_PAN': expected this column in the header"):
        load_price_csv(write(tmp_path, GOOD), "HB_PAN")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BadRow, match="header row"):
        load_price_csv(empty, "HB_WEST")
    with pytest.raises(SourceError, match="cannot open"):
        load_price_csv(tmp_path / "nope.csv", "HB_WEST")


def test_replay_gives_only_settled_intervals_at_speed(tmp_path: Path) -> None:
    clock = FakeClock()
    series = load_price_csv(write(tmp_path, GOOD), "HB_WEST")
    start = datetime(2023, 9, 6, 20, 10, tzinfo=UTC)
    replay = CsvPriceReplay(series, start=start, speed=600, clock=clock)
    assert isinstance(replay, PriceSource)
    # 20:10: the 20:00 interval is still open: nothing has settled.
    with pytest.raises(SourceError, match="no interval has settled"):
        replay.latest_at(replay.sim_now_s())
    clock.t += 0.5  # ×600 → 5 simulated minutes: 20:15, the 20:00 interval settles
    reading = replay.latest_at(replay.sim_now_s())
    assert reading.value == 200.25
    assert reading.interval_start == datetime(2023, 9, 6, 20, tzinfo=UTC)
    assert reading.at == datetime(2023, 9, 6, 20, 15, tzinfo=UTC)
    clock.t += 1.4  # 20:29: the spike interval (20:15) is still running: not visible
    assert replay.latest_at(replay.sim_now_s()).value == 200.25
    clock.t += 0.2  # 20:31
    assert replay.latest_at(replay.sim_now_s()).value == 5333.97
    assert not replay.finished
    clock.t += 100
    assert replay.latest_at(replay.sim_now_s()).value == 41.0
    assert replay.finished
    replay.restart()  # from the start again, from now
    assert replay.sim_now() == start
    assert not replay.finished


async def test_replay_never_acts_on_a_rejected_row(tmp_path: Path) -> None:
    clock = FakeClock()
    rows = [*GOOD[:2], "2023-09-06T20:30:00Z,30,NaN", GOOD[3]]
    series = load_price_csv(write(tmp_path, rows), "HB_WEST", collect_errors=True)
    replay = CsvPriceReplay(
        series, start=datetime(2023, 9, 6, 20, 45, tzinfo=UTC), speed=1, clock=clock
    )
    # At 20:45 the rejected 20:30 interval has just settled: the error is raised, no value.
    with pytest.raises(BadRow, match="finite number") as info:
        await replay.latest()
    assert info.value.line == 4
    assert replay.rejected == series.rejected
    clock.t += 900  # 21:00: the next good interval settles and replaces it
    assert (await replay.latest()).value == 41.0


def test_settings_reject_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra"):
        CsvReplaySettings.model_validate({"path": "x.csv", "column": "HB_WEST", "colour": "red"})
    settings = CsvReplaySettings(path=write(tmp_path, GOOD), column="HB_WEST", speed=900)
    replay = CsvPriceReplay.from_settings(settings)
    assert replay.latest_at(replay.sim_now_s()).value == 200.25  # default start: first settled


@pytest.mark.shared_data
def test_real_ercot_year_loads_fast_and_replays(shared_data: Path) -> None:
    path = shared_data / "ercot" / "rtm_hub_prices_15min_2023.csv"
    t0 = time.perf_counter()
    series = load_price_csv(path, "HB_WEST")
    elapsed_s = time.perf_counter() - t0
    assert elapsed_s < 1.0, elapsed_s
    assert len(series) == 35040
    assert series.rejected == ()
    assert max(series.values) == pytest.approx(5333.97)
    negative = sum(v < 0 for v in series.values) / len(series)
    assert 0.05 < negative < 0.15  # about 9% per the data README
    # The causal view of the scarcity interval: at its start the price is not yet known.
    spike_i = series.values.index(max(series.values))
    spike_start = series.times_s[spike_i]
    assert series.last_settled_index(spike_start) == spike_i - 1
    assert series.last_settled_index(spike_start + 900) == spike_i


@pytest.mark.shared_data
def test_day_ahead_forecast_for_an_instant(shared_data: Path) -> None:
    series = load_day_ahead_csv(
        shared_data / "ercot" / "dam_prices_hourly_2022_2024.csv", "HB_WEST"
    )
    assert len(series) == 26304
    forecast = DayAheadForecast(series)
    hour = datetime(2023, 9, 6, 23, tzinfo=UTC)
    expected = series.values[series.times_s.index(hour.timestamp())]
    assert forecast.price_at(hour + timedelta(minutes=59)) == expected
    assert forecast.price_at(datetime(2030, 1, 1, tzinfo=UTC)) is None
    day = forecast.prices_between(hour, hour + timedelta(hours=3))
    assert [t for t, _ in day] == [hour + timedelta(hours=h) for h in range(3)]
    settings = DayAheadSettings(
        path=shared_data / "ercot" / "dam_prices_hourly_2022_2024.csv", column="LZ_WEST"
    )
    assert DayAheadForecast.from_settings(settings).price_at(hour) is not None
