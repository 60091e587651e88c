"""The grid event model every grid source produces, and the source protocol.

A grid event is a level, not an edge: while it is active its target holds, whatever devices do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable


class ProgramKind(StrEnum):
    ECONOMIC = "economic"  # paid demand response: opt in when it pays
    EMERGENCY = "emergency"  # mandatory: overrides every contract, SLA jobs included
    FOUR_CP = "4cp"  # transmission-peak avoidance window
    OVERRIDE = "override"  # an operator's command


class FailDirection(StrEnum):
    """What a program does when its signal source goes silent."""

    CURTAIL = "curtail"  # fail safe for the grid: act as if an event to full shed were active
    HOLD = "hold"  # keep the last known event state until it ends on its own
    RELEASE = "release"  # drop the event


@dataclass(frozen=True, slots=True)
class GridEvent:
    """One demand-response event: a window and a target on site load."""

    event_id: str
    source: str
    program: str
    kind: ProgramKind
    start: datetime
    end: datetime
    max_site_kw: float | None = None  # target: site load at most this
    shed_kw: float | None = None  # or: shed this much below the baseline at start
    payment_usd_per_mwh: float = 0.0
    penalty_usd_per_mwh: float = 0.0
    fail: FailDirection = FailDirection.HOLD

    @property
    def mandatory(self) -> bool:
        return self.kind in (ProgramKind.EMERGENCY, ProgramKind.OVERRIDE)

    def active_at(self, now: datetime) -> bool:
        return self.start <= now < self.end


@runtime_checkable
class GridEventSource(Protocol):
    """Gives the events a source currently knows about, and its health."""

    @property
    def name(self) -> str: ...

    def events(self) -> tuple[GridEvent, ...]: ...
