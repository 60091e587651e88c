"""4CP peak estimator: how likely is the current interval to become this month's system peak?

ERCOT charges next year's transmission by a site's load in the four 15-minute intervals of
monthly system peak in June–September (4CP). The peaks are only known afterwards, so the agent
estimates, as load arrives, whether the interval now starting may set the month's peak. This is
a pure function (no I/O, no clock): the caller passes the settled history and ``now``.

The estimate, in order:
1. outside June–September, or outside the afternoon window (interval ending 15:00–19:00
   Central, when every 2023 peak fell), the risk is 0;
2. the current interval's load is projected from the last settled one plus its rise over the
   last 15 minutes (load climbs into the peak and the peak is the last interval of the climb);
3. the projection is compared to a reference: the running monthly maximum, raised to
   ``prior_peak_fraction`` × ``prior_peak_mw`` when an expectation of the month's peak is given
   (early in a month the running maximum is too low to mean anything);
4. risk rises linearly from 0 at ``margin`` below the reference to 1 at the reference; a falling
   load halves it (the day's peak has probably passed).

The risk is a score, not a probability: it flags about 100 intervals a month for one peak. The
site prices ``risk × grid.fourcp.hit_rate`` (the forecast's historical precision,
:func:`agent.control.settlement.fourcp_risk_priced`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

CENTRAL = ZoneInfo("America/Chicago")
FOUR_CP_MONTHS = frozenset({6, 7, 8, 9})


@dataclass(frozen=True, slots=True)
class FourCpAssessment:
    """The estimator's answer; ``reason`` is meant for the plan's explanation."""

    risk: float  # 0..1
    running_max_mw: float | None
    reason: str
    projected_mw: float | None = None


def peak_risk(
    loads_mw: Sequence[float],
    times: Sequence[datetime],
    now: datetime,
    *,
    window_start_hour: float = 15.0,
    window_end_hour: float = 19.0,
    margin: float = 0.02,
    prior_peak_mw: float | None = None,
    prior_peak_fraction: float = 0.97,
) -> FourCpAssessment:
    """Risk that the interval starting at ``now`` becomes the monthly system peak.

    ``times`` are the interval ENDS (tz-aware, ascending) of ``loads_mw``; only intervals that
    ended by ``now`` and lie in ``now``'s Central month are used, so passing a longer history is
    harmless. ``window_*_hour`` bound the interval end in Central hours (15.0 → 15:00).
    """
    if len(loads_mw) != len(times):
        raise ValueError(f"{len(loads_mw)} loads but {len(times)} times")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    local_now = now.astimezone(CENTRAL)
    if local_now.month not in FOUR_CP_MONTHS:
        return FourCpAssessment(0.0, None, f"no 4CP in {local_now:%B}")
    month_start = local_now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    # bisect on the datetimes themselves: O(log n), so a caller may pass a whole year. Bounds in
    # the same zone as the times compare without per-comparison offset lookups (10× faster).
    zone = times[0].tzinfo if times else UTC
    lo = bisect.bisect_right(times, month_start.astimezone(zone))
    hi = bisect.bisect_right(times, now.astimezone(zone))
    # The interval now starting ends 15 minutes from now; that is the end the window bounds.
    end_local = local_now.hour + (local_now.minute + 15) / 60
    if hi - lo < 2:
        return FourCpAssessment(0.0, None, "not enough system-load history this month")
    last_mw = loads_mw[hi - 1]
    rise_mw = last_mw - loads_mw[hi - 2]
    running_max_mw = max(loads_mw[lo:hi])
    if not window_start_hour <= end_local <= window_end_hour:
        return FourCpAssessment(
            0.0,
            running_max_mw,
            f"{local_now:%H:%M} Central is outside the peak window "
            f"{window_start_hour:g}–{window_end_hour:g} h",
        )
    projected_mw = last_mw + max(rise_mw, 0.0)
    reference_mw = running_max_mw
    basis = "month max"
    if prior_peak_mw is not None and prior_peak_fraction * prior_peak_mw > reference_mw:
        reference_mw = prior_peak_fraction * prior_peak_mw
        basis = f"{prior_peak_fraction:.0%} of expected peak"
    ratio = projected_mw / reference_mw
    risk = min(1.0, max(0.0, (ratio - (1.0 - margin)) / margin))
    trend = f"rising {rise_mw:,.0f} MW/15 min"
    if rise_mw < 0:
        risk *= 0.5
        trend = f"falling {-rise_mw:,.0f} MW/15 min"
    return FourCpAssessment(
        risk=risk,
        running_max_mw=running_max_mw,
        projected_mw=projected_mw,
        reason=(
            f"4CP risk {risk:.2f}: projected {projected_mw:,.0f} MW is {ratio:.1%} of "
            f"{basis} {reference_mw:,.0f} MW, {trend}, interval to "
            f"{end_local // 1:02.0f}:{round(end_local % 1 * 60):02d} Central"
        ),
    )
