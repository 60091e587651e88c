"""The live 4CP account: the site's demand in every interval flagged as a 4CP risk.

ERCOT bills next year's transmission by the site's load at the meter in the four monthly system
peaks (June–September); the agent cannot know them until afterwards, so it books the site's
demand in each 15-minute interval (market clock) it flags as a 4CP risk
(:func:`agent.control.settlement.fourcp_risk_priced`, the same test the policy prices): the power
at the meter when the meter is trusted, else the device sum + cooling + the fallback margin
(what the snapshot says the site draws), integrated over the seconds observed. Each sample is
journaled at once (an upsert of the running interval), so a restart resumes the interval and
keeps every month's figures. :func:`agent.control.settlement.fourcp_figures` sums them up (per
month the peak-interval demand and its charge, per season the estimated transmission charge);
the loop publishes them to the state for ``/metrics`` and the operator page.
"""

from __future__ import annotations

import logging
from datetime import datetime

from agent.control.config import AgentConfig
from agent.control.domain import Snapshot
from agent.control.settlement import (
    FOURCP_INTERVAL_H,
    FourCpFigures,
    FourCpInterval,
    fourcp_figures,
    fourcp_risk_priced,
)
from agent.journal.store import Store
from drivers.errors import AgentError

log = logging.getLogger(__name__)

INTERVAL_S = FOURCP_INTERVAL_H * 3600.0
# A gap longer than this between two samples (the agent was down, or the risk lifted and came
# back) is not counted as observed: the next sample stands for one second.
MAX_GAP_S = 60.0


class FourCpBook:
    """Books the site's demand in 4CP-risk intervals; :attr:`figures` is the running account."""

    def __init__(self, config: AgentConfig, store: Store | None) -> None:
        self.config = config.grid.fourcp
        self.store = store
        self.intervals: dict[datetime, FourCpInterval] = {}
        self.figures = FourCpFigures(self.config.rate_usd_per_kw_year)
        self._last_at: datetime | None = None

    async def restore(self) -> None:
        """Read the journaled intervals back (a restart keeps the account)."""
        if self.store is None:
            return
        try:
            rows = await self.store.fourcp_intervals()
        except AgentError as exc:
            log.error("cannot read the 4CP account from the journal: %s", exc)
            return
        self.intervals.update((iv.start, iv) for iv in rows)
        self._refresh()

    async def record(self, market_now: datetime, snapshot: Snapshot) -> None:
        """Book this cycle's site power if the interval is a 4CP risk (else nothing)."""
        risk = fourcp_risk_priced(self.config, snapshot.fourcp_risk)
        site_w = snapshot.measured_site_power_w
        if risk <= 0 or site_w is None:
            self._last_at = None
            return
        epoch = market_now.timestamp()
        start = datetime.fromtimestamp(epoch - epoch % INTERVAL_S, tz=market_now.tzinfo)
        last, self._last_at = self._last_at, market_now
        dt = 1.0
        if last is not None and last >= start:
            gap = (market_now - last).total_seconds()
            dt = gap if 0.0 <= gap <= MAX_GAP_S else 1.0
        elif last is not None:  # the previous sample was in the interval before
            dt = min(max((market_now - start).total_seconds(), 0.0), MAX_GAP_S) or 1.0
        metered = snapshot.load_model.source == "meter"
        iv = self.intervals.get(start) or FourCpInterval(start, 0.0, 0.0, 0.0, 0.0)
        iv = self.intervals[start] = iv.add(site_w, dt, metered, risk)
        self._refresh()
        if self.store is None:
            return
        try:
            await self.store.record_fourcp(iv)
        except (AgentError, ValueError) as exc:  # never ends the control cycle
            log.error("cannot journal the 4CP interval %s: %s", start.isoformat(), exc)

    def _refresh(self) -> None:
        # Memory holds this season and the last (the journal keeps every one): at most a few
        # thousand flagged intervals, summed again at each booked sample.
        newest = max(self.intervals, default=None)
        if newest is not None:
            old = [at for at in self.intervals if at.year < newest.year - 1]
            for at in old:
                del self.intervals[at]
        self.figures = fourcp_figures(
            sorted(self.intervals.values(), key=lambda iv: iv.start),
            self.config.rate_usd_per_kw_year,
        )
