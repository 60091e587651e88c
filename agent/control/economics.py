"""Money formulas from economics.md: what an operating point earns and what its power costs.

All functions are pure. Units: power W, hashrate TH/s, hashprice USD per PH/s per day, energy
price USD/MWh, revenue USD/h.
"""

from __future__ import annotations


def mining_revenue_usd_per_h(
    hashrate_ths: float, hashprice_usd_per_ph_day: float, pool_fee: float
) -> float:
    """``hashprice × (H_ths / 1000) / 24 × (1 − pool_fee)``."""
    return hashprice_usd_per_ph_day * (hashrate_ths / 1000.0) / 24.0 * (1.0 - pool_fee)


def energy_cost_usd_per_h(power_w: float, price_usd_per_mwh: float) -> float:
    return power_w / 1e6 * price_usd_per_mwh


def value_density_usd_per_mwh(revenue_usd_per_h: float, power_w: float) -> float:
    """Revenue per MWh consumed; infinite for a point that earns while drawing nothing."""
    if power_w <= 0:
        return float("inf") if revenue_usd_per_h > 0 else 0.0
    return revenue_usd_per_h / (power_w / 1e6)


def breakeven_usd_per_mwh(
    hashprice_usd_per_ph_day: float, pool_fee: float, j_per_th: float
) -> float:
    """``hashprice × (1 − fee) / (0.024 × J/TH)``: the energy price at which mining earns zero."""
    return hashprice_usd_per_ph_day * (1.0 - pool_fee) / (0.024 * j_per_th)


def gpu_throughput_fraction(cap_w: float, max_cap_w: float, min_cap_w: float) -> float:
    """Default concave throughput curve ``1 − (1 − c)²``, c = cap / max, clipped at the minimum."""
    c = max(min_cap_w, min(cap_w, max_cap_w)) / max_cap_w
    return 1.0 - (1.0 - c) ** 2


def ai_revenue_usd_per_h(
    gpus: int, usd_per_gpu_hour: float, cap_w: float, max_cap_w: float, min_cap_w: float
) -> float:
    frac = gpu_throughput_fraction(cap_w, max_cap_w, min_cap_w)
    return ai_revenue_at_fraction_usd_per_h(gpus, usd_per_gpu_hour, frac)


def ai_revenue_at_fraction_usd_per_h(gpus: int, usd_per_gpu_hour: float, frac: float) -> float:
    """What a running job earns at a throughput fraction (its node's cap, above)."""
    return gpus * usd_per_gpu_hour * frac
