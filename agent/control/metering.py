"""The meter in the loop: config, the trim that closes it, and the fallback when it is lost.

The policy plans device power so that the *modelled* site power
(``devices × (1 + cooling) + base + trim``) stays under the limit. The meter says what the site
really draws. Their difference (the residual) is load the model does not explain: an unread
device, a cooling model that is off, transformer losses. The trim learns it:

    trim ← clamp(trim + gain × (residual_w − trim) ... bounded by max_step_w per update,
                 −max_trim_w, +max_trim_w)

where ``residual_w = meter − (devices × (1 + cooling) + base)``. With ``0 < gain ≤ 1`` this is
a first-order filter of the residual: for a constant residual the trim moves towards it
monotonically and never past it (no overshoot, so no oscillation), with error shrinking by
``(1 − gain)`` per update; ``max_step_w`` bounds how fast one odd reading can move it and
``max_trim_w`` how far the meter may move the plan at all. Property tests hold it to that.

Without a trusted meter (never read, stale, erroring, or disagreeing with the devices by more
than ``max_residual_kw``) the plan falls back to the device sum plus cooling plus
``fallback_margin_kw``, and says so in ``/metrics`` and the audit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ConfigDict, Field

from drivers.meters.settings import ModbusMeterSettings


class MeterConfig(ModbusMeterSettings):
    """``meter:`` in the site config: where the meter is, and how the agent trusts it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poll_s: float = Field(default=2.0, gt=0, le=300)
    max_age_s: float = Field(default=10.0, gt=0, le=3600, description="older readings are lost")
    fallback_margin_kw: float = Field(default=0.0, ge=0, le=1e6)
    # The meter disagreeing with the modelled site by more than this is implausible.
    max_residual_kw: float = Field(default=1e6, gt=0, le=1e7)
    trim_gain: float = Field(default=0.3, gt=0, le=1)
    max_trim_kw: float = Field(default=1e6, ge=0, le=1e7)
    max_trim_step_kw: float = Field(default=1e6, gt=0, le=1e7)


@dataclass(frozen=True, slots=True)
class TrimParams:
    gain: float
    max_trim_w: float
    max_step_w: float

    @classmethod
    def of(cls, meter: MeterConfig) -> TrimParams:
        return cls(meter.trim_gain, meter.max_trim_kw * 1000.0, meter.max_trim_step_kw * 1000.0)


def trim_step(trim_w: float, residual_w: float, params: TrimParams) -> float:
    """The next trim after one residual (see the module docstring); non-finite input is ignored."""
    if not math.isfinite(residual_w) or not math.isfinite(trim_w):
        return trim_w if math.isfinite(trim_w) else 0.0
    move = params.gain * (residual_w - trim_w)
    move = min(max(move, -params.max_step_w), params.max_step_w)
    return min(max(trim_w + move, -params.max_trim_w), params.max_trim_w)
