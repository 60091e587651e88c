"""What a price source promises, and the frozen price reading it returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class PriceReading:
    """One price for one interval. ``at`` is when we received it (for its age)."""

    source: str
    interval_start: datetime
    interval_s: float
    value: float  # USD/MWh for energy prices, USD per PH/s per day for hashprice
    at: datetime


@runtime_checkable
class PriceSource(Protocol):
    """Gives the latest price. Raises :class:`drivers.errors.SourceError` when it cannot."""

    @property
    def name(self) -> str: ...

    async def latest(self) -> PriceReading: ...
