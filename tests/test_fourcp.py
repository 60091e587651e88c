"""4CP: the system-load replay and the pure peak estimator, checked on the real 2023 peaks."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.control.fourcp import CENTRAL, peak_risk
from drivers.prices.csv_replay import BadRow
from drivers.prices.system_load import (
    SystemLoadReplay,
    SystemLoadSettings,
    load_system_load_csv,
    month_history,
)

# Interval-ending Central times of the 2023 monthly peaks by this proxy (data README).
PEAKS_2023 = ["2023-06-27 17:00", "2023-07-31 17:00", "2023-08-10 17:00", "2023-09-08 16:45"]


def central(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=CENTRAL)


def day_curve(day: datetime, peak_mw: float) -> tuple[list[float], list[datetime]]:
    """A synthetic day of 15-minute loads rising to ``peak_mw`` at 17:00 Central."""
    times = [day + timedelta(minutes=15 * (k + 1)) for k in range(96)]
    loads = [peak_mw - abs((t.hour + t.minute / 60) - 17.0) * 2000 for t in times]
    return loads, times


def test_zero_outside_season_and_window() -> None:
    loads, times = day_curve(datetime(2023, 5, 10, tzinfo=CENTRAL), 70000)
    a = peak_risk(loads, times, datetime(2023, 5, 10, 16, 45, tzinfo=CENTRAL))
    assert a.risk == 0.0
    assert "May" in a.reason
    loads, times = day_curve(datetime(2023, 7, 10, tzinfo=CENTRAL), 80000)
    a = peak_risk(loads, times, datetime(2023, 7, 10, 11, 0, tzinfo=CENTRAL))
    assert a.risk == 0.0
    assert "outside the peak window" in a.reason


def test_rising_new_high_is_flagged_and_falling_is_not() -> None:
    day1, times1 = day_curve(datetime(2023, 7, 10, tzinfo=CENTRAL), 80000)
    day2, times2 = day_curve(datetime(2023, 7, 11, tzinfo=CENTRAL), 81000)
    loads, times = day1 + day2, times1 + times2
    rising = peak_risk(loads, times, datetime(2023, 7, 11, 16, 45, tzinfo=CENTRAL))
    assert rising.risk == 1.0
    assert rising.running_max_mw == 81000 - 0.25 * 2000  # the 16:45 load, the month's new max
    assert "rising" in rising.reason
    falling = peak_risk(loads, times, datetime(2023, 7, 11, 18, 0, tzinfo=CENTRAL))
    assert falling.risk < 0.5
    assert "falling" in falling.reason
    # A cooler day far below the month's max is no risk.
    cool, ctimes = day_curve(datetime(2023, 7, 12, tzinfo=CENTRAL), 70000)
    a = peak_risk(loads + cool, times + ctimes, datetime(2023, 7, 12, 16, 45, tzinfo=CENTRAL))
    assert a.risk == 0.0


def test_prior_peak_expectation_lowers_early_month_risk() -> None:
    loads, times = day_curve(datetime(2023, 8, 1, tzinfo=CENTRAL), 75000)
    now = datetime(2023, 8, 1, 16, 45, tzinfo=CENTRAL)
    assert peak_risk(loads, times, now).risk == 1.0  # the first day always sets a new max
    a = peak_risk(loads, times, now, prior_peak_mw=84000)
    assert a.risk == 0.0
    assert "expected peak" in a.reason


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="loads but"):
        peak_risk([1.0], [], datetime(2023, 7, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        peak_risk([], [], datetime(2023, 7, 1))


def test_bad_load_rows_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "gen.csv"
    path.write_text(
        "interval_end_utc,total_mwh\n"
        "2023-07-01T05:15:00Z,10000\n"
        "2023-07-01T05:30:00Z,NaN\n"
        "2023-07-01T05:45:00Z,10100\n"
    )
    with pytest.raises(BadRow, match=r"gen.csv:3: column 'total_mwh': expected a finite number"):
        load_system_load_csv(path)
    series = load_system_load_csv(path, collect_errors=True)
    assert series.values == (40000.0, 40400.0)
    assert [r.line for r in series.rejected] == [3]
    # Rows are stamped with interval ENDS: 05:20 lies in the interval ending 05:30 (rejected).
    t = datetime(2023, 7, 1, 5, 5, tzinfo=UTC).timestamp()
    assert series.value_for_interval_containing(t) == 40000.0
    assert series.value_for_interval_containing(t + 15 * 60) is None
    assert series.value_for_interval_containing(t + 30 * 60) == 40400.0
    assert series.last_settled_index(t + 25 * 60) == 0


@pytest.fixture(scope="module")
def load_2023(shared_data: Path) -> tuple[tuple[float, ...], tuple[datetime, ...]]:
    series = load_system_load_csv(shared_data / "ercot" / "generation_by_fuel_15min_2023.csv")
    assert series.rejected == ()
    times = tuple(datetime.fromtimestamp(t, tz=UTC) for t in series.times_s)
    return series.values, times


@pytest.mark.shared_data
@pytest.mark.parametrize("peak", PEAKS_2023)
def test_flags_the_real_2023_monthly_peaks(
    load_2023: tuple[tuple[float, ...], tuple[datetime, ...]], peak: str
) -> None:
    loads, times = load_2023
    end = central(peak)
    # Causal: at the START of the peak interval, only intervals ended by then are known.
    a = peak_risk(loads, times, end - timedelta(minutes=15))
    assert a.risk >= 0.5, a.reason
    # And it is the month's true maximum in the data (the README's claim, checked).
    i = times.index(end.astimezone(UTC))
    month = [
        v for v, t in zip(loads, times, strict=True) if t.astimezone(CENTRAL).month == end.month
    ]
    assert loads[i] == max(month)


@pytest.mark.shared_data
def test_flags_only_a_modest_number_of_hours_per_month(
    load_2023: tuple[tuple[float, ...], tuple[datetime, ...]],
) -> None:
    loads, times = load_2023
    flagged_h: Counter[int] = Counter()
    for t in times:
        month = t.astimezone(CENTRAL).month
        if month in (6, 7, 8, 9) and peak_risk(loads, times, t).risk >= 0.5:
            flagged_h[month] += 0.25
    print("4CP hours flagged per month (risk >= 0.5):", dict(flagged_h))
    for month in (6, 7, 8, 9):
        assert 1 <= flagged_h[month] <= 30, (month, flagged_h[month])


@pytest.mark.shared_data
def test_replay_hands_out_the_causal_month(shared_data: Path) -> None:
    ticks = [0.0]
    settings = SystemLoadSettings(
        path=shared_data / "ercot" / "generation_by_fuel_15min_2023.csv",
        start=central("2023-08-10 16:45"),
        speed=900,
    )
    replay = SystemLoadReplay.from_settings(settings, clock=lambda: ticks[0])
    history = replay.month_history()
    assert history.times[0] == central("2023-08-01 00:15")
    assert history.times[-1] == central("2023-08-10 16:45")
    assert peak_risk(history.loads_mw, history.times, history.now).risk >= 0.5
    ticks[0] = 1.0  # 15 simulated minutes later the peak interval has settled
    assert replay.month_history().loads_mw[-1] == pytest.approx(84812.884)
    # The interval ending at midnight on the 1st belongs to the month before.
    assert month_history(replay.series, central("2023-09-01 00:00")).times == ()
    august = month_history(replay.series, central("2023-08-31 23:45"))
    assert len(august.times) == 31 * 96 - 1


@pytest.mark.shared_data
def test_last_months_peak_as_prior_flags_fewer_hours_and_still_the_peaks(
    load_2023: tuple[tuple[float, ...], tuple[datetime, ...]],
) -> None:
    loads, times = load_2023
    month_max: dict[int, float] = {}
    for v, t in zip(loads, times, strict=True):
        m = t.astimezone(CENTRAL).month
        month_max[m] = max(month_max.get(m, 0.0), v)
    plain_h: Counter[int] = Counter()
    prior_h: Counter[int] = Counter()
    for t in times:
        m = t.astimezone(CENTRAL).month
        if m not in (6, 7, 8, 9):
            continue
        plain_h[m] += 0.25 * (peak_risk(loads, times, t).risk >= 0.5)
        prior_h[m] += 0.25 * (
            peak_risk(loads, times, t, prior_peak_mw=month_max[m - 1]).risk >= 0.5
        )
    print("4CP hours flagged with last month's peak as prior:", dict(prior_h))
    assert sum(prior_h.values()) < sum(plain_h.values())
    for peak in PEAKS_2023:
        end = central(peak)
        prior = month_max[end.month - 1]
        assert peak_risk(loads, times, end - timedelta(minutes=15), prior_peak_mw=prior).risk >= 0.5
