"""The backtest engine: replays intervals through a strategy and settles each at its real price.

Five strategies are settled by the same :class:`~agent.control.settlement.Ledger` on the same
site model (:mod:`agent.control.site`) as the live agent; this module keeps only what is the
backtest's own: the market replay, the oracle and the baselines (economics.md, "The backtest").

- ``policy``: the live :func:`agent.control.policy.decide`, fed one causal :class:`Snapshot` per
  interval (the previous interval's settled price, aged one interval; the day-ahead price of the
  hour; the 4CP risk from system load up to now). The backtest plays the devices: every plan is
  applied as commanded and each device's ``commanded_since`` is kept, so dwell times, hysteresis
  and the ramp token bucket act exactly as live, and every switch is charged the site model's
  cost (the same the plan priced it at). Miners are simulated as blocks of identical miners
  (``MinerView.count``); live runs one view per miner, and block granularity is the only
  difference.
- ``oracle``: perfect foresight of the interval's price and of the true 4CP intervals, with
  dwell, ramp, hysteresis, switching costs and penalties relaxed. Per interval it maximises
  revenue minus cost over every device's operating points (GPU caps continuously, per job)
  under the interconnect limit, via the Lagrangian dual of that limit — a bound that holds for
  any feasible choice, so the oracle is an upper bound of every causal strategy, and attained
  exactly whenever the limit does not bind (with a fractional last step when it does).
- ``always_on``: every miner at its top profile and every job running at full cap, always
  (miners pay switching costs whenever the interconnect makes some of them sleep or wake).
- ``strike``: Foreman's rule — curtail every miner after ``n`` consecutive settled intervals
  above the strike price (the fleet's breakeven at each day's hashprice), resume after 4 below;
  GPU caps stay at nameplate and no job is suspended; miners pay the site model's wake and
  sleep costs.
- ``strike+4cp``: the same, and every miner also sits out the intervals flagged as 4CP risks
  (the forecast the policy sees, by the policy's threshold).

AI jobs come from a seeded trace (:mod:`agent.backtest.data`) whose occupancy does not depend
on the strategy. Settlement per interval: energy cost = site power × real price × interval
length (negative prices pay); mining revenue from the hashrate run; AI revenue = contracted rate
× GPUs × throughput at the cap while running; switching as :mod:`agent.control.site` prices it
(a suspension loses the work since the checkpoint and an SLA contract's penalty, a resume its
reload, a wake its lost hashing and extra energy, a sleep its extra energy); 4CP = rate × site
kW in each true monthly peak interval / 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from agent.backtest.data import TraceJob
from agent.control.config import AgentConfig, GpuNodeConfig
from agent.control.cooling import SiteLoadModel, cooling_fraction
from agent.control.domain import (
    SLEEP,
    ActiveEvent,
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    Plan,
    Snapshot,
)
from agent.control.economics import (
    ai_revenue_usd_per_h,
    gpu_throughput_fraction,
    mining_revenue_usd_per_h,
)
from agent.control.planner import DeferrableJob, HorizonPlan
from agent.control.settlement import (
    Ledger,
    event_target_w,
    fourcp_adder_usd_per_mwh,
    fourcp_risk_priced,
)
from agent.control.site import (
    RampBudget,
    SiteModel,
    assemble_snapshot,
    checkpoint_age_s,
    contract,
    deferrable_jobs,
    node_power_w,
    ramp_capacity_w,
    resume_cost,
    site_model,
    sleep_cost,
    suspend_cost,
    wake_cost,
)
from drivers.errors import AgentError
from drivers.grid.base import GridEvent
from drivers.jobs.base import JobClass, JobState

STRATEGIES = ("policy", "oracle", "always_on", "strike", "strike+4cp")
Decide = Callable[[Snapshot, AgentConfig, datetime], Plan]
# The horizon plan at interval ``i``, given the units awake per miner model and the AI load now.
# (interval, miners awake by model, AI power now, the deferrable jobs now) -> the plan in force
HorizonAt = Callable[
    [int, Mapping[str, int], float, tuple[DeferrableJob, ...]], "HorizonPlan | None"
]


class BacktestError(AgentError):
    """The backtest cannot run (bad inputs) or a strategy broke a rule it must keep."""


# --- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Market:
    """Everything exogenous, per interval of the period (all lists have one entry each)."""

    interval_s: float
    starts_s: tuple[float, ...]  # interval starts, epoch seconds UTC
    price_usd_per_mwh: tuple[float, ...]  # the real settled price of each interval
    # What the policy sees at each interval's start: the newest settled price (the previous
    # interval's), with its own interval start; None before the first price.
    seen_price: tuple[tuple[float, float] | None, ...]
    hashprice: tuple[float, ...]
    day_ahead: tuple[float | None, ...] = ()
    fourcp_risk: tuple[float, ...] = ()
    fourcp_reason: tuple[str, ...] = ()
    peak: tuple[bool, ...] = ()  # the true monthly 4CP intervals (known only afterwards)
    # Demand-response events, the intervals each is in force, and the baseline every strategy
    # is settled against (see :func:`with_events`).
    events: tuple[GridEvent, ...] = ()
    event_baseline_w: tuple[float, ...] = ()
    active_events: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.starts_s)
        for name in ("price_usd_per_mwh", "seen_price", "hashprice"):
            if len(getattr(self, name)) != n:
                raise BacktestError(f"market.{name} has {len(getattr(self, name))} rows, not {n}")
        for name in ("day_ahead", "fourcp_risk", "fourcp_reason", "peak"):
            got = len(getattr(self, name))
            if got not in (0, n):
                raise BacktestError(f"market.{name} has {got} rows, not {n}")

    def __len__(self) -> int:
        return len(self.starts_s)

    @property
    def dt_h(self) -> float:
        return self.interval_s / 3600.0


def simple_market(
    prices: Sequence[float],
    hashprice: float,
    *,
    start: datetime = datetime(2023, 1, 1, tzinfo=UTC),
    interval_s: float = 900.0,
    peak: Sequence[bool] = (),
    fourcp_risk: Sequence[float] = (),
) -> Market:
    """A market from a plain price list (tests, experiments): the policy sees price t−1."""
    t0 = start.timestamp()
    starts = tuple(t0 + i * interval_s for i in range(len(prices)))
    seen: list[tuple[float, float] | None] = [None]
    seen += [(prices[i - 1], starts[i - 1]) for i in range(1, len(prices))]
    return Market(
        interval_s=interval_s,
        starts_s=starts,
        price_usd_per_mwh=tuple(prices),
        seen_price=tuple(seen),
        hashprice=(hashprice,) * len(prices),
        peak=tuple(peak),
        fourcp_risk=tuple(fourcp_risk),
        fourcp_reason=("",) * len(fourcp_risk),
    )


# --- the site ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MinerBlock:
    device_id: str
    model: str
    count: int
    circuit: str | None


@dataclass(frozen=True, slots=True)
class Site:
    """The site model (:mod:`agent.control.site`) and its miners split into blocks."""

    model: SiteModel
    blocks: tuple[MinerBlock, ...]

    @property
    def config(self) -> AgentConfig:
        return self.model.config

    @property
    def ladders(self) -> dict[str, tuple[OperatingPoint, ...]]:
        return self.model.ladders

    @property
    def nameplates(self) -> dict[str, float]:
        return self.model.nameplates

    @property
    def nodes(self) -> tuple[GpuNodeConfig, ...]:
        return self.model.nodes

    @property
    def node_ids(self) -> tuple[str, ...]:
        return self.model.node_ids

    @property
    def limit_w(self) -> float:
        return self.model.limit_w

    @property
    def miners_by_model(self) -> dict[str, int]:
        return self.model.miners_by_model

    def fleet_breakeven_usd_per_mwh(self, hashprice: float) -> float:
        return self.model.fleet_breakeven_usd_per_mwh(hashprice)


def build_site(config: AgentConfig, block_size: int) -> Site:
    """Split every miner config line into blocks of at most ``block_size`` identical miners."""
    if block_size < 1:
        raise BacktestError(f"block size must be at least 1 (got {block_size})")
    blocks: list[MinerBlock] = []
    for m in config.miners:
        n_blocks = math.ceil(m.count / block_size)
        for k in range(n_blocks):
            size = min(block_size, m.count - k * block_size)
            bid = m.id if m.count == 1 else f"{m.id}-blk{k + 1:04d}"
            blocks.append(MinerBlock(bid, m.model, size, m.circuit))
    return Site(site_model(config), tuple(blocks))


def settle(
    ledger: Ledger,
    market: Market,
    i: int,
    mining_w: float,
    ai_w: float,
    mining_usd_per_h: float,
    ai_usd_per_h: float,
) -> None:
    """Book interval ``i`` of the market (its real price, true peak and events in force)."""
    active = market.active_events.get(i, ())
    ledger.settle(
        market.dt_h,
        market.price_usd_per_mwh[i],
        mining_w,
        ai_w,
        mining_usd_per_h,
        ai_usd_per_h,
        peak=bool(market.peak) and market.peak[i],
        events=[(market.events[e], market.event_baseline_w[e]) for e in active],
    )


def site_load_model(cfg: AgentConfig) -> SiteLoadModel:
    """Cooling and base load at the configured ambient (no weather history is replayed)."""
    ambient = cfg.ambient.constant_c
    return SiteLoadModel(
        cooling_fraction(cfg.cooling, ambient),
        cfg.cooling.base_load_kw * 1000.0,
        "devices",
        ambient,
    )


def job_rate(config: AgentConfig, cls: JobClass) -> tuple[float, float, float]:
    """(USD per GPU-hour, penalty per interruption, checkpoint interval s) of a job class."""
    c = contract(config, cls)
    return c.usd_per_gpu_hour, c.penalty_usd, c.checkpoint_interval_s


# --- occupancy shared by the cheap strategies -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Occupancy:
    """Per interval, GPUs occupied per (node type, job class); node types group equal specs."""

    types: tuple[GpuNodeConfig, ...]
    gpus_per_type: tuple[int, ...]
    hosts_w: float  # host overhead of every node (nodes stay up in every strategy)
    used: tuple[tuple[tuple[int, ...], ...], ...]  # [interval][type][class index] -> GPUs


CLASSES = (JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER)


def asap_runs(job: TraceJob) -> range:
    """The intervals a deferrable job runs in when started at once and never stopped."""
    return range(job.start_i, min(job.start_i + job.work_i, job.end_i))


def cheapest_runs(
    trace: Sequence[TraceJob], market: Market, site: Site
) -> dict[str, tuple[int, ...]]:
    """Every deferrable job in the cheapest of its intervals, by the real price and the true
    4CP peaks: the oracle's foresight (relaxed, like the rest of the oracle: no resume cost)."""
    adder = fourcp_adder_usd_per_mwh(
        site.config.grid.fourcp.rate_usd_per_kw_year, interval_h=market.dt_h
    )
    prices = market.price_usd_per_mwh
    peak = market.peak
    out: dict[str, tuple[int, ...]] = {}
    for job in trace:
        if not job.deferrable:
            continue
        window = range(job.start_i, job.end_i)
        q = sorted(window, key=lambda i: (prices[i] + (adder if peak and peak[i] else 0.0), i))
        out[job.job_id] = tuple(sorted(q[: job.work_i]))
    return out


