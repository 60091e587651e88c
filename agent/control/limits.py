"""The one set of limits every command channel applies: targets and end times.

An operator's curtailment (CLI or MQTT) and a grid event (OpenADR, the MQTT curtailment topic,
and everything read back from the journal) all pass through :func:`check_event`, so no channel
can hold the site to a target the interconnect cannot mean (0 ≤ kW ≤ the interconnect limit)
or to an end further away than ``control.max_event_horizon_s``. A failure is a
:class:`LimitError` whose message is one line saying what was wrong; it never changes anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.control.config import AgentConfig
from drivers.errors import AgentError
from drivers.grid.base import GridEvent


class LimitError(AgentError):
    """A target, end time or price outside the limits every channel shares."""


@dataclass(frozen=True, slots=True)
class CommandLimits:
    """The site's limits for commands: from ``site.interconnect_limit_kw`` and the horizon."""

    interconnect_kw: float
    max_horizon_s: float

    @classmethod
    def of(cls, config: AgentConfig) -> CommandLimits:
        return cls(config.site.interconnect_limit_kw, config.control.max_event_horizon_s)


def check_target_kw(target_kw: object, limits: CommandLimits, what: str = "target") -> float:
    """A site-load target in kW: a finite number in [0, interconnect]."""
    if isinstance(target_kw, bool) or not isinstance(target_kw, int | float):
        raise LimitError(f"{what} must be a number of kW, got {type(target_kw).__name__}")
    try:
        value = float(target_kw)
    except OverflowError:
        raise LimitError(f"{what} is too large to be a power") from None
    if not math.isfinite(value) or not 0.0 <= value <= limits.interconnect_kw:
        above = math.isfinite(value) and value > limits.interconnect_kw
        raise LimitError(
            f"{what} {target_kw!r} kW is outside 0..{limits.interconnect_kw:g} kW"
            + (" (above the site's interconnect limit)" if above else "")
        )
    return value


def check_end(end: datetime, now: datetime, limits: CommandLimits, what: str = "end") -> datetime:
    """An end time: timezone-aware, after ``now``, at most the configured horizon ahead."""
    if end.tzinfo is None:
        raise LimitError(f"{what} {end.isoformat()} has no time zone")
    if end <= now:
        raise LimitError(f"{what} {end.isoformat()} is not in the future")
    if end - now > timedelta(seconds=limits.max_horizon_s):
        raise LimitError(
            f"{what} {end.isoformat()} is more than {limits.max_horizon_s:g} s ahead "
            "(control.max_event_horizon_s)"
        )
    return end


def check_event(event: GridEvent, now: datetime, limits: CommandLimits) -> GridEvent:
    """A grid event or operator override that may be put in force; else :class:`LimitError`."""
    if event.max_site_kw is not None:
        check_target_kw(event.max_site_kw, limits, "max_site_kw")
    if event.shed_kw is not None:
        check_target_kw(event.shed_kw, limits, "shed_kw")
    for name in ("payment_usd_per_mwh", "penalty_usd_per_mwh"):
        rate = getattr(event, name)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise LimitError(f"{name} must be a finite number, got {rate!r}")
    if event.start.tzinfo is None or event.end.tzinfo is None:
        raise LimitError("event start and end need a time zone")
    if event.start >= event.end:
        raise LimitError(f"event starts {event.start.isoformat()}, not before its end")
    check_end(event.end, now, limits, "end")
    return event
