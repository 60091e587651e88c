"""Backtest with a horizon: the constrained optimum by hand, day-ahead plans that change what the
policy does, and the optimum between every causal strategy and the relaxed oracle.

The site is test_backtest's one miner: 3,000 W / 100 TH/s (20 W asleep), hashprice 48, no pool
fee: 0.20 USD/h, 0.05 USD per 15-minute interval, worth 67.11 USD per MWh above standby. A wake
that loses ``s`` seconds of hashing costs 0.20 × s / 3600 USD.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backtest.engine import (
    Site,
    build_site,
    occupancy,
    run_oracle,
    run_policy,
    run_strike,
    simple_market,
)
from agent.backtest.horizon import DayAheadPlanner
from agent.backtest.optimum import run_optimum
from agent.backtest.runner import with_wake_lost_s
from agent.control.policy import decide
from tests.test_backtest import PRICES, T0, site_config, write_inputs


def wake_site(wake_lost_s: float) -> Site:
    """test_backtest's one miner, whose wake loses ``wake_lost_s`` of hashing."""
    return build_site(with_wake_lost_s(site_config(), wake_lost_s), 1)


def test_constrained_optimum_by_hand() -> None:
    site = wake_site(900)
    market = simple_market(PRICES, 48.0, start=T0)  # 10, 200, −20, 50
    occ = occupancy(site, [], len(market))
    # Sleeping through the 200 interval saves 0.15 − 0.05 − 0.001 = 0.099 USD.
    # A wake losing 15 minutes costs 0.05 USD: sleep, as the oracle does, and pay the wake.
    cheap = run_optimum(site, market, occ)
    assert cheap.mining_w == [3000, 20, 3000, 3000]
    assert cheap.wakes == 1
    assert cheap.switching_usd == pytest.approx(0.05, abs=1e-12)
    oracle = run_oracle(site, market, occ)
    assert cheap.profit_usd == pytest.approx(oracle.profit_usd - 0.05, abs=1e-12)
    # A wake losing an hour costs 0.20 USD, more than the rest of the day earns after the
    # spike (0.065 at −20, 0.0125 at 50): sleep at 200 and stay asleep (the day ends there).
    # 0.05 − 0.0075 in interval 0, then standby 20 W at 200, −20 and 50: 0.04135 USD, more
    # than riding through (always on, 0.02).
    dear = run_optimum(wake_site(3600), market, occ)
    assert dear.mining_w == [3000, 20, 20, 20]
    assert dear.wakes == 0
    assert dear.profit_usd == pytest.approx(0.05 - 0.0075 - 0.001 + 0.0001 - 0.00025, abs=1e-12)
    # With the spike at 110 instead, running all day earns 0.20 − 150 × 0.00075 = 0.0875,
    # sleeping from the spike on 0.0425 − 20 W × 140 × 0.25 / 1e6 = 0.0418: ride through.
    mild = simple_market([10.0, 110.0, -20.0, 50.0], 48.0, start=T0)
    ride = run_optimum(wake_site(3600), mild, occ)
    assert ride.mining_w == [3000, 3000, 3000, 3000]
    assert ride.profit_usd == pytest.approx(0.20 - (10 + 110 - 20 + 50) * 0.00075, abs=1e-12)