def occupancy(
    site: Site,
    trace: Sequence[TraceJob],
    n: int,
    runs: Mapping[str, Sequence[int]] | None = None,
) -> Occupancy:
    """GPUs busy per interval; a deferrable job counts in the intervals ``runs`` gives it (by
    default :func:`asap_runs`), idle on its GPUs the rest of its window."""
    types: list[GpuNodeConfig] = []
    type_of: list[int] = []
    for node in site.nodes:
        if node not in types:
            types.append(node)
        type_of.append(types.index(node))
    gpus_per_type = [0] * len(types)
    for node, t in zip(site.nodes, type_of, strict=True):
        gpus_per_type[t] += node.gpus
    delta = [[[0] * len(CLASSES) for _ in types] for _ in range(n + 1)]
    for job in trace:
        c = CLASSES.index(job.job_class)
        t = type_of[job.node]
        if not job.deferrable:
            delta[job.start_i][t][c] += job.gpus
            delta[job.end_i][t][c] -= job.gpus
            continue
        chosen = runs.get(job.job_id) if runs is not None else None
        for i in asap_runs(job) if chosen is None else chosen:
            delta[i][t][c] += job.gpus
            delta[i + 1][t][c] -= job.gpus
    used: list[tuple[tuple[int, ...], ...]] = []
    run = [[0] * len(CLASSES) for _ in types]
    for i in range(n):
        for t in range(len(types)):
            for c in range(len(CLASSES)):
                run[t][c] += delta[i][t][c]
        used.append(tuple(tuple(r) for r in run))
    hosts_w = sum(node.host_overhead_w for node in site.nodes)
    return Occupancy(tuple(types), tuple(gpus_per_type), hosts_w, tuple(used))


