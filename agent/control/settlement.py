"""Settlement: the one place that turns power, prices and events into money.

Energy cost, the 4CP charge of a true peak interval (and its expected value as an energy price
adder), an event's site-load target, what a site delivered against it and what it fell short,
and the :class:`Ledger` that books an interval. The live policy prices its choices with these
functions, the journal's event report settles events with them, the backtest and the demo book
every interval through :class:`Ledger`, and the live agent's 4CP account (the site's demand in
each interval flagged as a 4CP risk) is summed up by :func:`fourcp_figures`. The per-hour
revenue rates are in :mod:`agent.control.economics`; the site's physics and job contracts in
:mod:`agent.control.site`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.control.config import FourCpConfig
from agent.control.cooling import SiteLoadModel
from agent.control.fourcp import CENTRAL
from drivers.grid.base import GridEvent

# ERCOT measures 4CP on 15-minute settlement intervals.
FOURCP_INTERVAL_H = 0.25


# --- events --------------------------------------------------------------------------------


def event_target_w(event: GridEvent, baseline_w: float) -> float | None:
    """The site-load ceiling an event asks for: ``max_site_kw``, or the baseline less
    ``shed_kw``; when an event carries both, the stricter (lower) one binds. Never negative;
    ``None`` when the event sets no target."""
    limits = []
    if event.max_site_kw is not None:
        limits.append(event.max_site_kw * 1000.0)
    if event.shed_kw is not None:
        limits.append(max(0.0, baseline_w - event.shed_kw * 1000.0))
    return min(limits) if limits else None


def shortfall_w(measured_w: float, target_w: float) -> float:
    """Load above an event's target (penalised)."""
    return max(0.0, measured_w - target_w)


def delivered_w(baseline_w: float, measured_w: float, target_w: float) -> float:
    """The reduction below the baseline, counted down to the target (paid)."""
    return max(0.0, baseline_w - max(measured_w, target_w))


# --- 4CP -----------------------------------------------------------------------------------


def fourcp_usd_per_kw(rate_usd_per_kw_year: float) -> float:
    """One true peak interval's share of next year's charge: a quarter of the annual rate."""
    return rate_usd_per_kw_year / 4.0


def fourcp_charge_usd(rate_usd_per_kw_year: float, site_w: float) -> float:
    """The 4CP charge of drawing ``site_w`` at the meter in one true peak interval."""
    return fourcp_usd_per_kw(rate_usd_per_kw_year) * site_w / 1000.0


def fourcp_adder_usd_per_mwh(
    rate_usd_per_kw_year: float, risk: float = 1.0, interval_h: float = FOURCP_INTERVAL_H
) -> float:
    """Expected 4CP charge of 1 kW held through one interval, per MWh it draws there: a true
    peak (``risk`` 1) costs ``rate / 4`` per kW, spread over 1 kW × ``interval_h``."""
    risk = min(max(risk, 0.0), 1.0)
    return risk * (fourcp_usd_per_kw(rate_usd_per_kw_year) * 1000.0 / interval_h)


def fourcp_risk_priced(config: FourCpConfig, risk: float) -> float:
    """The probability of a true peak the site acts on: the forecast's risk calibrated by its
    historical hit rate (``risk × hit_rate``), when 4CP is enabled and the risk reaches the
    threshold (the forecaster's noise floor), else 0. The policy and the planner price it; the
    ``strike+4cp`` baseline sits out the intervals where it is not 0."""
    if config.enabled and risk > 0 and risk >= config.risk_threshold:
        return min(risk, 1.0) * config.hit_rate
    return 0.0


def fourcp_step_adders(
    config: FourCpConfig, risk: float, steps: int, step_s: float
) -> tuple[float, ...]:
    """The horizon planner's expected 4CP charge per MWh at each of its ``steps``, from the same
    priced risk the policy adds now (:func:`fourcp_risk_priced`). The estimator's risk covers
    the 15-minute interval now starting and does not look ahead, so the step that holds it
    carries that interval's share of it (``interval / step``) and later steps none."""
    priced = fourcp_risk_priced(config, risk)
    if steps <= 0 or priced <= 0:
        return ()
    share = min(1.0, FOURCP_INTERVAL_H * 3600.0 / step_s) if step_s > 0 else 1.0
    first = fourcp_adder_usd_per_mwh(config.rate_usd_per_kw_year, priced) * share
    return (first,) + (0.0,) * (steps - 1)


