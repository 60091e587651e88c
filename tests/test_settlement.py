"""One settlement and one site model: the policy, the event report and the backtest agree.

An event that carries both a site cap (``max_site_kw``) and a shed amount (``shed_kw``) used to
be read two ways: the policy planned to the stricter one, the journal's report settled against
the cap. Now both, and the backtest, read :func:`agent.control.settlement.event_target_w`:
the stricter target binds.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.backtest.engine import build_site, occupancy, run_policy, simple_market, with_events
from agent.control.config import parse_config
from agent.control.domain import ActiveEvent, MinerView, OperatingPoint, PriceView, Snapshot
from agent.control.policy import decide
from agent.control.settlement import (
    FourCpInterval,
    Ledger,
    event_target_w,
    fourcp_adder_usd_per_mwh,
    fourcp_charge_usd,
    fourcp_figures,
)
from agent.control.site import RampBudget, ramp_capacity_w, site_model
from agent.journal.store import Store
from drivers.grid.base import FailDirection, GridEvent, ProgramKind

T0 = datetime(2023, 7, 1, 18, 0, tzinfo=UTC)


def both_event(**kw: Any) -> GridEvent:
    """Cap 1,000 kW and shed 600 kW: from a 1,500 kW baseline the shed asks for 900 kW."""
    fields: dict[str, Any] = {
        "event_id": "ev-both",
        "source": "openadr",
        "program": "ercot-ers",
        "kind": ProgramKind.EMERGENCY,
        "start": T0,
        "end": T0 + timedelta(hours=1),
        "max_site_kw": 1000.0,
        "shed_kw": 600.0,
        "payment_usd_per_mwh": 100.0,
        "penalty_usd_per_mwh": 1000.0,
        "fail": FailDirection.CURTAIL,
    }
    fields.update(kw)
    return GridEvent(**fields)


def test_event_target_strictest_wins() -> None:
    ev = both_event()
    assert event_target_w(ev, 1_500_000.0) == 900_000.0  # the shed is stricter here
    assert event_target_w(ev, 3_000_000.0) == 1_000_000.0  # the cap is stricter here
    assert event_target_w(both_event(max_site_kw=None), 400_000.0) == 0.0  # never negative
    assert event_target_w(both_event(max_site_kw=None, shed_kw=None), 1e6) is None


def config(**over: Any) -> Any:
    """20 miners of 100 kW (a block of one each), no dwell, no hysteresis, no margin."""
    data: dict[str, Any] = {
        "site": {"id": "t", "interconnect_limit_kw": 5000, "ramp_up_kw_per_min": 100},
        "control": {"hysteresis_usd_per_mwh": 0, "min_on_s": 0, "min_off_s": 0},
        "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 48}},
        "prices": {"realtime": {"type": "constant", "value": 0}},
        "miner_models": {
            "M": {
                "standby_w": 0,
                "profiles": [{"name": "run", "power_w": 100_000, "hashrate_ths": 5000}],
            }
        },
        "miners": [{"id": "m", "address": "10.1.0.1", "model": "M", "count": 20}],
    }
    data.update(over)
    return parse_config(data)


def test_policy_plans_to_the_strictest_target() -> None:
    cfg = config()
    points = (OperatingPoint("sleep", 0.0), OperatingPoint("run", 100_000.0, 5000.0))
    miners = tuple(
        MinerView(f"m{i:02d}", "M", points, 100_000.0, "run", T0 - timedelta(days=1), 100_000.0)
        for i in range(15)
    )
    snap = Snapshot(
        at=T0,
        price=PriceView(10.0, T0, 0.0),
        hashprice_usd_per_ph_day=48.0,
        miners=miners,
        events=(ActiveEvent(both_event(), 1_500_000.0),),
    )
    plan = decide(snap, cfg, T0)
    assert plan.limit_w == 900_000.0
    assert sum(1 for p in plan.miner_points.values() if p == "run") == 9


async def test_event_report_settles_against_the_strictest_target(tmp_path: Path) -> None:
    """Baseline 1,500 kW, target 900 kW (the shed), one 15-minute interval measured 1,000 kW:
    shortfall 100 kW × 0.25 h = 0.025 MWh → 25.00 USD penalty; delivered 500 kW × 0.25 h =
    0.125 MWh → 12.50 USD. Reading the cap alone would have found no shortfall."""
    async with Store.open(tmp_path / "j.db") as store:
        await store.upsert_event(both_event(), baseline_w=1_500_000)
        await store.record_compliance("ev-both", T0, 900_000, 1_000_000)
        (rep,) = await store.event_report()
    assert rep.target_w == 900_000.0
    assert (rep.shortfall_mwh, rep.delivered_mwh) == (0.025, 0.125)
    assert (rep.payment_usd, rep.penalty_usd) == (12.5, 25.0)
    # The backtest's ledger books the same interval the same way.
    led = Ledger("x")
    led.settle(0.25, 0.0, 1_000_000.0, 0.0, 0.0, 0.0, events=[(both_event(), 1_500_000.0)])
    assert led.dr_penalty_usd == pytest.approx(25.0)
    assert led.demand_response_usd == pytest.approx(12.5)


def test_backtest_policy_meets_the_strictest_target() -> None:
    """The full site draws 20 × 100 kW = 2,000 kW from the second interval (the first has no
    price yet). An event from the third interval: shed 600 kW asks for 1,400 kW, stricter than
    the 1,500 kW cap, so the policy runs 14 miners and pays no penalty."""
    cfg = config(site={"id": "t", "interconnect_limit_kw": 5000, "ramp_up_kw_per_min": 1000})
    site = build_site(cfg, 1)
    market = simple_market([10.0] * 5, 48.0, start=T0)
    occ = occupancy(site, [], len(market))
    ev = both_event(
        max_site_kw=1500.0, start=T0 + timedelta(minutes=30), end=T0 + timedelta(minutes=75)
    )
    market = with_events(market, [ev], site, occ)
    led = run_policy(site, market, [], decide)
    assert led.mining_w[1:] == [2_000_000.0] + [1_400_000.0] * 3
    assert led.dr_penalty_usd == 0.0
    # delivered (2,000 − 1,400) kW × 0.75 h = 0.45 MWh × 100 USD
    assert led.demand_response_usd == pytest.approx(45.0)


def test_ramp_budget_is_a_token_bucket() -> None:
    """100 kW/min: 1,666.67 W/s. Live cycles of 15 s hold at most 25 kW (or the biggest step);
    the backtest's 15-minute steps hold 1.5 MW."""
    cfg = config()
    assert ramp_capacity_w(cfg, 15.0) == pytest.approx(25_000.0)
    assert ramp_capacity_w(cfg, 15.0, biggest_step_w=100_000.0) == 100_000.0
    bucket = RampBudget.of(cfg)
    cap = ramp_capacity_w(cfg, 900.0)
    assert bucket.headroom_w(0.0, cap) == pytest.approx(1_500_000.0)  # starts full
    bucket.spend(1_200_000.0)
    bucket.spend(-5.0)  # a shed adds nothing back
    assert bucket.headroom_w(0.0, cap) == pytest.approx(300_000.0)
    assert bucket.headroom_w(60.0, cap) == pytest.approx(400_000.0)  # one minute refills 100 kW
    assert bucket.headroom_w(10_000.0, cap) == pytest.approx(1_500_000.0)  # never above the cap


