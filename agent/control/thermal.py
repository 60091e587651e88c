"""Thermal derate: a device too hot steps down one operating point, and back with hysteresis.

Pure and clock-free: :func:`next_ceiling` takes the device's hottest temperature (a miner's
hottest chip on any board, a GPU node's hottest card), its operating point now, the ceiling in
force and how long that ceiling has held, and returns the new ceiling. The runtime keeps one
ceiling per device; the policy never plans a device above its ceiling, and the action that
takes it down says why.

* Above ``max_c`` the ceiling is one point below where the device is (or below the ceiling,
  whichever is lower). While it stays above, it steps down once more every ``step_s`` (board
  temperatures lag power by about a minute, so stepping every cycle would overshoot), as far
  as ``sleep`` for a miner, the lowest cap for a GPU node.
* Below ``resume_c`` (hysteresis: a few degrees under ``max_c``), after ``step_s`` at the
  ceiling, it rises one point; at the top the ceiling is lifted.
* In between, or without a fresh temperature, nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ConfigDict, Field, model_validator

from drivers.inputs import StrictSettings


class ThermalLimit(StrictSettings):
    """Derate above ``max_c``; lift it below ``resume_c``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_c: float = Field(gt=0, le=150)
    resume_c: float = Field(gt=0, le=150)
    step_s: float = Field(default=60.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _hysteresis(self) -> ThermalLimit:
        if self.resume_c >= self.max_c:
            raise ValueError(f"resume_c {self.resume_c} must be below max_c {self.max_c}")
        return self


class ThermalConfig(StrictSettings):
    """``thermal:`` in the site config; a limit left out means no derate for that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    miner: ThermalLimit | None = None
    gpu: ThermalLimit | None = None


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The highest operating point (an index into the device's ladder) a device may run at."""

    index: int
    since_s: float  # monotonic time it was set or last moved
    temperature_c: float  # the temperature that set it


def next_ceiling(
    limit: ThermalLimit,
    temperature_c: float | None,
    current_index: int,
    top_index: int,
    ceiling: Ceiling | None,
    now_s: float,
) -> Ceiling | None:
    """The ceiling after one fresh temperature (see the module docstring)."""
    if temperature_c is None or not math.isfinite(temperature_c):
        return ceiling
    held_s = math.inf if ceiling is None else now_s - ceiling.since_s
    if temperature_c > limit.max_c:
        if ceiling is not None and held_s < limit.step_s:
            return ceiling
        at = current_index if ceiling is None else min(ceiling.index, current_index)
        if at <= 0:
            return ceiling if ceiling is not None else Ceiling(0, now_s, temperature_c)
        return Ceiling(at - 1, now_s, temperature_c)
    if ceiling is not None and temperature_c < limit.resume_c and held_s >= limit.step_s:
        if ceiling.index + 1 >= top_index:
            return None
        return Ceiling(ceiling.index + 1, now_s, temperature_c)
    return ceiling