@dataclass(frozen=True, slots=True)
class FourCpInterval:
    """The site's demand in one 15-minute interval flagged as a 4CP risk (market clock), as
    observed so far: power at the meter integrated over the seconds seen, and how many of those
    seconds the meter itself was trusted (the rest: devices + cooling + fallback margin)."""

    start: datetime
    watt_seconds: float
    seconds: float
    metered_s: float
    risk: float  # the highest 4CP risk priced in the interval

    @property
    def demand_w(self) -> float:
        return self.watt_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def source(self) -> str:
        """``meter`` when every second seen was metered, ``fallback`` when none was."""
        if self.metered_s >= self.seconds:
            return "meter"
        return "fallback" if self.metered_s <= 0 else "mixed"

    def add(self, site_w: float, seconds: float, metered: bool, risk: float) -> FourCpInterval:
        return FourCpInterval(
            self.start,
            self.watt_seconds + site_w * seconds,
            self.seconds + seconds,
            self.metered_s + (seconds if metered else 0.0),
            max(self.risk, risk),
        )


@dataclass(frozen=True, slots=True)
class FourCpMonth:
    """One 4CP month: the flagged interval where the site drew most, and its charge if that
    interval is the month's system peak (the estimate: the true peak is one of the flagged
    intervals when the forecast is right, and the site's demand there is at most this)."""

    month: str  # Central calendar month, "2023-06"
    peak: FourCpInterval
    intervals: int  # flagged intervals recorded in the month
    charge_usd: float


@dataclass(frozen=True, slots=True)
class FourCpFigures:
    """The running 4CP account: per month, per season (the year's four months), and the latest
    interval recorded."""

    rate_usd_per_kw_year: float
    months: tuple[FourCpMonth, ...] = ()
    seasons: tuple[tuple[str, float], ...] = ()  # (year, estimated transmission charge USD)
    latest: FourCpInterval | None = None


def fourcp_month(start: datetime) -> str:
    """The 4CP month (Central time) of an interval starting at ``start``."""
    return f"{start.astimezone(CENTRAL):%Y-%m}"


def fourcp_figures(
    intervals: Sequence[FourCpInterval], rate_usd_per_kw_year: float
) -> FourCpFigures:
    """Sum up flagged intervals: each month's peak demand and its charge at
    :func:`fourcp_charge_usd` (the rule the backtest's :class:`Ledger` books), and each season's
    estimated transmission charge (the sum of its months)."""
    by_month: dict[str, list[FourCpInterval]] = {}
    for iv in intervals:
        if iv.seconds > 0:
            by_month.setdefault(fourcp_month(iv.start), []).append(iv)
    months = []
    seasons: dict[str, float] = {}
    for month, ivs in sorted(by_month.items()):
        peak = max(ivs, key=lambda iv: (iv.demand_w, iv.start))
        charge = fourcp_charge_usd(rate_usd_per_kw_year, peak.demand_w)
        months.append(FourCpMonth(month, peak, len(ivs), charge))
        seasons[month[:4]] = seasons.get(month[:4], 0.0) + charge
    latest = max(intervals, key=lambda iv: iv.start, default=None)
    return FourCpFigures(rate_usd_per_kw_year, tuple(months), tuple(seasons.items()), latest)


# --- booking an interval -------------------------------------------------------------------


