"""A week of a backtest as a PNG: price against breakeven and AI value, power by workload.

Top panel: the real-time price (symlog scale, since ERCOT goes from negative to thousands),
each miner model's breakeven at its top profile, the value of an hour of each AI job class per
MWh of GPU power, and the 4CP risk the policy saw. Bottom panel: the policy's site power
stacked by workload (mining, AI incl. host overhead), with the oracle's and strike's total for
comparison. True 4CP intervals (purple lines) and demand-response events (cyan) are marked.
With a horizon planner (``--day-ahead``): the day-ahead prices it planned from and each block's
band (curtail above / restore below) on top; below, the miners' planned power, the power of the
deferrable work the plan runs and the policy's switching (▲ wakes, ▼ sleeps: steps of mining
power). Uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.backtest.engine import BacktestError, job_rate
from agent.control.economics import breakeven_usd_per_mwh
from drivers.jobs.base import JobClass

if TYPE_CHECKING:
    from agent.backtest.runner import BacktestResult
    from agent.control.planner import Band


def _plan_rows(
    res: BacktestResult, start: datetime, end: datetime
) -> list[tuple[datetime, dict[str, Band], dict[str, bool]]]:
    """(interval start, bands by block, job runs) of every plan interval in [start, end); a
    later plan overrides an earlier one where they overlap."""
    rows: dict[datetime, tuple[dict[str, Band], dict[str, bool]]] = {}
    for plan in res.plans:
        for k, when in enumerate(plan.starts):
            if start <= when < end:
                rows[when] = (
                    dict(zip(plan.block_ids, plan.bands[k], strict=True)),
                    dict(zip(plan.job_ids, plan.job_run[k], strict=True)),
                )
    return [(when, *rows[when]) for when in sorted(rows)]


def plot_week(res: BacktestResult, start: datetime, end: datetime, out: Path) -> Path:
    """Draw [start, end) of a finished backtest into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    m = res.market
    idx = [i for i, s in enumerate(m.starts_s) if start.timestamp() <= s < end.timestamp()]
    if not idx:
        raise BacktestError(
            f"the plot week {start:%Y-%m-%d}..{end:%Y-%m-%d} lies outside the backtest period"
        )
    t = [datetime.fromtimestamp(m.starts_s[i], tz=UTC) for i in idx]
    price = [m.price_usd_per_mwh[i] for i in idx]
    cfg = res.config
    fee = cfg.economics.pool_fee
    hp = sum(m.hashprice[i] for i in idx) / len(idx)

    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(14, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    ax1.step(t, price, where="post", color="black", lw=0.9, label="real-time price")
    colors = ["tab:orange", "tab:red", "tab:brown"]
    for k, (model, count) in enumerate(res.site.miners_by_model.items()):
        top = res.site.ladders[model][-1]
        be = breakeven_usd_per_mwh(hp, fee, top.power_w / top.hashrate_ths)
        ax1.axhline(
            be,
            color=colors[k % 3],
            ls="--",
            lw=1.2,
            label=f"{model} breakeven {be:.0f} $/MWh ({count} miners)",
        )
    if res.site.nodes:
        node = res.site.nodes[0]
        for cls, color in ((JobClass.SLA, "tab:green"), (JobClass.FILLER, "tab:olive")):
            rate = job_rate(cfg, cls)[0]
            value = rate / (node.max_cap_w / 1e6)
            ax1.axhline(
                value, color=color, ls=":", lw=1.4, label=f"AI {cls} value {value:,.0f} $/MWh"
            )
    strikes = [res.strikes[i] for i in idx] if res.strikes else [res.strike_usd_per_mwh] * len(t)
    ax1.step(t, strikes, where="post", color="gray", lw=0.8, ls="-.", label="strike price")
    plan_rows = _plan_rows(res, start, end)
    if m.day_ahead:
        ax1.step(
            t,
            [m.day_ahead[i] for i in idx],
            where="post",
            color="tab:blue",
            lw=0.8,
            alpha=0.7,
            label="day-ahead price",
        )
    for k, block in enumerate(sorted({b for row in plan_rows for b in row[1]})):
        times = [when for when, bands, _ in plan_rows if block in bands]
        upper = [
            bands[block].curtail_above_usd_per_mwh for _, bands, _ in plan_rows if block in bands
        ]
        lower = [
            bands[block].restore_below_usd_per_mwh for _, bands, _ in plan_rows if block in bands
        ]
        ax1.fill_between(
            times, lower, upper, step="post", color=colors[k % 3], alpha=0.15,
            label=f"{block} plan band",
        )  # fmt: skip
    ax1.set_yscale("symlog", linthresh=100)
    ax1.set_ylim(top=max(max(price) * 1.5, 5000.0))
    ax1.set_ylabel("USD/MWh")
    ax1.grid(alpha=0.3)
    if m.fourcp_risk:
        risk_ax = ax1.twinx()
        risk_ax.fill_between(
            t, [m.fourcp_risk[i] for i in idx], step="post", color="tab:purple", alpha=0.15
        )
        risk_ax.set_ylim(0, 4)
        risk_ax.set_yticks([0, 1])
        risk_ax.set_ylabel("4CP risk", color="tab:purple")
    ax1.legend(loc="upper left", fontsize=8, ncol=2)
    ax1.set_title(
        f"{cfg.site.id}: {res.args.column} {t[0]:%Y-%m-%d} – {t[-1]:%Y-%m-%d}, "
        f"hashprice {hp:.0f} $/PH/day"
    )

    pol = res.ledgers["policy"]
    mining = [pol.mining_w[i] / 1e6 for i in idx]
    ai = [pol.ai_w[i] / 1e6 for i in idx]
    ax2.stackplot(
        t,
        ai,
        mining,
        labels=["policy: AI (GPUs + hosts)", "policy: mining"],
        colors=["tab:green", "tab:orange"],
        step="post",
        alpha=0.8,
    )
    for name, color in (("oracle", "tab:blue"), ("strike+4cp", "tab:gray")):
        led = res.ledgers.get(name)
        if led is not None:
            total = [(led.mining_w[i] + led.ai_w[i]) / 1e6 for i in idx]
            ax2.step(t, total, where="post", color=color, lw=1.0, label=f"{name}: site total")
    ax2.axhline(res.site.limit_w / 1e6, color="red", lw=0.8, ls="--", label="interconnect")
    if plan_rows:
        ax2.step(
            [when for when, _, _ in plan_rows],
            [sum(b.power_w for b in bands.values()) / 1e6 for _, bands, _ in plan_rows],
            where="post",
            color="black",
            lw=1.0,
            ls=":",
            label="plan: mining",
        )
        # The deferrable work the plan runs, in MW above idle (each job's GPUs at full cap).
        nodes = res.site.nodes
        job_w = {
            j.job_id: j.gpus * (nodes[j.node].max_cap_w - nodes[j.node].idle_w)
            for j in res.trace
            if j.deferrable
        }
        if any(runs for _, _, runs in plan_rows):
            # Small beside the site's megawatts: on its own axis, in kW.
            dax = ax2.twinx()
            dax.step(
                [when for when, _, _ in plan_rows],
                [sum(job_w.get(j, 0.0) for j, on in runs.items() if on) / 1e3
                 for _, _, runs in plan_rows],
                where="post", color="tab:olive", lw=1.2,
            )  # fmt: skip
            dax.set_ylim(bottom=0)
            dax.set_ylabel("plan: deferrable work, kW above idle", color="tab:olive")
    steps = [(i, pol.mining_w[i] - pol.mining_w[i - 1]) for i in idx if i > 0]
    big = 0.05 * max(max(pol.mining_w), 1.0)
    ups = [(t[idx.index(i)], pol.mining_w[i] / 1e6) for i, d in steps if d > big]
    downs = [(t[idx.index(i)], pol.mining_w[i] / 1e6) for i, d in steps if d < -big]
    if ups:
        ax2.scatter(*zip(*ups, strict=True), marker="^", color="tab:red", s=18, label="wakes")
    if downs:
        ax2.scatter(*zip(*downs, strict=True), marker="v", color="tab:blue", s=18, label="sleeps")
    ax2.set_ylabel("MW")
    ax2.grid(alpha=0.3)
    window = (start.timestamp(), end.timestamp())
    for n, event in enumerate(m.events):
        lo, hi = max(event.start.timestamp(), window[0]), min(event.end.timestamp(), window[1])
        if lo < hi:
            for ax in (ax1, ax2):
                ax.axvspan(
                    datetime.fromtimestamp(lo, tz=UTC),
                    datetime.fromtimestamp(hi, tz=UTC),
                    color="tab:cyan",
                    alpha=0.25,
                    label=f"{event.kind} event" if n == 0 and ax is ax2 else None,
                )
    for ax in (ax1, ax2):
        for i in idx:
            if m.peak and m.peak[i]:
                ax.axvline(datetime.fromtimestamp(m.starts_s[i], tz=UTC), color="tab:purple", lw=2)
    ax2.legend(loc="lower left", fontsize=8, ncol=4)
    ax2.xaxis.set_major_formatter(mdates.DateFormatter("%a %m-%d"))  # type: ignore[no-untyped-call]
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
