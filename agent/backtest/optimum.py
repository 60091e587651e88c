"""The constrained optimum: perfect foresight, solved as a MILP day by day, switching charged.

Where the relaxed oracle (:func:`agent.backtest.engine.run_oracle`) drops dwell times and
switching costs and so bounds every strategy from above, the optimum keeps them: it knows each
interval's real price and the true 4CP intervals, and plans the miners of each model as one
block through :func:`agent.control.planner.plan_horizon` — integer units awake, profiles, each
wake and sleep weighed by the site model's costs (:func:`agent.control.site.planner_switching`)
and charged as the policy's settlement is (:func:`agent.control.site.wake_cost`,
:func:`~agent.control.site.sleep_cost`), minimum on and off times in intervals — one UTC day at
a time, carrying the units awake from one day into the next. It is what a clairvoyant operator
bound by the same rules could earn.

AI is dispatched as the oracle dispatches it (per interval, each job at its best cap or idle);
its power is the committed load the miners plan around, within the interconnect. That keeps the
optimum ≤ the oracle (same AI, miners constrained), and it charges no job suspension, as the
oracle does not: the optimum is exact for the miners and relaxed for AI.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from agent.backtest.engine import (
    CLASSES,
    Market,
    Occupancy,
    Site,
    _oracle_choice,
    job_rate,
    settle,
    site_load_model,
)
from agent.backtest.horizon import PlannerStats
from agent.control.economics import mining_revenue_usd_per_h
from agent.control.planner import HorizonInput, MinerBlock, plan_horizon
from agent.control.settlement import Ledger, fourcp_adder_usd_per_mwh
from agent.control.site import planner_switching, sleep_cost, wake_cost


def run_optimum(
    site: Site,
    market: Market,
    occ: Occupancy,
    *,
    time_limit_s: float = 5.0,
    stats: PlannerStats | None = None,
) -> Ledger:
    """Settle the constrained optimum over the market, one day's MILP at a time."""
    cfg = site.config
    fee = cfg.economics.pool_fee
    rate = cfg.grid.fourcp.rate_usd_per_kw_year
    adder = fourcp_adder_usd_per_mwh(rate, interval_h=market.dt_h)
    rates_h = [job_rate(cfg, c)[0] for c in CLASSES]
    models = [(m, site.ladders[m], n) for m, n in site.miners_by_model.items()]
    switching = {m: planner_switching(cfg, cfg.miner_models[m]) for m, _, _ in models}
    ledger = Ledger("optimum", fourcp_rate_usd_per_kw_year=rate, load=site_load_model(cfg))
    awake = {m: n for m, _, n in models}  # a settled, running site, as the replay starts
    days: dict[int, list[int]] = {}
    for i, s in enumerate(market.starts_s):
        days.setdefault(int(s // 86400), []).append(i)
    for idx in days.values():
        q = [
            market.price_usd_per_mwh[i] + (adder if market.peak and market.peak[i] else 0.0)
            for i in idx
        ]
        ai = [
            _oracle_choice(q[k], market.hashprice[i], fee, (), occ, occ.used[i], rates_h)
            for k, i in enumerate(idx)
        ]
        cpu0 = time.process_time()
        plan = plan_horizon(
            HorizonInput(
                at=datetime.fromtimestamp(market.starts_s[idx[0]], tz=UTC),
                starts=tuple(datetime.fromtimestamp(market.starts_s[i], tz=UTC) for i in idx),
                interval_s=market.interval_s,
                price_usd_per_mwh=tuple(market.price_usd_per_mwh[i] for i in idx),
                fourcp_adder_usd_per_mwh=tuple(
                    q[k] - market.price_usd_per_mwh[i] for k, i in enumerate(idx)
                ),
                # The planner values a day at its first interval's hashprice (daily series).
                hashprice_usd_per_ph_day=market.hashprice[idx[0]],
                pool_fee=fee,
                blocks=tuple(
                    MinerBlock(m, n, points, switching[m], awake[m]) for m, points, n in models
                ),
                limit_w=site.limit_w,
                base_load_w=tuple(c.ai_w for c in ai),
                min_on_s=cfg.control.min_on_s,
                min_off_s=cfg.control.min_off_s,
                time_limit_s=time_limit_s,
            )
        )
        day = datetime.fromtimestamp(market.starts_s[idx[0]], tz=UTC).strftime("%Y-%m-%d")
        if stats is not None:
            stats.cpu_s += time.process_time() - cpu0
            stats.add(plan, day)
        if not plan.usable:
            raise RuntimeError(f"constrained optimum: no plan for {day}: {plan.reason}")
        for k, i in enumerate(idx):
            bands = plan.bands[k]
            mining_w = sum(b.power_w for b in bands)
            ths = sum(b.hashrate_ths for b in bands)
            for (m, points, _), band in zip(models, bands, strict=True):
                moved = band.units_on - awake[m]
                if moved:
                    model = cfg.miner_models[m]
                    cost = (
                        wake_cost(cfg, model, points[-1], market.hashprice[i])
                        if moved > 0
                        else sleep_cost(model)
                    ).times(abs(moved))
                    ledger.book_switch(cost.lost_usd, cost.energy_wh, market.price_usd_per_mwh[i])
                    ledger.wakes += max(moved, 0)
                awake[m] = band.units_on
            if any(b.units_on < n for (_, _, n), b in zip(models, bands, strict=True)):
                ledger.curtailed_intervals += 1
            settle(
                ledger,
                market,
                i,
                mining_w,
                ai[k].ai_w,
                mining_revenue_usd_per_h(ths, market.hashprice[i], fee),
                ai[k].ai_rev_h,
            )
    return ledger


def capture_against(policy: Ledger, bound: Ledger) -> float | None:
    """``policy profit / bound profit`` (None when the bound earns nothing)."""
    b = bound.profit_usd
    return None if b <= 0 else policy.profit_usd / b


__all__: Sequence[str] = ("capture_against", "run_optimum")
