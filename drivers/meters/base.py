"""What a meter driver promises, and the frozen reading it returns.

A revenue meter measures the whole site at the point of interconnection: the devices the agent
drives plus cooling, transformers, lighting and anything it cannot read. Its figure is what the
grid operator and the utility judge. Powers are watts at this border, positive for import.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One validated sample of the site meter; every number is finite and in physical range."""

    device_id: str
    unit_id: int
    map_name: str
    at: datetime  # when the answer arrived (its age is measured from here)
    site_w: float  # total real power, positive = import from the grid
    phase_w: tuple[float, float, float] | None  # per phase A, B, C where the meter reports them
    voltage_v: float | None  # line-to-neutral average
    phase_voltage_v: tuple[float, float, float] | None
    frequency_hz: float | None
    energy_imported_wh: float | None
    ambient_c: float | None = None  # where the meter also carries a weather model


@runtime_checkable
class Meter(Protocol):
    """Reads the site meter. Raises :class:`drivers.errors.DeviceError` subclasses, never None.

    ``read`` has a total deadline: a meter that does not answer in time is a
    :class:`drivers.errors.DeviceTimeout`, never a hang.
    """

    @property
    def device_id(self) -> str: ...

    async def read(self) -> MeterReading: ...

    async def close(self) -> None: ...
