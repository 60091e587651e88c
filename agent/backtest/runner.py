"""``site-agent backtest``: a price year through the live ``decide()``, scored in dollars.

Reads a site config, a real-time price CSV (one column), optionally day-ahead prices, system
load (for 4CP) and a hashprice series, replays every interval through the same
:func:`agent.control.policy.decide` that runs live (see :mod:`agent.backtest.engine` for the
rules), and
scores it against the perfect-foresight oracle and the ``always_on`` and ``strike`` baselines.
Prints a table; ``--json`` writes one document; ``--plot`` draws a week.

The headline is ``capture = policy profit / oracle profit``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent.backtest.data import (
    ClassMix,
    Series,
    TraceJob,
    TraceSpec,
    job_trace,
    load_events,
    load_series,
    sample_at,
)
from agent.backtest.engine import (
    STRATEGIES,
    BacktestError,
    Decide,
    Market,
    Site,
    build_site,
    cheapest_runs,
    occupancy,
    run_always_on,
    run_oracle,
    run_policy,
    run_strike,
    strike_prices,
    with_events,
)
from agent.backtest.horizon import DayAheadPlanner, PlannerStats
from agent.backtest.optimum import capture_against, run_optimum
from agent.control.config import AgentConfig, load_config
from agent.control.fourcp import peak_risk
from agent.control.planner import HorizonPlan
from agent.control.settlement import Ledger
from agent.control.site import min_throughput, wake_lost_s

CENTRAL = ZoneInfo("America/Chicago")
DEFAULT_BLOCK_SIZE = 50
SYSTEM_LOAD_COLUMN = "total_mwh"
SYSTEM_LOAD_TIME = "interval_end_utc"


@dataclass(frozen=True, slots=True)
class BacktestArgs:
    """What a backtest run needs (the CLI builds one; tests and the bench may too)."""

    config_path: Path
    prices: Path
    column: str
    day_ahead: Path | None = None
    system_load: Path | None = None
    hashprice: float | None = None  # None: the config's constant
    hashprice_csv: Path | None = None
    jobs_seed: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    start: datetime | None = None
    end: datetime | None = None
    strike_usd_per_mwh: float | None = None  # None: the fleet's breakeven
    strike_n: int = 1
    events: Path | None = None  # demand-response events CSV (agent.backtest.data.EVENT_COLUMNS)
    no_4cp: bool = False  # price no 4CP at all (no system load read)
    # Hashing a miner loses per wake (ramp and catch-up): None keeps the site model's
    # (``miner_models.*.wake_lost_s``, else ``control.miner_wake_lost_s``); a number replaces
    # every model's, for the policy, the planner and the settlement alike. 0: waking loses none.
    wake_lost_s: float | None = None
    planner: bool = True  # with day-ahead prices, the policy follows a day-ahead horizon plan
    optimum: bool = False  # also the constrained optimum (perfect-foresight MILP, day by day)


@dataclass(frozen=True, slots=True)
class BacktestResult:
    args: BacktestArgs
    config: AgentConfig
    site: Site
    market: Market
    ledgers: dict[str, Ledger]
    strike_usd_per_mwh: float  # the mean of ``strikes``
    fourcp_estimator: str
    seconds: dict[str, float]
    trace: tuple[TraceJob, ...]
    strikes: tuple[float, ...] = ()  # the strike of each interval
    planner: PlannerStats | None = None  # the policy's day-ahead plans
    plans: tuple[HorizonPlan, ...] = ()
    optimum_stats: PlannerStats | None = None

    @property
    def flex_capture(self) -> float | None:
        """The share of the oracle's gain over always-on that the policy captures:
        ``(policy − always_on) / (oracle − always_on)``. Revenue that no choice moves (AI work
        that runs in every strategy) pads ``capture``; it cancels here."""
        led = self.ledgers
        if not {"policy", "oracle", "always_on"} <= led.keys():
            return None
        base = led["always_on"].profit_usd
        room = led["oracle"].profit_usd - base
        if room <= 0:
            return None
        return (led["policy"].profit_usd - base) / room

    @property
    def capture(self) -> float | None:
        if "oracle" not in self.ledgers or "policy" not in self.ledgers:
            return None
        oracle = self.ledgers["oracle"].profit_usd
        if oracle <= 0:
            return None
        return self.ledgers["policy"].profit_usd / oracle

    @property
    def capture_optimum(self) -> float | None:
        """Policy profit over the constrained optimum's (None without ``--optimum``)."""
        if "optimum" not in self.ledgers or "policy" not in self.ledgers:
            return None
        return capture_against(self.ledgers["policy"], self.ledgers["optimum"])


