"""What a GPU driver promises, and the frozen reading it returns.

Powers are watts at this border (NVML speaks milliwatts; the driver converts).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One telemetry sample of one GPU."""

    device_id: str  # the GPU UUID, stable across reboots and index changes
    index: int
    name: str
    at: datetime
    power_w: float
    power_limit_w: float
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    utilization_pct: float
    memory_used_mib: float
    memory_total_mib: float
    temperature_c: float
    energy_j: float
    process_pids: tuple[int, ...] = ()


@runtime_checkable
class GpuControl(Protocol):
    """Reads every GPU of one host and sets power limits."""

    async def read_all(self) -> tuple[GpuReading, ...]: ...

    async def set_power_limit(self, device_id: str, watts: float) -> None: ...