def test_day_ahead_plan_rides_through_a_real_time_spike() -> None:
    site = wake_site(600)
    rt = [10.0, 10.0, 100.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    market = replace(simple_market(rt, 48.0, start=T0), day_ahead=(10.0,) * len(rt))
    # The rule sees 100 at interval 3 (above 67.11) and sleeps, then wakes at 4 (10 USD/MWh is
    # below the 22.2 a wake that loses 600 of the 900 s it commits to leaves) and pays 0.0333.
    rule = run_policy(site, market, [], decide)
    # The day-ahead plan runs all day, so its band reaches 67.11 + 0.0333 / (0.00298 × 0.25)
    # = 111.9: the spike to 100 is ridden through.
    planner = DayAheadPlanner(site, market)
    planned = run_policy(site, market, [], decide, planner)
    assert rule.mining_w[3] == 20
    assert planned.mining_w[3] == 3000
    assert planned.wakes == rule.wakes - 1
    # Interval 3 at 10 USD/MWh: running earns 0.05 − 0.0075, sleeping costs 0.00005; one wake.
    assert planned.profit_usd - rule.profit_usd == pytest.approx(
        0.0425 + 0.00005 + 0.2 * 600 / 3600, abs=1e-9
    )
    assert planner.stats.statuses == {"optimal": 1}
    assert planner.plans[0].band("M", T0) is not None


def test_without_day_ahead_prices_the_planner_refuses() -> None:
    cfg = site_config()
    site = build_site(cfg, 1)
    with pytest.raises(ValueError, match="day-ahead"):
        DayAheadPlanner(site, simple_market(PRICES, 48.0))


def test_a_day_without_day_ahead_prices_has_no_plan() -> None:
    site = wake_site(900)
    market = replace(simple_market(PRICES, 48.0, start=T0), day_ahead=(None, 30.0, 30.0, 30.0))
    planner = DayAheadPlanner(site, market)
    assert planner(0, {"M": 1}, 0.0) is None
    assert planner.stats.statuses == {"no_day_ahead": 1}


@settings(max_examples=15, deadline=None)
@given(
    prices=st.lists(st.floats(-50, 400), min_size=4, max_size=40),
    wake_lost_s=st.sampled_from([0.0, 300.0, 900.0, 3600.0]),
)
def test_optimum_lies_between_every_causal_strategy_and_the_oracle(
    prices: list[float], wake_lost_s: float
) -> None:
    site = wake_site(wake_lost_s)
    market = simple_market(prices, 48.0, start=T0)
    occ = occupancy(site, [], len(market))
    optimum = run_optimum(site, market, occ)
    oracle = run_oracle(site, market, occ)
    policy = run_policy(site, market, [], decide)
    strike = run_strike(site, market, occ, site.fleet_breakeven_usd_per_mwh(48.0), 1)
    assert optimum.profit_usd <= oracle.profit_usd + 1e-9
    assert policy.profit_usd <= optimum.profit_usd + 1e-9
    assert strike.profit_usd <= optimum.profit_usd + 1e-9


def test_cli_day_ahead_planner_optimum_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.main import main

    cfg, _ = write_inputs(tmp_path)
    start = datetime(2023, 9, 4, 5, tzinfo=UTC)

    def dear(i: int) -> bool:  # the evening of every day, in 15-minute intervals
        return i % 96 > 70

    # Real time: the day-ahead shape, plus a one-interval spike to 80 each morning that the
    # day-ahead market did not see: above the miners' 66.7 + 5, inside the band (66.7 + 22.4:
    # a 5-minute wake of 0.2 USD/h over 2.98 kW for 15 minutes). The rule wakes at 20 USD/MWh
    # (a wake that loses 300 of the 900 s it commits to leaves 44.7, less the hysteresis).
    rt, da = tmp_path / "rt.csv", tmp_path / "da.csv"
    rt.write_text(
        "interval_start_utc,HB_WEST\n"
        + "\n".join(
            f"{(start + timedelta(minutes=15 * i)):%Y-%m-%dT%H:%M:%SZ},"
            f"{80.0 if i % 96 == 30 else 20 + 200 * dear(i):.2f}"
            for i in range(96 * 8)
        )
        + "\n"
    )
    da.write_text(
        "interval_start_utc,HB_WEST\n"
        + "\n".join(
            f"{(start + timedelta(hours=h)):%Y-%m-%dT%H:%M:%SZ},{20 + 200 * dear(4 * h):.2f}"
            for h in range(24 * 8)
        )
        + "\n"
    )
    common = ["backtest", "--config", str(cfg), "--prices", str(rt), "--column", "HB_WEST"]
    common += ["--hashprice", "48", "--day-ahead", str(da), "--wake-lost-s", "300"]
    out, rule_out, png = tmp_path / "plan.json", tmp_path / "rule.json", tmp_path / "w.png"
    assert main([*common, "--optimum", "--json", str(out), "--plot", "2023-W36",
                 "--plot-out", str(png)]) == 0  # fmt: skip
    assert main([*common, "--no-planner", "--json", str(rule_out)]) == 0
    text = capsys.readouterr().out
    assert "capture against the constrained optimum" in text
    assert "horizon planner: 9 day-ahead plans" in text
    doc, rule = json.loads(out.read_text()), json.loads(rule_out.read_text())
    assert doc["planner"]["statuses"] == {"optimal": 9}
    assert doc["optimum_solver"]["statuses"] == {"optimal": 9}
    assert doc["inputs"]["horizon_planner"] is True
    assert rule["inputs"]["horizon_planner"] is False
    assert "planner" not in rule
    # The plan rides through the morning spikes the rule sheds and pays a wake for.
    assert doc["policy"]["miner_wakes"] < rule["policy"]["miner_wakes"]
    assert doc["policy"]["profit_usd"] != rule["policy"]["profit_usd"]
    assert doc["optimum"]["profit_usd"] <= doc["oracle"]["profit_usd"]
    assert doc["capture_optimum"] == pytest.approx(
        doc["policy"]["profit_usd"] / doc["optimum"]["profit_usd"], abs=1e-4
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_persistent_spike_the_forecast_missed_is_re_planned_and_curtailed() -> None:
    site = wake_site(600)
    # Day-ahead 10 all day; real time 100 for hours 1 and 2 (inside the 67.1–111.9 band).
    rt = [10.0] * 4 + [100.0] * 8 + [10.0] * 4
    market = replace(simple_market(rt, 48.0, start=T0), day_ahead=(10.0,) * len(rt))
    planner = DayAheadPlanner(site, market)
    led = run_policy(site, market, [], decide, planner)
    # Interval 5 sees 100 but the daily plan's band holds the miner; at hour 2 (interval 8)
    # the settled 100 lies inside the band: re-planned with 100 for the hour, the MILP sleeps
    # it (33 USD/MWh × 2.98 kW × 1 h = 0.098 USD saved against a 0.033 USD cycle).
    assert led.mining_w[5:8] == [3000.0] * 3
    assert planner.stats.replans >= 1
    assert led.mining_w[8] == 20.0
    assert planner.plans[1].starts[0] == datetime.fromtimestamp(market.starts_s[8], tz=UTC)


def test_a_4cp_flag_re_plans_with_the_policys_priced_risk() -> None:
    # 4CP on, the estimator's risk calibrated by a hit rate of 1.25 %: a flag at risk 1 adds
    # 0.0125 × 60 × 1000 = 750 USD/MWh to the 15-minute interval, 187.5 to the hour holding it.
    cfg = site_config(
        grid={"fourcp": {"enabled": True, "rate_usd_per_kw_year": 60, "hit_rate": 0.0125}}
    )
    site = build_site(cfg, 1)
    rt = [10.0] * 16
    flags = [0.0] * 4 + [1.0] * 2 + [0.0] * 10
    market = replace(
        simple_market(rt, 48.0, start=T0, fourcp_risk=flags), day_ahead=(10.0,) * len(rt)
    )
    planner = DayAheadPlanner(site, market)
    led = run_policy(site, market, [], decide, planner)
    # The flag starts at interval 4 and ends at 6: two re-plans. The first prices the hour now
    # starting at 10 + 187.5 USD/MWh, above the miner's 66.7: the plan sleeps it for that hour.
    assert planner.stats.replans == 2
    flagged = planner.plans[1]
    assert flagged.starts[0] == datetime.fromtimestamp(market.starts_s[4], tz=UTC)
    assert flagged.bands[0][0].units_on == 0
    assert flagged.bands[1][0].units_on == 1
    # The policy prices the same risk: the miner sleeps through both flagged intervals.
    assert led.mining_w[4:6] == [20.0, 20.0]
    assert led.mining_w[7] == 3000.0