# --- building the market -------------------------------------------------------------------


def _step_s(series: Series) -> float:
    steps: dict[float, int] = {}
    for a, b in zip(series.times_s, series.times_s[1:], strict=False):
        steps[b - a] = steps.get(b - a, 0) + 1
    if not steps:
        raise BacktestError(f"{series.path}: need at least two rows to know the interval")
    return max(steps, key=lambda k: steps[k])


def build_market(args: BacktestArgs, config: AgentConfig) -> tuple[Market, str]:
    """Read and validate every input file; align them to the real-time price intervals."""
    rt = load_series(args.prices, args.column)
    interval_s = _step_s(rt)
    start_s = args.start.timestamp() if args.start else -math.inf
    end_s = args.end.timestamp() if args.end else math.inf
    idx = [j for j, t in enumerate(rt.times_s) if start_s <= t < end_s]
    if not idx:
        raise BacktestError(f"{args.prices}: no interval between {args.start} and {args.end}")
    starts = tuple(rt.times_s[j] for j in idx)
    prices = tuple(rt.values[j] for j in idx)
    seen = tuple((rt.values[j - 1], rt.times_s[j - 1]) if j > 0 else None for j in idx)

    if args.hashprice_csv is not None:
        hp_series = load_series(args.hashprice_csv, _value_column(args.hashprice_csv))
        sampled = sample_at(hp_series, starts, hold_s=math.inf)
        if sampled[0] is None:
            raise BacktestError(
                f"{args.hashprice_csv}: no hashprice at or before the first interval"
            )
        hashprice = tuple(v if v is not None else 0.0 for v in sampled)
        if min(hashprice) <= 0:
            raise BacktestError(f"{args.hashprice_csv}: hashprice must be positive")
    else:
        hp = (
            args.hashprice
            if args.hashprice is not None
            else config.economics.hashprice.usd_per_ph_day
        )
        if not (hp > 0 and math.isfinite(hp)):
            raise BacktestError(f"hashprice must be a positive number (got {hp})")
        hashprice = (hp,) * len(starts)

    day_ahead: tuple[float | None, ...] = ()
    if args.day_ahead is not None:
        da = load_series(args.day_ahead, args.column)
        day_ahead = tuple(sample_at(da, starts, hold_s=_step_s(da)))

    risk: tuple[float, ...] = ()
    reasons: tuple[str, ...] = ()
    peak: tuple[bool, ...] = ()
    estimator = "none (no system load; 4CP not enabled in the config)"
    load_path = args.system_load or config.grid.fourcp.system_load_csv
    if args.no_4cp:
        load_path = None
        estimator = "off (--no-4cp): no 4CP charge, no 4CP risk"
    elif load_path is None and config.grid.fourcp.enabled:
        raise BacktestError(
            "4CP is enabled in the config but no system load file is given: "
            "give --system-load FILE, or --no-4cp to price no 4CP at all"
        )
    if load_path is not None:
        load = load_series(load_path, SYSTEM_LOAD_COLUMN, SYSTEM_LOAD_TIME)
        load_step = _step_s(load)
        # Rows are interval ends: the file must reach from the period's start to its end, or
        # 4CP would be priced at zero where it is not known.
        covered = (load.times_s[0] - load_step, load.times_s[-1])
        period = (starts[0], starts[-1] + interval_s)
        if covered[0] > period[0] or covered[1] < period[1]:
            raise BacktestError(
                f"{load_path}: system load covers {_iso(covered[0])} .. {_iso(covered[1])}, "
                f"not the period {_iso(period[0])} .. {_iso(period[1])}: 4CP cannot be priced "
                "(give a file that covers it, or --no-4cp)"
            )
        mw = [v * 3600.0 / load_step for v in load.values]
        peak = _true_peaks(load.times_s, mw, load_step, starts)
        estimator = "agent.control.fourcp.peak_risk"
        risk, reasons = _risks(load.times_s, mw, starts)
    market = Market(
        interval_s=interval_s,
        starts_s=starts,
        price_usd_per_mwh=prices,
        seen_price=seen,
        hashprice=hashprice,
        day_ahead=day_ahead,
        fourcp_risk=risk,
        fourcp_reason=reasons,
        peak=peak,
    )
    return market, estimator


