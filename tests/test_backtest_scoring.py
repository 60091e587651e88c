"""Honest scoring: flex_capture, the profit breakdown, fair baselines, refusing unpriced 4CP,
and a real daily hashprice series."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.backtest.engine import (
    build_site,
    occupancy,
    run_strike,
    simple_market,
    strike_prices,
    strike_states,
)
from agent.backtest.runner import BacktestArgs, breakdown_usd, result_json, run_backtest, table
from agent.cli.main import main
from tests.test_backtest import site_config
from tests.test_backtest import write_inputs as backtest_inputs

START = datetime(2023, 9, 4, 5, tzinfo=UTC)


def write_inputs(tmp_path: Path, *, fourcp: bool = False) -> tuple[Path, Path]:
    """test_backtest's site (four 3 kW miners, one 8-GPU node, eight days of prices, high each
    evening), with 4CP enabled when asked."""
    cfg, prices = backtest_inputs(tmp_path)
    if fourcp:
        with cfg.open("a") as f:
            f.write("grid: {fourcp: {enabled: true, rate_usd_per_kw_year: 60}}\n")
    return cfg, prices


def write_load(path: Path, start: datetime, n: int) -> Path:
    """System load rows (interval ends), 15-minute steps, a gentle daily shape."""
    rows = [
        f"{(start + timedelta(minutes=15 * (i + 1))).strftime('%Y-%m-%dT%H:%M:%SZ')},"
        f"{10_000 + 500 * (i % 96 > 60):.1f}"
        for i in range(n)
    ]
    path.write_text("interval_end_utc,total_mwh\n" + "\n".join(rows) + "\n")
    return path


def test_flex_capture_and_breakdown_add_up(tmp_path: Path) -> None:
    cfg, prices = write_inputs(tmp_path)
    res = run_backtest(BacktestArgs(cfg, prices, "HB_WEST", hashprice=48.0))
    led = res.ledgers
    flex = res.flex_capture
    assert flex is not None
    on = led["always_on"].profit_usd
    assert flex == pytest.approx(
        (led["policy"].profit_usd - on) / (led["oracle"].profit_usd - on), rel=1e-12
    )
    assert flex < res.capture  # type: ignore[operator]  # the fixed AI revenue pads capture
    doc = result_json(res)
    assert doc["flex_capture"] == round(flex, 5)
    for name, part in doc.items():
        if isinstance(part, dict) and "breakdown_usd" in part:
            parts = part["breakdown_usd"]
            assert set(parts) == {
                "mining",
                "ai",
                "demand_response",
                "energy",
                "fourcp",
                "penalties",
                "switching",
            }
            assert sum(parts.values()) == pytest.approx(part["profit_usd"], abs=0.05), name
    assert sum(breakdown_usd(led["policy"]).values()) == pytest.approx(led["policy"].profit_usd)
    costs = doc["inputs"]["switching_costs"]
    assert costs["miner_models"]["M"] == {
        "wake_lost_s": 0.0,
        "wake_energy_wh": 0.0,
        "sleep_energy_wh": 0.0,
    }
    assert costs["ai"]["preemptible"]["checkpoint_interval_s"] == 1800.0
    text = table(res)
    assert "flex_capture" in text
    assert "strike+4cp" in text
    assert "switching" in text


def test_strike_follows_the_daily_hashprice() -> None:
    """At 48 $/PH/day the 3 kW / 100 TH/s miner breaks even at 66.67 $/MWh; at 24, 33.33.
    A settled price of 50 keeps mining on the first day and stops it on the second."""
    cfg = site_config()  # one 3 kW / 100 TH/s miner, no fee
    site = build_site(cfg, 1)
    market = simple_market([50.0] * 4, 48.0)
    market = type(market)(
        interval_s=market.interval_s,
        starts_s=market.starts_s,
        price_usd_per_mwh=market.price_usd_per_mwh,
        seen_price=market.seen_price,
        hashprice=(48.0, 48.0, 24.0, 24.0),
    )
    strikes = strike_prices(site, market)
    assert strikes[0] == pytest.approx(200 / 3)
    assert strikes[3] == pytest.approx(100 / 3)
    assert strike_states(market, strikes, 1) == [True, True, False, False]
    # A fixed strike from the first day's hashprice would have mined on.
    assert strike_states(market, strikes[0], 1) == [True] * 4


def test_strike_4cp_sits_out_flagged_intervals_and_keeps_jobs() -> None:
    cfg = site_config(
        gpu_nodes=[{"id": "g", "gpus": 8, "host_overhead_w": 1000}],
        grid={"fourcp": {"enabled": True, "risk_threshold": 0.5}},
    )
    site = build_site(cfg, 1)
    # risk 0.4 is below the threshold: only the interval at 0.9 is flagged.
    market = simple_market([10.0] * 4, 48.0, fourcp_risk=[0.0, 0.9, 0.4, 0.0])
    from agent.backtest.data import TraceJob
    from drivers.jobs.base import JobClass

    occ = occupancy(site, [TraceJob("s", JobClass.SLA, 8, 0, 0, 4)], len(market))
    plain = run_strike(site, market, occ, 66.0, 1)
    fair = run_strike(site, market, occ, 66.0, 1, sit_out_4cp=True)
    assert fair.name == "strike+4cp"
    assert plain.mining_w == [3000.0] * 4
    assert fair.mining_w == [3000.0, 20.0, 3000.0, 3000.0]
    # The SLA job runs at nameplate throughout, in both.
    assert fair.ai_w == plain.ai_w == [1000.0 + 8 * 700.0] * 4
    assert fair.interruptions == 0


def test_refuses_a_period_the_system_load_does_not_cover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, prices = write_inputs(tmp_path, fourcp=True)
    args = ["backtest", "--config", str(cfg), "--prices", str(prices), "--column", "HB_WEST"]
    # 4CP enabled and no system load at all: refused.
    assert main(args) == 1
    assert "no system load file is given" in capsys.readouterr().err
    # A file that ends a day early: refused, naming both spans.
    short = write_load(tmp_path / "load.csv", START, 96 * 7)
    out = tmp_path / "bt.json"
    assert main([*args, "--system-load", str(short), "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "system load covers 2023-09-04T05:00:00Z .. 2023-09-11T05:00:00Z" in err
    assert "not the period 2023-09-04T05:00:00Z .. 2023-09-12T05:00:00Z" in err
    assert "--no-4cp" in err
    assert not out.exists()
    # --no-4cp runs, and the JSON says 4CP was not priced.
    assert main([*args, "--system-load", str(short), "--no-4cp", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["inputs"]["no_4cp"] is True
    assert doc["inputs"]["fourcp_estimator"].startswith("off (--no-4cp)")
    assert doc["inputs"]["fourcp_peak_intervals"] == []
    # A file that covers the period runs.
    full = write_load(tmp_path / "full.csv", START, 96 * 8)
    assert main([*args, "--system-load", str(full), "--json", str(out)]) == 0
    inputs = json.loads(out.read_text())["inputs"]
    assert inputs["fourcp_estimator"] == "agent.control.fourcp.peak_risk"
    assert (inputs["fourcp_risk_threshold"], inputs["fourcp_hit_rate"]) == (0.5, 1.0)


@pytest.mark.shared_data
def test_real_daily_hashprice_series(shared_data: Path, tmp_path: Path) -> None:
    """The BTC file's hashprice column (not its second column, the BTC price), one per UTC day:
    2023-09-04 is 58.3472 $/PH/day in the file."""
    cfg, prices = write_inputs(tmp_path)
    btc = shared_data / "btc" / "btc_daily_2021_2024.csv"
    res = run_backtest(BacktestArgs(cfg, prices, "HB_WEST", hashprice_csv=btc))
    by_day = {}
    for line in btc.read_text().splitlines()[1:]:
        cols = line.split(",")
        by_day[cols[0]] = float(cols[3])
    first = res.market.hashprice[0]
    assert first == by_day["2023-09-04"]
    assert res.market.hashprice[-1] == by_day["2023-09-12"]
    assert len(set(res.market.hashprice)) == 9  # one value per UTC day touched
    doc = result_json(res)
    assert doc["inputs"]["hashprice_csv"] == str(btc)
    assert doc["inputs"]["strike_rule"] == "fleet breakeven at each interval's hashprice"


def test_hybrid_site_contests_the_interconnect() -> None:
    """configs/hybrid-site.yaml: GPUs at full cap are about 40 % of the interconnect, and
    miners at their top profiles plus the GPUs draw more than the site may."""
    from agent.control.config import load_config
    from agent.control.site import node_power_w, site_model

    root = Path(__file__).resolve().parent.parent
    model = site_model(load_config(root / "configs" / "hybrid-site.yaml"))
    gpu_w = sum(
        node_power_w(n.host_overhead_w, n.gpus, n.idle_w, n.gpus, n.max_cap_w) for n in model.nodes
    )
    miners_w = sum(model.ladders[m][-1].power_w * k for m, k in model.miners_by_model.items())
    interconnect_w = model.config.site.interconnect_limit_kw * 1000.0
    assert 0.35 <= gpu_w / interconnect_w <= 0.45
    assert miners_w + gpu_w > model.limit_w
    assert model.config.grid.fourcp.enabled
    assert {"sla", "preemptible", "filler"} <= set(model.config.ai.model_dump())
