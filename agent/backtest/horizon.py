"""The horizon planner in the backtest, causally: a day's plan from the day-ahead prices.

ERCOT's day-ahead market clears the day before, so at the first interval of each UTC day (and
at the first interval of the period) :class:`DayAheadPlanner` plans the next ``hours`` from the
day-ahead prices of those hours alone — one hourly price per interval, so a day is a small MILP
(few variables; a year is 365 solves). When the forecast proves wrong — at an hour's start the
last settled real-time price lies inside a block's band, where the policy would hold it against
the rule — it re-plans the rest of the day with that real-time price for the hour now starting
(the price holds until the next settles), so a spike that persists is no longer ridden through
on the strength of a stale forecast. The miner blocks are the site's models with the units
awake now; the AI load now is taken as flat over the horizon (the replay's job trace is not
known ahead). The 4CP risk is the live estimator's, priced as the policy prices it (calibrated by
its hit rate, :func:`agent.control.settlement.fourcp_step_adders`): it works on the system load
as it arrives, not a day ahead, so it weighs on the hour now starting only, and a plan is remade
when a 4CP flag starts or ends. A failed solve leaves the day without a plan: the rule alone
decides, and the reason is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agent.backtest.engine import Market, Site
from agent.control.planner import (
    DeferrableJob,
    HorizonInput,
    HorizonPlan,
    MinerBlock,
    plan_horizon,
)
from agent.control.settlement import fourcp_risk_priced, fourcp_step_adders
from agent.control.site import planner_switching


@dataclass(slots=True)
class PlannerStats:
    """Solve times and statuses of every plan of a run (for the JSON and the bench)."""

    seconds: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "<day>: <reason>", first few
    replans: int = 0  # plans within a day, from a real-time price the forecast missed
    cpu_s: float = 0.0  # CPU time of every solve (the wall time counts other processes' turns)

    def add(self, plan: HorizonPlan, day: str) -> None:
        self.seconds.append(plan.solve_s)
        self.statuses[plan.status.value] = self.statuses.get(plan.status.value, 0) + 1
        if not plan.usable and len(self.failures) < 20:
            self.failures.append(f"{day}: {plan.reason}")

    def summary(self) -> dict[str, object]:
        s = self.seconds
        return {
            "solves": len(s),
            "replans": self.replans,
            "seconds_total": round(sum(s), 3),
            "seconds_mean": round(sum(s) / len(s), 5) if s else None,
            "seconds_max": round(max(s), 5) if s else None,
            "cpu_seconds_total": round(self.cpu_s, 3),
            "statuses": dict(sorted(self.statuses.items())),
            "failures": list(self.failures),
        }


JOB_REPLAN_H = 2.0  # new deferrable work is planned at most this often (hours)


class DayAheadPlanner:
    """``horizon(i, awake_by_model, ai_w)`` for :class:`agent.backtest.engine.PolicyReplay`."""

    def __init__(
        self,
        site: Site,
        market: Market,
        *,
        hours: int = 24,
        time_limit_s: float = 2.0,
    ) -> None:
        if not market.day_ahead:
            raise ValueError("the day-ahead planner needs day-ahead prices")
        self.site = site
        self.market = market
        cfg = site.config
        # The site model's switching costs, per miner model (agent.control.site).
        self.switching = {
            m: planner_switching(cfg, cfg.miner_models[m]) for m in site.miners_by_model
        }
        self.hours = hours
        self.time_limit_s = time_limit_s
        self.stats = PlannerStats()
        self.plans: list[HorizonPlan] = []
        self.current: HorizonPlan | None = None
        self._day: int | None = None
        self._end = 0
        self._planned_jobs: frozenset[str] = frozenset()
        self._plan_i = 0
        self.per_hour = max(1, round(3600.0 / market.interval_s))
        # A curtailment commits at least the minimum off time, and at least one interval.
        self.spike_h = max(cfg.control.min_off_s, market.interval_s) / 3600.0

    def __call__(
        self,
        i: int,
        awake: Mapping[str, int],
        ai_w: float,
        jobs: tuple[DeferrableJob, ...] = (),
    ) -> HorizonPlan | None:
        day = int(self.market.starts_s[i] // 86400)
        if day != self._day:
            self._day = day
            self._end = min(len(self.market), i + self.hours * self.per_hour)
            self.current = self._plan(i, awake, ai_w, self._end, jobs=jobs)
        elif self._flag_changes(i):
            self.stats.replans += 1
            self.current = self._plan(i, awake, ai_w, self._end, jobs=jobs)
        elif self._hour_starts(i):
            seen = self.market.seen_price[i]
            missed = seen is not None and self._inside_band(i, seen[0])
            # Deferrable work that arrived since the last plan is planned at an hour's start,
            # at most every JOB_REPLAN_H hours (a solve with jobs takes about 0.1 s, and a year
            # has thousands of arrivals); until then it waits, as the policy does with work a
            # plan in force does not know yet (its deadline guard still runs it if due).
            since_h = (i - self._plan_i) / self.per_hour
            arrived = since_h >= JOB_REPLAN_H and any(
                j.job_id not in self._planned_jobs for j in jobs
            )
            if missed or arrived:
                self.stats.replans += 1
                realtime = seen[0] if missed and seen is not None else None
                self.current = self._plan(i, awake, ai_w, self._end, realtime, jobs)
        return self.current

    def _flag_changes(self, i: int) -> bool:
        """A 4CP flag starts or ends at ``i`` (the priced risk turns nonzero or zero)."""
        risk = self.market.fourcp_risk
        if not risk or i == 0:
            return False
        fourcp = self.site.config.grid.fourcp
        return (fourcp_risk_priced(fourcp, risk[i]) > 0) != (
            fourcp_risk_priced(fourcp, risk[i - 1]) > 0
        )

    def _hour_starts(self, i: int) -> bool:
        return round(self.market.starts_s[i] / self.market.interval_s) % self.per_hour == 0

    def _inside_band(self, i: int, price: float) -> bool:
        plan = self.current
        now = datetime.fromtimestamp(self.market.starts_s[i], tz=UTC)
        k = None if plan is None else plan.index_at(now)
        if plan is None or k is None:
            return False
        return any(
            b.restore_below_usd_per_mwh < price < b.curtail_above_usd_per_mwh for b in plan.bands[k]
        )

    def _plan(
        self,
        i: int,
        awake: Mapping[str, int],
        ai_w: float,
        end: int,
        realtime: float | None = None,
        jobs: tuple[DeferrableJob, ...] = (),
    ) -> HorizonPlan | None:
        m, site, cfg = self.market, self.site, self.site.config
        self._planned_jobs = frozenset(j.job_id for j in jobs)
        self._plan_i = i
        # The AI load now less the deferrable jobs running in it: the plan places those.
        base_w = ai_w - sum(j.gpus * j.gpu_w for j in jobs if j.running)
        idx = range(i, max(end, i + 1), self.per_hour)
        prices = [m.day_ahead[k] for k in idx]
        day = datetime.fromtimestamp(m.starts_s[i], tz=UTC).strftime("%Y-%m-%d")
        if any(p is None or not math.isfinite(p) for p in prices):
            self.stats.statuses["no_day_ahead"] = self.stats.statuses.get("no_day_ahead", 0) + 1
            return None
        blocks = tuple(
            MinerBlock(
                model, count, site.ladders[model], self.switching[model], awake.get(model, 0)
            )
            for model, count in site.miners_by_model.items()
        )
        inp = HorizonInput(
            at=datetime.fromtimestamp(m.starts_s[i], tz=UTC),
            starts=tuple(datetime.fromtimestamp(m.starts_s[k], tz=UTC) for k in idx),
            interval_s=m.interval_s * self.per_hour,
            price_usd_per_mwh=tuple(p for p in prices if p is not None),
            hashprice_usd_per_ph_day=m.hashprice[i],
            pool_fee=cfg.economics.pool_fee,
            blocks=blocks,
            limit_w=site.limit_w,
            base_load_w=(base_w,) * len(prices),
            jobs=jobs,
            min_on_s=cfg.control.min_on_s,
            min_off_s=cfg.control.min_off_s,
            spike_h=self.spike_h,
            time_limit_s=self.time_limit_s,
            realtime_usd_per_mwh=realtime,
            fourcp_adder_usd_per_mwh=fourcp_step_adders(
                cfg.grid.fourcp,
                m.fourcp_risk[i] if m.fourcp_risk else 0.0,
                len(prices),
                m.interval_s * self.per_hour,
            ),
        )
        cpu0 = time.process_time()
        plan = plan_horizon(inp)
        self.stats.cpu_s += time.process_time() - cpu0
        self.stats.add(plan, day)
        self.plans.append(plan)
        return plan if plan.usable else None