HASHPRICE_COLUMN = "hashprice_usd_per_ph_day"


def _value_column(path: Path) -> str:
    """A hashprice CSV: time first, then ``hashprice_usd_per_ph_day`` wherever it stands, or
    else the second column (named anything)."""
    try:
        with path.open(encoding="utf-8") as f:
            header = [h.strip() for h in f.readline(4096).strip().split(",")]
    except OSError as exc:
        raise BacktestError(f"{path}: cannot open: {exc.strerror}") from None
    if HASHPRICE_COLUMN in header[1:]:
        return HASHPRICE_COLUMN
    if len(header) < 2:
        raise BacktestError(f"{path}:1: expected a time column and a hashprice column")
    return header[1]


def _true_peaks(
    ends_s: Sequence[float], mw: Sequence[float], step_s: float, starts: Sequence[float]
) -> tuple[bool, ...]:
    """The interval of maximum system load in each Central month June–September."""
    best: dict[tuple[int, int], tuple[float, float]] = {}
    for t, v in zip(ends_s, mw, strict=True):
        # Month of the interval (its start), in Central time as ERCOT counts it.
        local = datetime.fromtimestamp(t - step_s, tz=CENTRAL)
        if local.month in (6, 7, 8, 9):
            key = (local.year, local.month)
            if key not in best or v > best[key][1]:
                best[key] = (t - step_s, v)
    peak_starts = {s for s, _ in best.values()}
    return tuple(s in peak_starts for s in starts)


