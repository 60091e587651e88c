"""Money formulas against the worked examples in economics.md."""

from __future__ import annotations

import itertools

import pytest

from agent.control.economics import (
    ai_revenue_usd_per_h,
    breakeven_usd_per_mwh,
    energy_cost_usd_per_h,
    gpu_throughput_fraction,
    mining_revenue_usd_per_h,
    value_density_usd_per_mwh,
)


@pytest.mark.parametrize(
    ("hashprice", "j_per_th", "expected"),
    [
        (55.0, 29.5, 77.7),  # S19j Pro (economics.md)
        (55.0, 17.5, 131.0),  # S21
        (35.0, 29.5, 49.4),  # the 2025 low
        (35.0, 17.5, 83.3),
    ],
)
def test_breakeven_examples(hashprice: float, j_per_th: float, expected: float) -> None:
    assert breakeven_usd_per_mwh(hashprice, 0.0, j_per_th) == pytest.approx(expected, abs=0.1)


def test_breakeven_equals_value_density_of_the_miner() -> None:
    revenue = mining_revenue_usd_per_h(104.0, 55.0, 0.02)
    density = value_density_usd_per_mwh(revenue, 3068.0)
    assert density == pytest.approx(breakeven_usd_per_mwh(55.0, 0.02, 3068.0 / 104.0))


def test_mining_revenue_formula() -> None:
    # 200 TH/s = 0.2 PH/s at 55 $/PH/day: 11 $/day, less a 2 % pool fee.
    assert mining_revenue_usd_per_h(200.0, 55.0, 0.02) == pytest.approx(11.0 * 0.98 / 24)


def test_energy_cost() -> None:
    assert energy_cost_usd_per_h(3500.0, 40.0) == pytest.approx(0.14)
    assert energy_cost_usd_per_h(3500.0, -20.0) == pytest.approx(-0.07)  # paid to consume


def test_value_density_edge_cases() -> None:
    assert value_density_usd_per_mwh(1.0, 0.0) == float("inf")
    assert value_density_usd_per_mwh(0.0, 0.0) == 0.0


@pytest.mark.parametrize(
    ("cap_w", "expected"),
    [
        (700.0, 1.0),
        (350.0, 0.75),  # c = 0.5: 1 − 0.25
        (200.0, 1 - (1 - 200 / 700) ** 2),
        (100.0, 1 - (1 - 200 / 700) ** 2),  # clipped at the card's minimum
        (900.0, 1.0),  # and at its maximum
    ],
)
def test_gpu_throughput_curve(cap_w: float, expected: float) -> None:
    assert gpu_throughput_fraction(cap_w, 700.0, 200.0) == pytest.approx(expected)


def test_gpu_curve_is_concave_so_cap_steps_fall_in_value() -> None:
    caps = [200.0 + 50.0 * i for i in range(11)]
    fracs = [gpu_throughput_fraction(c, 700.0, 200.0) for c in caps]
    steps = [b - a for a, b in itertools.pairwise(fracs)]
    assert all(x > y for x, y in itertools.pairwise(steps))


def test_h100_value_per_mwh_matches_economics_md() -> None:
    # "An H100 at 2 USD/GPU-h and 700 W is worth about 2,860 USD/MWh."
    revenue = ai_revenue_usd_per_h(1, 2.0, 700.0, 700.0, 200.0)
    assert value_density_usd_per_mwh(revenue, 700.0) == pytest.approx(2857, abs=1)
