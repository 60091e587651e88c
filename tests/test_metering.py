"""The cooling model, the load model, the meter trim (property-tested) and the policy at the meter.

The trim must converge to a constant residual, never overshoot it (so it cannot oscillate), stay
within its clamp, move at most ``max_step_w`` per update, and keep a noisy residual bounded.
The policy must keep the *modelled site power* (devices through the load model) under the limit.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.control.config import parse_config
from agent.control.cooling import (
    AmbientConfig,
    CoolingConfig,
    SiteLoadModel,
    cooling_fraction,
    cooling_w,
)
from agent.control.metering import MeterConfig, TrimParams, trim_step
from agent.control.policy import decide
from drivers.meters.maps import METER_MAPS
from drivers.meters.settings import METER_MAP_NAMES
from tests.test_policy import T0, config, miner, snapshot

gains = st.floats(min_value=0.01, max_value=1.0)
watts = st.floats(min_value=-50_000.0, max_value=50_000.0)


@given(
    residual=watts,
    start=watts,
    gain=gains,
    max_trim=st.floats(min_value=0.0, max_value=60_000.0),
    max_step=st.floats(min_value=100.0, max_value=60_000.0),
)
@settings(max_examples=400, deadline=None)
def test_trim_converges_monotonically_without_overshoot(
    residual: float, start: float, gain: float, max_trim: float, max_step: float
) -> None:
    params = TrimParams(gain, max_trim, max_step)
    target = min(max(residual, -max_trim), max_trim)
    trim = min(max(start, -max_trim), max_trim)
    previous_gap = abs(target - trim)
    side = math.copysign(1.0, target - trim) if target != trim else 0.0
    # Rate-limited steps to close the gap, then geometric convergence at the slowest gain.
    for _ in range(int(previous_gap / max_step) + 3000):
        nxt = trim_step(trim, residual, params)
        assert abs(nxt - trim) <= max_step + 1e-6, "one update moves at most max_step_w"
        assert -max_trim - 1e-9 <= nxt <= max_trim + 1e-9, "the clamp holds"
        gap = abs(target - nxt)
        assert gap <= previous_gap + 1e-6, "the gap never grows"
        # Never crosses the target (beyond floating-point rounding).
        if side and abs(target - nxt) > 1e-9 * max(1.0, abs(target)):
            assert math.copysign(1.0, target - nxt) == side, "never crosses the target"
        trim, previous_gap = nxt, gap
        if gap < 1e-3:
            break
    assert abs(trim - target) < 1.0, f"did not converge: {trim} vs {target}"


@given(
    base=st.floats(min_value=-20_000.0, max_value=20_000.0),
    noise=st.lists(st.floats(min_value=-500.0, max_value=500.0), min_size=50, max_size=200),
    gain=gains,
)
@settings(max_examples=200, deadline=None)
def test_trim_of_a_noisy_residual_stays_within_the_noise(
    base: float, noise: list[float], gain: float
) -> None:
    params = TrimParams(gain, 1e9, 1e9)
    trim = base  # settled
    for n in noise:
        trim = trim_step(trim, base + n, params)
        # A convex mix of values within ±500 of the base stays within ±500 of it.
        assert abs(trim - base) <= 500.0 + 1e-6


def test_trim_ignores_non_finite_residuals() -> None:
    params = TrimParams(0.5, 1000.0, 1000.0)
    assert trim_step(200.0, math.nan, params) == 200.0
    assert trim_step(200.0, math.inf, params) == 200.0
    assert trim_step(math.nan, 100.0, params) == 0.0


def test_cooling_model_is_a_clamped_linear_function_of_ambient() -> None:
    c = CoolingConfig(base_frac=0.04, per_degree_frac=0.004, reference_c=25, max_frac=0.2)
    assert cooling_fraction(c, 30.0) == pytest.approx(0.06)
    assert cooling_fraction(c, 40.0) == pytest.approx(0.10)
    assert cooling_fraction(c, 100.0) == 0.2  # clamped
    assert cooling_fraction(c, -20.0) == 0.0  # never negative
    assert cooling_fraction(c, None) == pytest.approx(0.04)  # unknown: the reference
    assert cooling_fraction(c, math.nan) == pytest.approx(0.04)
    assert cooling_w(c, 100_000.0, 30.0) == pytest.approx(6_000.0)
    with pytest.raises(ValidationError, match="min_frac"):
        CoolingConfig(min_frac=0.5, max_frac=0.1)


@given(
    frac=st.floats(min_value=0.0, max_value=1.0),
    fixed=st.floats(min_value=-5_000.0, max_value=50_000.0),
    limit=st.floats(min_value=0.0, max_value=1e8),
)
def test_load_model_budget_is_the_inverse_of_site_power(
    frac: float, fixed: float, limit: float
) -> None:
    model = SiteLoadModel(frac, fixed)
    budget = model.device_budget_w(limit)
    assert budget >= 0.0
    if budget > 0.0:
        assert model.site_w(budget) == pytest.approx(limit, rel=1e-9, abs=1e-6)
    else:
        assert model.site_w(0.0) >= limit - 1e-6


def test_policy_keeps_modelled_site_power_under_the_limit() -> None:
    # Ten 3.5 kW miners; limit 33 kW at the meter; cooling 6 % and 1 kW base load.
    miners = [miner(f"m{i}") for i in range(10)]
    cfg = config(limit_kw=33.0)
    bare = decide(snapshot(20.0, miners), cfg, T0)
    assert bare.planned_power_w <= 33_000
    assert bare.planned_power_w > 31_000  # nine at 3.5 kW
    load = SiteLoadModel(cooling_frac=0.06, fixed_w=1000.0, source="meter", trim_w=0.0)
    plan = decide(snapshot(20.0, miners, load_model=load), cfg, T0)
    running = sum(1 for p in plan.miner_points.values() if p != "sleep")
    devices_w = sum(
        next(pt.power_w for pt in miners[0].points if pt.name == p)
        for p in plan.miner_points.values()
    )
    assert plan.planned_power_w == pytest.approx(devices_w * 1.06 + 1000.0)
    assert plan.planned_power_w <= 33_000
    assert running < sum(1 for p in bare.miner_points.values() if p != "sleep")


def test_policy_says_when_it_plans_without_the_meter() -> None:
    load = SiteLoadModel(cooling_frac=0.05, fixed_w=2000.0, source="fallback")
    plan = decide(snapshot(20.0, [miner("m1")], load_model=load), config(limit_kw=50.0), T0)
    assert "meter not trusted: planning on devices + cooling + 2.0 kW" in plan.summary


def test_meter_config_keys_are_checked() -> None:
    base = {
        "site": {"id": "s", "interconnect_limit_kw": 10},
        "prices": {"realtime": {"type": "constant", "value": 10}},
    }
    cfg = parse_config(
        {
            **base,
            "meter": {"host": "127.0.0.1", "port": 1502, "fallback_margin_kw": 50},
            "cooling": {"base_frac": 0.05},
            "ambient": {"source": "meter"},
        }
    )
    assert isinstance(cfg.meter, MeterConfig)
    assert cfg.meter.fallback_margin_kw == 50
    cases: list[tuple[dict[str, Any], str]] = [
        ({"meter": {"host": "127.0.0.1", "map": "dlms"}}, "unknown meter map 'dlms'"),
        ({"meter": {"host": "127.0.0.1", "trim_gain": 1.5}}, "trim_gain"),
        ({"meter": {"host": "127.0.0.1", "colour": 1}}, "colour"),
        ({"ambient": {"source": "meter"}}, "needs a meter"),
        ({"ambient": {"source": "http_json"}}, "needs ambient.feed"),
        ({"cooling": {"base_frac": -1}}, "base_frac"),
        # Hostile numbers: a boolean, text, or a non-finite value is refused, never coerced.
        ({"meter": {"host": "127.0.0.1", "poll_s": True}}, "poll_s: expected a number, got a b"),
        ({"meter": {"host": "127.0.0.1", "port": "502"}}, "port: expected a number, got text"),
        ({"cooling": {"base_frac": float("nan")}}, "base_frac: Input should be a finite number"),
        ({"thermal": {"miner": {"max_c": True, "resume_c": 90}}}, "max_c: expected a number"),
        ({"ambient": {"max_age_s": float("inf")}}, "max_age_s: Input should be a finite number"),
    ]
    for bad, message in cases:
        with pytest.raises(Exception, match=message):
            parse_config({**base, **bad})
    assert AmbientConfig().source == "constant"


def test_map_names_in_config_match_the_driver_registry() -> None:
    assert set(METER_MAP_NAMES) == set(METER_MAPS)


def test_backtest_pays_for_cooling_and_keeps_the_metered_load_under_the_limit() -> None:
    from agent.backtest.engine import build_site, run_policy, simple_market
    from tests.test_backtest import PRICES
    from tests.test_backtest import T0 as BT0
    from tests.test_backtest import site_config as bt_site

    market = simple_market(PRICES, 48.0, start=BT0)
    plain = run_policy(build_site(bt_site(), 1), market, [], decide)
    cooled_cfg = bt_site(cooling={"base_frac": 0.1})
    cooled = run_policy(build_site(cooled_cfg, 1), market, [], decide)
    # The same decisions at these prices (10 and −20 are far below the 60.6 $/MWh breakeven
    # with cooling), but every device watt brings 10 % more at the meter, and it is paid.
    assert cooled.mining_w == plain.mining_w == [20, 3000, 20, 3000]
    assert cooled.energy_mwh == pytest.approx(plain.energy_mwh * 1.1)
    assert cooled.energy_cost_usd == pytest.approx(plain.energy_cost_usd * 1.1)
    # A 3.2 kW interconnect: 3,000 W of miner is 3,300 W at the meter, so it never runs.
    tight = bt_site(cooling={"base_frac": 0.1}, site={"id": "t", "interconnect_limit_kw": 3.2})
    capped = run_policy(build_site(tight, 1), market, [], decide)
    assert capped.mining_w == [20, 20, 20, 20]