# --- oracle --------------------------------------------------------------------------------


def _best_gpu(rate_h: float, q: float, node: GpuNodeConfig) -> tuple[float, float]:
    """Best (revenue USD/h, power W) of one GPU holding a job at energy price ``q`` USD/MWh:
    suspended (idle power) or running at the continuous optimum of the concave curve."""
    m, lo = node.max_cap_w, node.min_cap_w
    if q <= 0:
        cap = m
    else:
        # d/dc [r·(1 − (1 − c/M)²)] = q/1e6  →  c = M·(1 − q·M / (2·r·1e6))
        cap = m * (1.0 - q * m / (2.0 * rate_h * 1e6)) if rate_h > 0 else lo
        cap = min(m, max(lo, cap))
    rev = rate_h * gpu_throughput_fraction(cap, m, lo)
    if rev - q * cap / 1e6 >= -q * node.idle_w / 1e6:
        return rev, cap
    return 0.0, node.idle_w


@dataclass(slots=True)
class _Choice:
    mining_rev_h: float = 0.0
    ai_rev_h: float = 0.0
    mining_w: float = 0.0
    ai_w: float = 0.0

    @property
    def power_w(self) -> float:
        return self.mining_w + self.ai_w

    def mix(self, other: _Choice, theta: float) -> _Choice:
        """``theta`` of self and ``1 − theta`` of other (time-sharing between two choices)."""
        u = 1.0 - theta
        return _Choice(
            theta * self.mining_rev_h + u * other.mining_rev_h,
            theta * self.ai_rev_h + u * other.ai_rev_h,
            theta * self.mining_w + u * other.mining_w,
            theta * self.ai_w + u * other.ai_w,
        )


def _oracle_choice(
    q: float,
    hashprice: float,
    fee: float,
    models: Sequence[tuple[tuple[OperatingPoint, ...], int]],
    occ: Occupancy,
    used: tuple[tuple[int, ...], ...],
    rates_h: Sequence[float],
) -> _Choice:
    ch = _Choice(ai_w=occ.hosts_w)
    for points, count in models:
        best_v, best_p, best_r = -math.inf, 0.0, 0.0
        for p in points:
            r = mining_revenue_usd_per_h(p.hashrate_ths, hashprice, fee)
            v = r - q * p.power_w / 1e6
            if v > best_v:
                best_v, best_p, best_r = v, p.power_w, r
        ch.mining_rev_h += best_r * count
        ch.mining_w += best_p * count
    for t, node in enumerate(occ.types):
        busy = 0
        for c, gpus in enumerate(used[t]):
            if gpus:
                busy += gpus
                r, w = _best_gpu(rates_h[c], q, node)
                ch.ai_rev_h += r * gpus
                ch.ai_w += w * gpus
        ch.ai_w += (occ.gpus_per_type[t] - busy) * node.idle_w
    return ch