def test_fourcp_adder_is_the_true_peak_charge_times_risk() -> None:
    """60 USD/kW-year: a true peak costs 15 USD/kW; over 1 kW × 0.25 h that is 60,000 USD/MWh."""
    assert fourcp_adder_usd_per_mwh(60.0) == 60_000.0
    assert fourcp_adder_usd_per_mwh(60.0, 0.5) == 30_000.0
    assert fourcp_adder_usd_per_mwh(60.0, 2.0) == 60_000.0  # risk is a probability
    assert site_model(config()).limit_w == 5_000_000.0


def test_live_4cp_figures_book_each_months_peak_interval_at_the_ledgers_rule() -> None:
    rate = 60.0
    # 2023-06-27 21:45 UTC is 16:45 Central (June); 2023-07-01 04:30 UTC is still June 30th.
    june_a = FourCpInterval(datetime(2023, 6, 27, 21, 45, tzinfo=UTC), 20_000 * 900, 900, 900, 1)
    june_b = FourCpInterval(datetime(2023, 7, 1, 4, 30, tzinfo=UTC), 24_000 * 450, 450, 0, 0.6)
    july = FourCpInterval(datetime(2023, 7, 20, 21, 0, tzinfo=UTC), 10_000 * 900, 900, 450, 0.7)
    figures = fourcp_figures([june_a, july, june_b], rate)
    assert [m.month for m in figures.months] == ["2023-06", "2023-07"]
    june, jul = figures.months
    assert june.peak == june_b
    assert june.intervals == 2
    assert june.peak.source == "fallback"
    assert jul.peak.source == "mixed"
    assert june_a.source == "meter"
    # The Ledger books a true peak interval at the same rule: rate / 4 per kW.
    ledger = Ledger("x", fourcp_rate_usd_per_kw_year=rate)
    ledger.settle(0.25, 0.0, 24_000, 0.0, 0.0, 0.0, peak=True)
    assert june.charge_usd == pytest.approx(ledger.fourcp_cost_usd) == pytest.approx(360.0)
    assert jul.charge_usd == pytest.approx(fourcp_charge_usd(rate, 10_000)) == 150.0
    assert figures.seasons == (("2023", pytest.approx(510.0)),)
    assert figures.latest == july


async def test_4cp_intervals_survive_in_the_journal_and_a_bad_row_is_quarantined(
    tmp_path: Path,
) -> None:
    at = datetime(2023, 6, 27, 21, 45, tzinfo=UTC)
    async with Store.open(tmp_path / "j.db") as store:
        await store.record_fourcp(FourCpInterval(at, 1000.0, 10.0, 5.0, 0.8))
        await store.record_fourcp(FourCpInterval(at, 3000.0, 20.0, 15.0, 0.9))  # upsert
        await store.record_fourcp(FourCpInterval(at + timedelta(minutes=15), 1.0, 1.0, 1.0, 1.0))
        with pytest.raises(ValueError, match="watt_seconds"):
            await store.record_fourcp(FourCpInterval(at, float("nan"), 1.0, 1.0, 1.0))
    # An edited row (more metered seconds than seconds) is set aside, never trusted.
    conn = sqlite3.connect(tmp_path / "j.db")
    conn.execute("UPDATE fourcp SET metered_s = 99 WHERE interval_start LIKE '%22:00%'")
    conn.commit()
    conn.close()
    async with Store.open(tmp_path / "j.db") as store:
        assert await store.fourcp_intervals() == [FourCpInterval(at, 3000.0, 20.0, 15.0, 0.9)]
        (bad,) = await store.quarantined()
        assert bad.kind == "fourcp"
        assert "metered seconds" in bad.reason
        assert await store.fourcp_intervals() == [FourCpInterval(at, 3000.0, 20.0, 15.0, 0.9)]