@dataclass(slots=True)
class Ledger:
    """Money and energy of one strategy (or of the demo's site), interval by interval, with
    its power per interval for plots."""

    name: str
    mining_usd: float = 0.0
    ai_usd: float = 0.0
    demand_response_usd: float = 0.0
    energy_cost_usd: float = 0.0
    fourcp_cost_usd: float = 0.0
    lost_work_usd: float = 0.0
    sla_penalty_usd: float = 0.0
    dr_penalty_usd: float = 0.0
    # Waking and sleeping miners and resuming jobs (agent.control.site costs; a suspension's
    # lost work and penalty are booked above): what was lost, the extra energy, and both in USD
    # at the real price.
    switching_usd: float = 0.0
    wakes: float = 0.0  # miners woken (units; a share of a block counts pro rata)
    switching_lost_usd: float = 0.0
    switching_energy_mwh: float = 0.0
    energy_mwh: float = 0.0
    interruptions: int = 0
    curtailed_intervals: int = 0  # intervals with some mining capacity not at its top point
    # Deferrable training: jobs seen, finished, and finished late or not at all.
    deferrable_jobs: int = 0
    deferrable_done: int = 0
    deadlines_missed: int = 0
    fourcp_rate_usd_per_kw_year: float = 0.0
    # Devices -> power at the meter (cooling, base load): what is paid. Identity by default.
    load: SiteLoadModel = field(default_factory=SiteLoadModel)
    mining_w: list[float] = field(default_factory=list)
    ai_w: list[float] = field(default_factory=list)
    # Revenue − energy cost − 4CP of each interval (penalties are booked per event, not here).
    interval_margin_usd: list[float] = field(default_factory=list)

    @property
    def penalties_usd(self) -> float:
        return self.lost_work_usd + self.sla_penalty_usd + self.dr_penalty_usd

    @property
    def revenue_usd(self) -> float:
        return self.mining_usd + self.ai_usd + self.demand_response_usd

    @property
    def profit_usd(self) -> float:
        return (
            self.revenue_usd
            - self.energy_cost_usd
            - self.fourcp_cost_usd
            - self.penalties_usd
            - self.switching_usd
        )

    def book_switch(self, lost_usd: float, energy_wh: float, price_usd_per_mwh: float) -> None:
        """Book one switch: revenue or work lost, and extra energy at the interval's price."""
        mwh = energy_wh / 1e6
        self.switching_lost_usd += lost_usd
        self.switching_energy_mwh += mwh
        self.energy_mwh += mwh
        self.switching_usd += lost_usd + mwh * price_usd_per_mwh

    def settle(
        self,
        dt_h: float,
        price_usd_per_mwh: float,
        mining_w: float,
        ai_w: float,
        mining_usd_per_h: float,
        ai_usd_per_h: float,
        *,
        peak: bool = False,
        events: Sequence[tuple[GridEvent, float]] = (),
        keep_series: bool = True,
    ) -> None:
        """Book one interval of ``dt_h`` hours at its real price: energy, revenue, the 4CP
        charge when it is a true peak, and every event in force ``(event, baseline_w)``. The
        devices' power (``mining_w + ai_w``) is paid at the meter (:attr:`load`)."""
        site_w = self.load.site_w(mining_w + ai_w)
        mwh = site_w / 1e6 * dt_h
        self.energy_mwh += mwh
        cost = mwh * price_usd_per_mwh
        self.energy_cost_usd += cost
        self.mining_usd += mining_usd_per_h * dt_h
        self.ai_usd += ai_usd_per_h * dt_h
        if peak:
            fourcp = fourcp_charge_usd(self.fourcp_rate_usd_per_kw_year, site_w)
            self.fourcp_cost_usd += fourcp
            cost += fourcp
        dr = 0.0
        for event, baseline_w in events:
            target_w = event_target_w(event, baseline_w)
            if target_w is None:
                continue
            delivered_mwh = delivered_w(baseline_w, site_w, target_w) / 1e6 * dt_h
            shortfall_mwh = shortfall_w(site_w, target_w) / 1e6 * dt_h
            paid = delivered_mwh * event.payment_usd_per_mwh
            penalty = shortfall_mwh * event.penalty_usd_per_mwh
            self.demand_response_usd += paid
            self.dr_penalty_usd += penalty
            dr += paid - penalty
        if keep_series:
            self.interval_margin_usd.append((mining_usd_per_h + ai_usd_per_h) * dt_h - cost + dr)
            self.mining_w.append(mining_w)
            self.ai_w.append(ai_w)