def _land(
    q_lo: float,
    lo: _Choice,
    q_hi: float,
    hi: _Choice,
    target_w: float,
    choose: Callable[[float], _Choice],
) -> _Choice:
    """``lo`` (at price ``q_lo``) draws more than ``target_w``, ``hi`` (at ``q_hi``) not more:
    bisect the price, then mix the two bracketing choices to land exactly on the target."""
    for _ in range(60):
        mid = (q_lo + q_hi) / 2.0
        if mid in (q_lo, q_hi):
            break
        c = choose(mid)
        if c.power_w > target_w:
            q_lo, lo = mid, c
        else:
            q_hi, hi = mid, c
    if lo.power_w <= hi.power_w:
        return hi
    theta = (target_w - hi.power_w) / (lo.power_w - hi.power_w)
    return lo.mix(hi, theta)


def oracle_interval(
    q: float,
    limit_w: float,
    choose: Callable[[float], _Choice],
    soft: Sequence[tuple[float, float]] = (),
) -> _Choice:
    """The best choice at energy price ``q`` under the hard ``limit_w`` and ``soft`` targets.

    A soft target ``(target_w, extra)`` (a demand-response event) makes every MWh above it cost
    ``extra`` more (its payment forgone plus its penalty), so the cost of power is convex and
    piecewise linear. Power is non-increasing in price, so the optimum is either the best
    choice at one segment's price or sits on a breakpoint, where the two bracketing choices are
    mixed (the LP relaxation's optimum: it bounds every integer choice). When nothing binds,
    the result is exact."""
    points = sorted((t, m) for t, m in soft if t < limit_w)
    price = q
    prev: _Choice | None = None
    prev_price = q
    lower = -math.inf
    for k in range(len(points) + 1):
        upper = points[k][0] if k < len(points) else limit_w
        c = choose(price)
        if c.power_w <= upper:
            if prev is None or c.power_w >= lower:
                return c
            return _land(prev_price, prev, price, c, lower, choose)
        prev, prev_price = c, price
        if k < len(points):
            lower = points[k][0]
            price += points[k][1]
    # Above the hard limit even at the last segment's price: raise the price until it fits.
    assert prev is not None
    base = prev_price
    step = 1.0
    hi = choose(base + step)
    lo, lo_price = prev, base
    while hi.power_w > limit_w and step < 1e12:
        lo, lo_price = hi, base + step
        step *= 4.0
        hi = choose(base + step)
    if hi.power_w > limit_w:
        return hi  # even everything at its lowest point exceeds the limit: nothing better
    return _land(lo_price, lo, base + step, hi, limit_w, choose)


def _models(site: Site) -> list[tuple[tuple[OperatingPoint, ...], int]]:
    return [(site.ladders[m], n) for m, n in site.miners_by_model.items()]


def run_oracle(site: Site, market: Market, occ: Occupancy) -> Ledger:
    cfg = site.config
    fee = cfg.economics.pool_fee
    rate = cfg.grid.fourcp.rate_usd_per_kw_year
    adder = fourcp_adder_usd_per_mwh(rate, interval_h=market.dt_h)
    rates_h = [job_rate(cfg, c)[0] for c in CLASSES]
    models = _models(site)
    top_w = sum(points[-1].power_w * n for points, n in models)
    ledger = Ledger("oracle", fourcp_rate_usd_per_kw_year=rate, load=site_load_model(cfg))
    for i in range(len(market)):
        q = market.price_usd_per_mwh[i] + (adder if market.peak and market.peak[i] else 0.0)
        hp = market.hashprice[i]
        used = occ.used[i]

        def choose(x: float, hp: float = hp, used: tuple[tuple[int, ...], ...] = used) -> _Choice:
            return _oracle_choice(x, hp, fee, models, occ, used, rates_h)

        soft = []
        for e in market.active_events.get(i, ()):
            event = market.events[e]
            target_w = event_target_w(event, market.event_baseline_w[e])
            if target_w is not None:
                extra = event.payment_usd_per_mwh + event.penalty_usd_per_mwh
                soft.append((target_w, extra))
        ch = oracle_interval(q, site.limit_w, choose, soft)
        if ch.mining_w < top_w - 1e-6:
            ledger.curtailed_intervals += 1
        settle(ledger, market, i, ch.mining_w, ch.ai_w, ch.mining_rev_h, ch.ai_rev_h)
    return ledger


def with_events(market: Market, events: Sequence[GridEvent], site: Site, occ: Occupancy) -> Market:
    """The market with demand-response events in force at the intervals whose start lies in
    their window (the policy sees an event at the interval start, as live at a cycle).

    Every strategy is settled against the same baseline, the site's full load (everything at
    its top point, within the interconnect) at its highest during the event: a strategy cannot
    inflate its own baseline, no strategy draws more than it, and the oracle stays a bound."""
    if not events:
        return market
    rates_h = [job_rate(site.config, c)[0] for c in CLASSES]
    top_w = sum(points[-1].power_w * n for points, n in _models(site))
    active: dict[int, list[int]] = {}
    baselines: list[float] = []
    for e, event in enumerate(events):
        lo, hi = event.start.timestamp(), event.end.timestamp()
        full_w = 0.0
        for i, start_s in enumerate(market.starts_s):
            if lo <= start_s < hi:
                active.setdefault(i, []).append(e)
                ai_w = _full_ai(occ, occ.used[i], rates_h)[0]
                full_w = max(full_w, min(site.limit_w, top_w + ai_w))
        baselines.append(full_w)
    return replace(
        market,
        events=tuple(events),
        event_baseline_w=tuple(baselines),
        active_events={i: tuple(es) for i, es in active.items()},
    )