def _risks(
    ends_s: Sequence[float], mw: Sequence[float], starts: Sequence[float]
) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The live 4CP estimator's risk at each interval start, from system load settled by then
    (``peak_risk`` bisects on the row ends, so handing it the whole year stays causal)."""
    ends_dt = [datetime.fromtimestamp(t, tz=UTC) for t in ends_s]
    risk: list[float] = []
    reasons: list[str] = []
    for s in starts:
        if datetime.fromtimestamp(s, tz=CENTRAL).month not in (6, 7, 8, 9):
            risk.append(0.0)  # no 4CP outside June–September: skip the call
            reasons.append("")
            continue
        a = peak_risk(mw, ends_dt, datetime.fromtimestamp(s, tz=UTC))
        risk.append(a.risk)
        reasons.append(a.reason if a.risk > 0 else "")
    return tuple(risk), tuple(reasons)


# --- running -------------------------------------------------------------------------------


def with_wake_lost_s(config: AgentConfig, seconds: float) -> AgentConfig:
    """``config`` with every miner model's ``wake_lost_s`` set to ``seconds`` (``--wake-lost-s``:
    the policy, the planner and the settlement then all use it)."""
    if not (math.isfinite(seconds) and 0 <= seconds <= 86400):
        raise BacktestError(f"wake lost seconds must be 0..86400 (got {seconds})")
    models = {
        name: m.model_copy(update={"wake_lost_s": seconds})
        for name, m in config.miner_models.items()
    }
    return config.model_copy(update={"miner_models": models})


def run_backtest(
    args: BacktestArgs,
    config: AgentConfig | None = None,
    market: Market | None = None,
    decide: Decide | None = None,
    strategies: Sequence[str] = STRATEGIES,
) -> BacktestResult:
    """Run every strategy over the period. ``config``/``market``/``decide`` may be injected."""
    if config is None:
        config = load_config(args.config_path)
    if args.wake_lost_s is not None:
        config = with_wake_lost_s(config, args.wake_lost_s)
    estimator = "given"
    if market is None:
        market, estimator = build_market(args, config)
    if decide is None:
        from agent.control.policy import decide as live_decide

        decide = live_decide
    site = build_site(config, args.block_size)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    node_gpus = [n.gpus for n in site.nodes]
    shape = config.ai.trace
    spec = TraceSpec(
        deferrable=ClassMix(shape.deferrable_arrivals_per_h, shape.deferrable_mean_work_h),
        deferrable_slack=shape.deferrable_slack,
        deferrable_min_fraction=min((min_throughput(n) for n in site.nodes), default=1.0),
        deferrable_gpus=shape.deferrable_gpus,
    )
    trace = tuple(job_trace(args.jobs_seed, len(market), market.interval_s, node_gpus, spec))
    # Deferrable work runs as soon as it arrives for always-on and strike; in its cheapest
    # intervals for the oracle and the optimum (foresight); when the plan says for the policy.
    occ = occupancy(site, trace, len(market))
    occ_foresight = (
        occupancy(site, trace, len(market), cheapest_runs(trace, market, site))
        if any(j.deferrable for j in trace)
        else occ
    )
    if args.events is not None:
        market = with_events(market, load_events(args.events), site, occ)
    seconds["inputs"] = time.perf_counter() - t0
    strikes = (
        strike_prices(site, market)
        if args.strike_usd_per_mwh is None
        else [args.strike_usd_per_mwh] * len(market)
    )
    planner = DayAheadPlanner(site, market) if args.planner and market.day_ahead else None
    optimum_stats = PlannerStats() if args.optimum else None
    if args.optimum and "optimum" not in strategies:
        strategies = (*strategies, "optimum")
    ledgers: dict[str, Ledger] = {}
    for name in strategies:
        t = time.perf_counter()
        if name == "policy":
            ledgers[name] = run_policy(site, market, trace, decide, planner)
        elif name == "oracle":
            ledgers[name] = run_oracle(site, market, occ_foresight)
        elif name == "always_on":
            ledgers[name] = run_always_on(site, market, occ)
        elif name == "strike":
            ledgers[name] = run_strike(site, market, occ, strikes, args.strike_n)
        elif name == "strike+4cp":
            ledgers[name] = run_strike(site, market, occ, strikes, args.strike_n, sit_out_4cp=True)
        elif name == "optimum":
            ledgers[name] = run_optimum(site, market, occ_foresight, stats=optimum_stats)
        else:
            raise BacktestError(f"unknown strategy {name!r}")
        seconds[name] = time.perf_counter() - t
    mean_strike = sum(strikes) / len(strikes)
    return BacktestResult(
        args,
        config,
        site,
        market,
        ledgers,
        mean_strike,
        estimator,
        seconds,
        trace,
        tuple(strikes),
        planner=None if planner is None else planner.stats,
        plans=() if planner is None else tuple(planner.plans),
        optimum_stats=optimum_stats,
    )


# --- output --------------------------------------------------------------------------------


def ledger_json(led: Ledger) -> dict[str, Any]:
    doc = {
        "revenue_usd": {
            "mining": round(led.mining_usd, 2),
            "ai": round(led.ai_usd, 2),
            "demand_response": round(led.demand_response_usd, 2),
        },
        "energy_cost_usd": round(led.energy_cost_usd, 2),
        "fourcp_cost_usd": round(led.fourcp_cost_usd, 2),
        "penalties_usd": round(led.penalties_usd, 2),
        "switching_usd": round(led.switching_usd, 2),
        "miner_wakes": led.wakes,
        "penalties_detail_usd": {
            "lost_work": round(led.lost_work_usd, 2),
            "sla": round(led.sla_penalty_usd, 2),
            "demand_response": round(led.dr_penalty_usd, 2),
        },
        "profit_usd": round(led.profit_usd, 2),
        # Signed parts that add up to the profit.
        "breakdown_usd": {k: round(v, 2) for k, v in breakdown_usd(led).items()},
        "energy_mwh": round(led.energy_mwh, 3),
        "job_interruptions": led.interruptions,
        "mining_curtailed_intervals": led.curtailed_intervals,
    }
    if led.deferrable_jobs:  # the policy's own count (the others run them by the trace)
        doc["deferrable_jobs"] = {
            "seen": led.deferrable_jobs,
            "done": led.deferrable_done,
            "deadlines_missed": led.deadlines_missed,
        }
    return doc


def breakdown_usd(led: Ledger) -> dict[str, float]:
    """A strategy's profit in signed parts: mining, AI, demand response, energy, 4CP,
    penalties (lost work, SLA, demand-response shortfall) and switching."""
    return {
        "mining": led.mining_usd,
        "ai": led.ai_usd,
        "demand_response": led.demand_response_usd,
        "energy": -led.energy_cost_usd,
        "fourcp": -led.fourcp_cost_usd,
        "penalties": -led.penalties_usd,
        "switching": -led.switching_usd,
    }


def result_json(res: BacktestResult) -> dict[str, Any]:
    a, m = res.args, res.market
    doc: dict[str, Any] = {name: ledger_json(led) for name, led in res.ledgers.items()}
    cap = res.capture
    doc["capture"] = None if cap is None else round(cap, 5)
    flex = res.flex_capture
    doc["flex_capture"] = None if flex is None else round(flex, 5)
    if "optimum" in res.ledgers:
        co = res.capture_optimum
        doc["capture_optimum"] = None if co is None else round(co, 5)
    if res.planner is not None:
        doc["planner"] = res.planner.summary()
    if res.optimum_stats is not None:
        doc["optimum_solver"] = res.optimum_stats.summary()
    hp = m.hashprice
    doc["inputs"] = {
        "config": str(a.config_path),
        "prices": str(a.prices),
        "column": a.column,
        "day_ahead": None if a.day_ahead is None else str(a.day_ahead),
        "system_load": None if a.system_load is None else str(a.system_load),
        "events": None if a.events is None else str(a.events),
        "event_count": len(m.events),
        "hashprice_usd_per_ph_day": a.hashprice if a.hashprice_csv is None else None,
        "hashprice_csv": None if a.hashprice_csv is None else str(a.hashprice_csv),
        "hashprice_mean": round(sum(hp) / len(hp), 4) if hp else None,
        "jobs_seed": a.jobs_seed,
        "jobs": len(res.trace),
        "block_size": a.block_size,
        "strike_usd_per_mwh": round(res.strike_usd_per_mwh, 4),
        "strike_rule": (
            "fleet breakeven at each interval's hashprice"
            if a.strike_usd_per_mwh is None
            else "fixed (--strike)"
        ),
        "no_4cp": a.no_4cp,
        "strike_n": a.strike_n,
        "wake_lost_s": a.wake_lost_s,  # None: the site model's (see switching_costs)
        "horizon_planner": res.planner is not None,
        "fourcp_estimator": res.fourcp_estimator,
        # The estimator's risk is priced as risk × hit_rate above risk_threshold (the policy's
        # and the planner's rule, agent.control.settlement.fourcp_risk_priced).
        "fourcp_risk_threshold": res.config.grid.fourcp.risk_threshold,
        "fourcp_hit_rate": res.config.grid.fourcp.hit_rate,
        "fourcp_peak_intervals": [_iso(m.starts_s[i]) for i, p in enumerate(m.peak) if p],
        "period": {
            "start": _iso(m.starts_s[0]),
            "end": _iso(m.starts_s[-1] + m.interval_s),
            "intervals": len(m),
            "interval_s": m.interval_s,
        },
        # The switching costs every strategy but the oracle was charged (agent.control.site).
        "switching_costs": {
            "miner_models": {
                name: {
                    "wake_lost_s": wake_lost_s(res.config, m),
                    "wake_energy_wh": m.wake_energy_wh,
                    "sleep_energy_wh": m.sleep_energy_wh,
                }
                for name, m in res.config.miner_models.items()
            },
            "ai": {
                cls: {
                    "checkpoint_interval_s": c.checkpoint_interval_s,
                    "resume_s": c.resume_s,
                    "penalty_usd": c.penalty_usd,
                }
                for cls, c in (
                    ("sla", res.config.ai.sla),
                    ("preemptible", res.config.ai.preemptible),
                    ("filler", res.config.ai.filler),
                )
            },
        },
        "miners": sum(b.count for b in res.site.blocks),
        "gpus": sum(n.gpus for n in res.site.nodes),
    }
    doc["seconds"] = {k: round(v, 3) for k, v in res.seconds.items()}
    return doc


def _iso(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(res: BacktestResult) -> str:
    rows: list[tuple[str, Callable[[Ledger], float]]] = [
        ("mining revenue", lambda led: led.mining_usd),
        ("AI revenue", lambda led: led.ai_usd),
        ("demand response", lambda led: led.demand_response_usd),
        ("energy cost", lambda led: -led.energy_cost_usd),
        ("4CP cost", lambda led: -led.fourcp_cost_usd),
        ("penalties", lambda led: -led.penalties_usd),
        ("switching", lambda led: -led.switching_usd),
        ("profit", lambda led: led.profit_usd),
    ]
    names = list(res.ledgers)
    out = [f"{'USD':<18}" + "".join(f"{n:>16}" for n in names)]
    for label, get in rows:
        out.append(f"{label:<18}" + "".join(f"{get(res.ledgers[n]):>16,.0f}" for n in names))
    out.append(
        f"{'energy MWh':<18}" + "".join(f"{res.ledgers[n].energy_mwh:>16,.0f}" for n in names)
    )
    m = res.market
    cap = res.capture
    out.append("")
    out.append(
        f"period {_iso(m.starts_s[0])} .. {_iso(m.starts_s[-1] + m.interval_s)} "
        f"({len(m):,} intervals), hashprice {sum(m.hashprice) / len(m):.2f} $/PH/day, "
        f"strike {res.strike_usd_per_mwh:.2f} $/MWh mean (N={res.args.strike_n})"
    )
    out.append(
        "capture (policy / oracle profit): "
        + ("n/a (oracle profit ≤ 0)" if cap is None else f"{cap:.4f}")
    )
    flex = res.flex_capture
    out.append(
        "flex_capture ((policy − always_on) / (oracle − always_on)): "
        + ("n/a (oracle no better than always-on)" if flex is None else f"{flex:.4f}")
    )
    if "optimum" in res.ledgers:
        co = res.capture_optimum
        out.append(
            "capture against the constrained optimum: "
            + ("n/a (optimum profit ≤ 0)" if co is None else f"{co:.4f}")
        )
    if res.planner is not None:
        p = res.planner.summary()
        out.append(
            f"horizon planner: {p['solves']} day-ahead plans, mean {p['seconds_mean']} s, "
            f"max {p['seconds_max']} s, {p['statuses']}"
        )
    return "\n".join(out)


# --- CLI -----------------------------------------------------------------------------------
