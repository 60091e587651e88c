"""The live horizon: the coordinator plans from the day-ahead file off the event loop, hands the
plan to every snapshot, re-plans only when the hour or the forecast changes, the loop publishes
the solve time and status (exported in ``/metrics``), and a failed solve drops the plan (the rule
alone) with a logged reason."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.control.config import parse_config
from agent.outputs.metrics import build_registry
from agent.runtime.coordinator import Coordinator
from agent.runtime.loop import Agent, Components
from agent.runtime.miner_fleet import MinerFleet
from agent.runtime.state import AgentState
from drivers.prices.base import PriceReading
from drivers.prices.csv_replay import DayAheadForecast, load_day_ahead_csv

NOW = datetime(2023, 8, 1, 12, 20, tzinfo=UTC)


def config(**extra: Any) -> Any:
    return parse_config(
        {
            **extra,
            "site": {"id": "t", "interconnect_limit_kw": 1000},
            # The model sets no wake loss of its own: the site default applies.
            "control": {"min_on_s": 0, "min_off_s": 0, "miner_wake_lost_s": 600},
            "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 48}},
            "prices": {"realtime": {"type": "constant", "value": 0}},
            "miner_models": {
                "M": {
                    "standby_w": 20,
                    "profiles": [{"name": "run", "power_w": 3000, "hashrate_ths": 100}],
                }
            },
            "miners": [{"id": "m", "address": "10.1.0.1", "model": "M", "count": 4}],
        }
    )


def day_ahead(tmp_path: Path, prices: list[float]) -> DayAheadForecast:
    start = NOW.replace(minute=0)
    rows = [
        f"{(start + timedelta(hours=k)).strftime('%Y-%m-%dT%H:%M:%SZ')},{p}"
        for k, p in enumerate(prices)
    ]
    path = tmp_path / "dam.csv"
    path.write_text("interval_start_utc,HB_WEST\n" + "\n".join(rows) + "\n")
    return DayAheadForecast(load_day_ahead_csv(path, "HB_WEST"))


def coordinator(
    tmp_path: Path, prices: list[float], cfg: Any = None
) -> tuple[Coordinator, AgentState, Agent]:
    """The real agent's coordinator over the configured miners (no drivers: nothing is polled,
    so every miner is as configured, awake at its top profile), with its published state."""
    cfg = config() if cfg is None else cfg
    fleet = MinerFleet(cfg, {}, clock=lambda: NOW)
    components = Components(
        fleets=[fleet], price_source=None, day_ahead=day_ahead(tmp_path, prices)
    )
    state = AgentState(site_id="t", started_at=NOW)
    agent = Agent(cfg, components, state=state, clock=lambda: NOW)
    return agent.coordinator, state, agent


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


async def test_the_plan_reaches_the_snapshot_and_metrics(tmp_path: Path) -> None:
    # 66.7 USD/MWh is the miners' value: run in the cheap hours, sleep in the dear one.
    coord, state, agent = coordinator(tmp_path, [30.0, 30.0, 500.0, 30.0] + [30.0] * 40)
    assert coord.snapshot().horizon is None  # nothing planned yet
    await coord.refresh_horizon()
    agent.publish()  # what the loop does after every poll
    plan = coord.snapshot().horizon
    assert plan is not None
    assert plan.status.value == "optimal"
    assert len(plan.starts) == 36  # 36 h ahead of the current hour, no more
    assert [row[0].units_on for row in plan.bands[:4]] == [4, 4, 0, 4]
    # A wake loses 600 s of 0.2 USD/h (control.miner_wake_lost_s): 0.0333 USD per unit, over
    # 2.98 kW for a 15-minute spike: 44.7 USD/MWh above the 67.1 value.
    band = plan.band("M", NOW)
    assert band is not None
    assert band.restore_below_usd_per_mwh == pytest.approx(67.114, abs=1e-3)
    assert band.curtail_above_usd_per_mwh == pytest.approx(67.114 + 44.743, abs=1e-3)
    reg = build_registry(state, config(), clock=lambda: NOW)
    solve_s = sample(reg, "site_planner_solve_seconds")
    assert solve_s is not None
    assert 0 < solve_s < 30
    assert sample(reg, "site_planner_status", status="optimal") == 1.0
    assert sample(reg, "site_planner_status", status="failed") == 0.0
    # The same hour and forecast: no new solve (the same plan object stays).
    await coord.refresh_horizon()
    assert coord.snapshot().horizon is plan


async def test_a_refused_forecast_drops_the_plan_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coord, state, agent = coordinator(tmp_path, [30.0, 2e6, 30.0])
    with caplog.at_level(logging.WARNING, logger="agent.runtime.coordinator"):
        await coord.refresh_horizon()
    agent.publish()
    assert coord.snapshot().horizon is None
    assert state.planner_status == "bad_input"
    assert "outside ±1e+06" in state.planner_reason
    assert any("fell back to the rule" in r.getMessage() for r in caplog.records)
    reg = build_registry(state, config(), clock=lambda: NOW)
    assert sample(reg, "site_planner_status", status="bad_input") == 1.0


def test_the_horizon_plans_the_device_power_that_fits_at_the_meter(tmp_path: Path) -> None:
    # Cooling draws 25 % of the IT load and the offices 100 kW: of the 1,000 kW interconnect
    # (less the safety margin), the devices may use (limit - 100 kW) / 1.25.
    cfg = config(cooling={"base_frac": 0.25, "base_load_kw": 100})
    coord, _state, _agent = coordinator(tmp_path, [30.0] * 36, cfg)
    inp = coord.horizon_input()
    assert inp is not None
    site_limit_w = (1000 - cfg.site.safety_margin_kw) * 1000.0
    assert inp.limit_w == pytest.approx((site_limit_w - 100_000.0) / 1.25)
    plain, _state, _agent = coordinator(tmp_path, [30.0] * 36)
    plain_inp = plain.horizon_input()
    assert plain_inp is not None
    assert plain_inp.limit_w == pytest.approx(site_limit_w)


async def test_no_day_ahead_no_plan(tmp_path: Path) -> None:
    coord, state, agent = coordinator(tmp_path, [30.0])
    coord.day_ahead = None
    await coord.refresh_horizon()
    agent.publish()
    assert coord.snapshot().horizon is None
    assert state.planner_status is None
    reg = build_registry(state, config(), clock=lambda: NOW)
    assert sample(reg, "site_planner_solve_seconds") is None


async def test_a_fresh_real_time_price_re_plans_the_hour_now_running(tmp_path: Path) -> None:
    coord, _, _ = coordinator(tmp_path, [30.0] * 40)
    await coord.refresh_horizon()
    first = coord.snapshot().horizon
    assert first is not None
    assert first.bands[0][0].units_on == 4
    # Real time settles at 500 in this hour: a new plan, which sleeps the miners now.
    coord.price = PriceReading("rt", NOW.replace(minute=0), 900.0, 500.0, NOW)
    coord.price_read_at = coord.monotonic()
    await coord.refresh_horizon()
    second = coord.snapshot().horizon
    assert second is not None
    assert second is not first
    assert second.bands[0][0].units_on == 0
    assert second.bands[1][0].units_on == 4


async def test_a_planner_that_raises_never_stops_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Last resort: plan_horizon catches its own solver errors, so only a patched one can raise
    # past it; the coordinator must still keep the loop alive and fall back to the rule.
    import agent.runtime.coordinator as coordinator_module

    def broken(_: object) -> None:
        raise MemoryError("no room for the MILP")

    coord, state, agent = coordinator(tmp_path, [30.0] * 40)
    monkeypatch.setattr(coordinator_module, "plan_horizon", broken)
    with caplog.at_level(logging.WARNING, logger="agent.runtime.coordinator"):
        await coord.refresh_horizon()
    agent.publish()
    assert coord.snapshot().horizon is None
    assert state.planner_status == "failed"
    assert state.planner_reason == "planner raised MemoryError: no room for the MILP"
    assert any("fell back to the rule" in r.getMessage() for r in caplog.records)