# --- baselines -----------------------------------------------------------------------------


def _full_ai(
    occ: Occupancy, used: tuple[tuple[int, ...], ...], rates_h: Sequence[float]
) -> tuple[float, float]:
    """(power W, revenue USD/h) of every job running at full cap."""
    w, r = occ.hosts_w, 0.0
    for t, node in enumerate(occ.types):
        busy = sum(used[t])
        # Hosts are counted once for all nodes (occ.hosts_w), so none here.
        w += node_power_w(0.0, occ.gpus_per_type[t], node.idle_w, busy, node.max_cap_w)
        for c, gpus in enumerate(used[t]):
            r += gpus * rates_h[c]
    return w, r


def _run_on_off(
    name: str,
    site: Site,
    market: Market,
    occ: Occupancy,
    mining_on: Callable[[int], bool],
) -> Ledger:
    """Miners at their top profile when ``mining_on(i)``, else asleep; jobs always at full cap.
    When the top load exceeds the interconnect limit, just enough miners sleep to fit."""
    cfg = site.config
    fee = cfg.economics.pool_fee
    rates_h = [job_rate(cfg, c)[0] for c in CLASSES]
    models = _models(site)
    top_w = sum(points[-1].power_w * n for points, n in models)
    top_ths = sum(points[-1].hashrate_ths * n for points, n in models)
    sleep_w = sum(points[0].power_w * n for points, n in models)
    ledger = Ledger(
        name,
        fourcp_rate_usd_per_kw_year=cfg.grid.fourcp.rate_usd_per_kw_year,
        load=site_load_model(cfg),
    )
    # Miners wake and sleep here too, and pay the site model's switching costs for it.
    fleet = [(cfg.miner_models[m], n, site.ladders[m][-1]) for m, n in site.miners_by_model.items()]
    awake = 1.0  # share of every model's miners awake (they start awake, as in the policy)
    for i in range(len(market)):
        ai_w, ai_rev_h = _full_ai(occ, occ.used[i], rates_h)
        if mining_on(i):
            room = site.limit_w - ai_w
            share = (
                1.0
                if top_w + ai_w <= site.limit_w
                else max(0.0, room - sleep_w) / (top_w - sleep_w)
            )
            share = min(1.0, share)
            m_w = sleep_w + share * (top_w - sleep_w)
            m_r = mining_revenue_usd_per_h(share * top_ths, market.hashprice[i], fee)
            if share < 1.0:
                ledger.curtailed_intervals += 1
        else:
            m_w, m_r = sleep_w, 0.0
            share = 0.0
            ledger.curtailed_intervals += 1
        if share != awake:
            for model, count, top in fleet:
                units = count * abs(share - awake)
                if share > awake:
                    ledger.wakes += units
                cost = (
                    wake_cost(cfg, model, top, market.hashprice[i])
                    if share > awake
                    else sleep_cost(model)
                ).times(units)
                ledger.book_switch(cost.lost_usd, cost.energy_wh, market.price_usd_per_mwh[i])
            awake = share
        settle(ledger, market, i, m_w, ai_w, m_r, ai_rev_h)
    return ledger


def run_always_on(site: Site, market: Market, occ: Occupancy) -> Ledger:
    return _run_on_off("always_on", site, market, occ, lambda i: True)


def strike_states(
    market: Market,
    strike_usd_per_mwh: float | Sequence[float],
    n_above: int,
    n_below: int = 4,
) -> list[bool]:
    """Mining on/off per interval under Foreman's rule, from settled prices only: off after
    ``n_above`` consecutive settled intervals above the strike, on again after ``n_below``
    consecutive ones at or below it. The strike is one price, or one per interval (the fleet's
    breakeven at each day's hashprice)."""
    strikes = (
        [strike_usd_per_mwh] * len(market)
        if isinstance(strike_usd_per_mwh, int | float)
        else list(strike_usd_per_mwh)
    )
    on = True
    above = below = 0
    states: list[bool] = []
    last_start: float | None = None
    for i in range(len(market)):
        seen = market.seen_price[i]
        # Count each settled interval once (a repeated view of the same price adds nothing).
        if seen is not None and seen[1] != last_start:
            last_start = seen[1]
            if seen[0] > strikes[i]:
                above, below = above + 1, 0
            else:
                above, below = 0, below + 1
            if on and above >= n_above:
                on = False
            elif not on and below >= n_below:
                on = True
        states.append(on)
    return states


def strike_prices(site: Site, market: Market) -> list[float]:
    """The fleet's breakeven at each interval's hashprice (a daily series moves it daily)."""
    memo: dict[float, float] = {}
    out = []
    for hp in market.hashprice:
        if hp not in memo:
            memo[hp] = site.fleet_breakeven_usd_per_mwh(hp)
        out.append(memo[hp])
    return out


def fourcp_flagged(site: Site, market: Market) -> list[bool]:
    """Intervals whose forecast 4CP risk the site acts on (the policy's own rule)."""
    fourcp = site.config.grid.fourcp
    return [fourcp_risk_priced(fourcp, r) > 0 for r in market.fourcp_risk] or [False] * len(market)


def run_strike(
    site: Site,
    market: Market,
    occ: Occupancy,
    strike_usd_per_mwh: float | Sequence[float],
    n_above: int,
    *,
    sit_out_4cp: bool = False,
) -> Ledger:
    """Foreman's strike rule; ``sit_out_4cp`` also sleeps every miner in the intervals flagged
    as 4CP risks (``strike+4cp``). GPU caps stay at nameplate and no job is ever suspended."""
    states = strike_states(market, strike_usd_per_mwh, n_above)
    name = "strike"
    if sit_out_4cp:
        name = "strike+4cp"
        states = [on and not f for on, f in zip(states, fourcp_flagged(site, market), strict=True)]
    return _run_on_off(name, site, market, occ, lambda i: states[i])


# --- the live policy -----------------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    spec: TraceJob
    node: int
    rate_h: float  # USD per GPU-hour
    penalty_usd: float
    checkpoint_s: float
    state: JobState
    since: datetime
    run_start_s: float  # when it last started or resumed running (for lost work)
    view: JobView | None = None  # cached until the job's state changes
    deadline: datetime | None = None  # deferrable: its work done by then
    left_gpu_h: float = 0.0  # deferrable: GPU-hours of work still to run


class PolicyReplay:
    """Plays the devices for :func:`decide`: applies each plan as commanded, settles it."""

    def __init__(
        self,
        site: Site,
        market: Market,
        trace: Sequence[TraceJob],
        decide: Decide,
        horizon: HorizonAt | None = None,
    ):
        self.site = site
        self.market = market
        self.decide = decide
        self.horizon = horizon
        cfg = site.config
        self.cfg = cfg
        self.fee = cfg.economics.pool_fee
        self.ledger = Ledger(
            "policy",
            fourcp_rate_usd_per_kw_year=cfg.grid.fourcp.rate_usd_per_kw_year,
            load=site_load_model(cfg),
        )
        self.times = [datetime.fromtimestamp(s, tz=UTC) for s in market.starts_s]
        t0 = self.times[0] if self.times else datetime(2000, 1, 1, tzinfo=UTC)
        # Devices start as the agent would find a settled, running site: miners at their top
        # profile for a day already, so no dwell time holds the first decision.
        t0 -= timedelta(days=1)
        self.views: list[MinerView] = []
        self.pos: dict[str, int] = {}
        for k, b in enumerate(site.blocks):
            points = site.ladders[b.model]
            self.views.append(self._view(b, points, points[-1], t0))
            self.pos[b.device_id] = k
        self.point_idx = [len(site.ladders[b.model]) - 1 for b in site.blocks]
        self.mining_w = sum(v.points[-1].power_w * v.count for v in self.views)
        self.mining_ths = sum(v.points[-1].hashrate_ths * v.count for v in self.views)
        self.miners_tuple: tuple[MinerView, ...] = tuple(self.views)
        # GPU nodes
        self.caps = [n.max_cap_w for n in site.nodes]
        self.node_pos = {nid: k for k, nid in enumerate(site.node_ids)}
        self.node_jobs: list[dict[str, _Job]] = [{} for _ in site.nodes]
        self.node_views: list[GpuNodeView | None] = [None] * len(site.nodes)
        self.node_power = [0.0] * len(site.nodes)
        self.node_rev = [0.0] * len(site.nodes)
        self.ai_w = 0.0
        self.ai_rev_h = 0.0
        self.jobs: dict[str, _Job] = {}
        self.deferrable: dict[str, _Job] = {}  # deferrable jobs with work left
        self.starts: dict[int, list[TraceJob]] = {}
        self.ends: dict[int, list[TraceJob]] = {}
        for job in trace:
            self.starts.setdefault(job.start_i, []).append(job)
            self.ends.setdefault(job.end_i, []).append(job)
        self.nodes_tuple: tuple[GpuNodeView, ...] = ()
        self.event_seen_w: dict[int, float] = {}
        # The live ramp bucket, asked once per market interval: it holds one interval's ramp.
        self.ramp = RampBudget.of(cfg)
        self.ramp_cap_w = ramp_capacity_w(cfg, market.interval_s)

    def _view(
        self, b: MinerBlock, points: tuple[OperatingPoint, ...], at: OperatingPoint, since: datetime
    ) -> MinerView:
        return MinerView(
            device_id=b.device_id,
            model=b.model,
            points=points,
            nameplate_w=self.site.nameplates[b.model],
            commanded=at.name,
            commanded_since=since,
            # Devices obey in the backtest: telemetry shows the commanded point.
            measured_power_w=at.power_w,
            measured_hashrate_ths=at.hashrate_ths,
            reading_age_s=0.0,
            circuit=b.circuit,
            count=b.count,
        )

    def _node_power(self, k: int) -> tuple[float, float]:
        node = self.site.nodes[k]
        cap = self.caps[k]
        running = 0
        rev = 0.0
        frac = gpu_throughput_fraction(cap, node.max_cap_w, node.min_cap_w)
        for job in self.node_jobs[k].values():
            if job.state == JobState.RUNNING:
                running += job.spec.gpus
                rev += job.rate_h * job.spec.gpus * frac
        return node_power_w(node.host_overhead_w, node.gpus, node.idle_w, running, cap), rev

    def _node_view(self, k: int) -> GpuNodeView:
        node = self.site.nodes[k]
        jobs = []
        for j in self.node_jobs[k].values():
            if j.view is None:
                j.view = JobView(
                    job_id=j.spec.job_id,
                    job_class=j.spec.job_class,
                    state=j.state,
                    gpus=j.spec.gpus,
                    node_id=self.site.node_ids[k],
                    usd_per_gpu_hour=j.rate_h,
                    penalty_usd=j.penalty_usd,
                    commanded_since=j.since,
                    last_checkpoint_at=None,
                    deadline=j.deadline,
                    remaining_gpu_h=j.left_gpu_h,
                )
            jobs.append(j.view)
        return GpuNodeView(
            device_id=self.site.node_ids[k],
            gpu_count=node.gpus,
            min_cap_w=node.min_cap_w,
            max_cap_w=node.max_cap_w,
            idle_w=node.idle_w,
            host_overhead_w=node.host_overhead_w,
            cap_w=self.caps[k],
            jobs=tuple(jobs),
            measured_power_w=self.node_power[k],
            reading_age_s=0.0,
            circuit=node.circuit,
        )

    def _refresh_nodes(self, dirty: set[int]) -> None:
        """Recompute power, revenue and view of the nodes whose jobs or cap changed."""
        for k in dirty:
            self.node_power[k], self.node_rev[k] = self._node_power(k)
            self.node_views[k] = self._node_view(k)
        self.nodes_tuple = tuple(v for v in self.node_views if v is not None)
        self.ai_w = sum(self.node_power)
        self.ai_rev_h = sum(self.node_rev)
        dirty.clear()

    def _interrupt(self, job: _Job, now_s: float) -> None:
        """A suspension, charged by the site model: the work since the checkpoint (at the cap
        it ran at) and the contract's penalty."""
        led = self.ledger
        led.interruptions += 1
        node = self.site.nodes[job.node]
        rev_h = ai_revenue_usd_per_h(
            job.spec.gpus, job.rate_h, self.caps[job.node], node.max_cap_w, node.min_cap_w
        )
        age = checkpoint_age_s(now_s, job.run_start_s, None, job.checkpoint_s)
        cost = suspend_cost(job.penalty_usd, rev_h, age)
        led.sla_penalty_usd += job.penalty_usd
        led.lost_work_usd += cost.lost_usd - job.penalty_usd

    def _resume(self, job: _Job, price: float) -> None:
        cost = resume_cost(contract(self.cfg, job.spec.job_class), job.spec.gpus, job.rate_h)
        self.ledger.book_switch(cost.lost_usd, cost.energy_wh, price)

    def run(self) -> Ledger:
        market, cfg, site = self.market, self.cfg, self.site
        led = self.ledger
        last_site_w: float | None = None
        dirty = set(range(len(site.nodes)))
        top_w = sum(site.ladders[b.model][-1].power_w * b.count for b in site.blocks)
        rates = {c: job_rate(cfg, c) for c in CLASSES}
        for i in range(len(market)):
            now = self.times[i]
            now_s = market.starts_s[i]
            for job in self.ends.pop(i, ()):
                self.node_jobs[job.node].pop(job.job_id, None)
                if self.jobs.pop(job.job_id, None) is not None and job.deferrable:
                    led.deadlines_missed += 1  # its deadline came with work left
                    self.deferrable.pop(job.job_id, None)
                dirty.add(job.node)
            for job in self.starts.pop(i, ()):
                rate_h, penalty, ckpt = rates[job.job_class]
                j = _Job(job, job.node, rate_h, penalty, ckpt, JobState.RUNNING, now, now_s)
                if job.deferrable:
                    j.deadline = datetime.fromtimestamp(
                        market.starts_s[0] + job.end_i * market.interval_s, tz=UTC
                    )
                    j.left_gpu_h = job.gpus * job.work_i * market.dt_h
                    self.deferrable[job.job_id] = j
                    led.deferrable_jobs += 1
                self.node_jobs[job.node][job.job_id] = j
                self.jobs[job.job_id] = j
                dirty.add(job.node)
            if dirty:
                self._refresh_nodes(dirty)
            seen = market.seen_price[i]
            # The previous interval's price, settled as this one starts: one interval old.
            price = (
                None
                if seen is None
                else (seen[0], datetime.fromtimestamp(seen[1], tz=UTC), now_s - seen[1])
            )
            plan_now = None
            if self.horizon is not None:
                awake: dict[str, int] = {}
                for v in self.views:
                    if v.commanded != v.points[0].name:
                        awake[v.model] = awake.get(v.model, 0) + v.count
                jobs = deferrable_jobs(cfg, self.nodes_tuple) if self.deferrable else ()
                plan_now = self.horizon(i, awake, self.ai_w, jobs)
            snap = assemble_snapshot(
                now,
                horizon=plan_now,
                price=price,
                hashprice_usd_per_ph_day=market.hashprice[i],
                miners=self.miners_tuple,
                gpu_nodes=self.nodes_tuple,
                day_ahead_usd_per_mwh=market.day_ahead[i] if market.day_ahead else None,
                fourcp=(
                    market.fourcp_risk[i] if market.fourcp_risk else 0.0,
                    market.fourcp_reason[i] if market.fourcp_reason else "",
                ),
                site_power_w=last_site_w,
                device_power_w=None if last_site_w is None else self.mining_w + self.ai_w,
                load_model=led.load,
                ramp_headroom_w=self.ramp.headroom_w(now_s, self.ramp_cap_w),
                events=self._events(i, last_site_w),
            )
            plan = self.decide(snap, cfg, now)
            self.ramp.spend(sum(a.delta_power_w for a in plan.actions if not a.sheds))
            # Apply the whole target, not only the actions: a plan is its operating points.
            self._apply_miners(plan, now, i)
            if plan.gpu_caps_w or plan.job_states:
                self._apply_gpus(plan, now, now_s, dirty, market.price_usd_per_mwh[i])
                if dirty:
                    self._refresh_nodes(dirty)
            ai_w, ai_rev = self.ai_w, self.ai_rev_h
            if self.mining_w < top_w - 1e-6:
                led.curtailed_intervals += 1
            settle(
                led,
                market,
                i,
                self.mining_w,
                ai_w,
                mining_revenue_usd_per_h(self.mining_ths, market.hashprice[i], self.fee),
                ai_rev,
            )
            if self.deferrable:
                self._progress(market.dt_h, dirty)
            last_site_w = led.load.site_w(self.mining_w + ai_w)
            if last_site_w > site.limit_w + 1e-6:
                raise BacktestError(
                    f"policy planned {last_site_w / 1000:,.1f} kW at {now:%Y-%m-%d %H:%M}Z, "
                    f"above the interconnect limit {site.limit_w / 1000:,.1f} kW"
                )
        return led

    def _progress(self, dt_h: float, dirty: set[int]) -> None:
        """Deferrable work done this interval, at the throughput of its node's cap; a job whose
        work is done leaves (its GPUs idle until its window ends)."""
        for job_id, job in list(self.deferrable.items()):
            if job.state is not JobState.RUNNING:
                continue
            node = self.site.nodes[job.node]
            frac = gpu_throughput_fraction(self.caps[job.node], node.max_cap_w, node.min_cap_w)
            job.left_gpu_h -= job.spec.gpus * dt_h * frac
            job.view = None
            dirty.add(job.node)
            if job.left_gpu_h <= 1e-9:
                del self.deferrable[job_id]
                self.node_jobs[job.node].pop(job_id, None)
                self.jobs.pop(job_id, None)
                self.ledger.deferrable_done += 1
        if dirty:
            self._refresh_nodes(dirty)

    def _events(self, i: int, site_w: float | None) -> tuple[ActiveEvent, ...]:
        """Events in force now; each keeps the site load measured when it was first seen
        (as live does for "shed Y kW" targets)."""
        active = self.market.active_events.get(i)
        if not active:
            return ()
        out = []
        for e in active:
            if e not in self.event_seen_w:
                self.event_seen_w[e] = site_w if site_w is not None else self.mining_w + self.ai_w
            out.append(ActiveEvent(self.market.events[e], self.event_seen_w[e]))
        return tuple(out)

    def _apply_miners(self, plan: Plan, now: datetime, i: int) -> None:
        changed = False
        models = self.cfg.miner_models
        price = self.market.price_usd_per_mwh[i]
        for device_id, point in plan.miner_points.items():
            k = self.pos.get(device_id)
            if k is None:
                raise BacktestError(f"plan names unknown miner {device_id!r}")
            view = self.views[k]
            if view.commanded == point:
                continue
            idx = next((n for n, p in enumerate(view.points) if p.name == point), None)
            if idx is None:
                raise BacktestError(f"plan sets {device_id} to unknown point {point!r}")
            old = view.points[self.point_idx[k]]
            new = view.points[idx]
            self.mining_w += (new.power_w - old.power_w) * view.count
            self.mining_ths += (new.hashrate_ths - old.hashrate_ths) * view.count
            if (old.name == SLEEP) != (new.name == SLEEP):
                model = models[view.model]
                cost = (
                    sleep_cost(model)
                    if new.name == SLEEP
                    else wake_cost(self.cfg, model, new, self.market.hashprice[i])
                ).times(view.count)
                self.ledger.book_switch(cost.lost_usd, cost.energy_wh, price)
                if new.name != SLEEP:
                    self.ledger.wakes += view.count
            self.point_idx[k] = idx
            self.views[k] = self._view(self.site.blocks[k], view.points, new, now)
            changed = True
        if changed:
            self.miners_tuple = tuple(self.views)

    def _apply_gpus(
        self, plan: Plan, now: datetime, now_s: float, touched: set[int], price: float
    ) -> None:
        # Jobs first: a suspended job loses work done at the cap it ran at.
        for job_id, state in plan.job_states.items():
            job = self.jobs.get(job_id)
            if job is None or job.state == state:
                continue  # a job that just ended, or no change
            if job.state == JobState.RUNNING:
                self._interrupt(job, now_s)
            elif state == JobState.RUNNING:
                job.run_start_s = now_s
                self._resume(job, price)
            job.state = state
            job.since = now
            job.view = None
            touched.add(job.node)
        for node_id, cap in plan.gpu_caps_w.items():
            k = self.node_pos.get(node_id)
            if k is None:
                raise BacktestError(f"plan names unknown GPU node {node_id!r}")
            node = self.site.nodes[k]
            cap = min(node.max_cap_w, max(node.min_cap_w, cap))
            if cap != self.caps[k]:
                self.caps[k] = cap
                touched.add(k)


def run_policy(
    site: Site,
    market: Market,
    trace: Sequence[TraceJob],
    decide: Decide,
    horizon: HorizonAt | None = None,
) -> Ledger:
    return PolicyReplay(site, market, trace, decide, horizon).run()
