"""The cooling model: how much the site draws beyond its IT load, as a pure function.

A PUE-style model, deliberately simple so an operator can fit it from two meter readings:

    cooling_w = it_w × clamp(base_frac + per_degree_frac × (ambient_c − reference_c),
                             min_frac, max_frac)
    site_w    = it_w + cooling_w + base_load_w

``base_frac`` is the cooling share at ``reference_c`` (4 % of IT power for an air-cooled mining
hall at 25 °C is typical; immersion with dry coolers is similar), ``per_degree_frac`` how much
more per °C outside (fans speed up, adiabatic pads and chillers work harder on a hot
afternoon). ``base_load_w`` is what does not follow the IT load: transformer no-load losses,
lighting, offices. The implied PUE is ``1 + frac`` plus ``base_load_w / it_w``.

:class:`SiteLoadModel` is the whole conversion the policy needs: from a device-power total to
power at the meter, and from a limit at the meter back to a device-power budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from drivers.inputs import StrictSettings
from drivers.prices.http_json import HttpJsonSettings


class CoolingConfig(StrictSettings):
    """``cooling:`` in the site config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_frac: float = Field(default=0.0, ge=0, le=2, description="cooling / IT at reference_c")
    per_degree_frac: float = Field(default=0.0, ge=0, le=0.2, description="added per °C above")
    reference_c: float = Field(default=25.0, ge=-40, le=60)
    min_frac: float = Field(default=0.0, ge=0, le=2)
    max_frac: float = Field(default=1.0, ge=0, le=3)
    base_load_kw: float = Field(default=0.0, ge=0, le=1e6)

    @model_validator(mode="after")
    def _ordered(self) -> CoolingConfig:
        if self.min_frac > self.max_frac:
            raise ValueError(f"min_frac {self.min_frac} is above max_frac {self.max_frac}")
        return self


class AmbientConfig(StrictSettings):
    """``ambient:`` in the site config: where the outdoor temperature comes from.

    ``constant`` (``constant_c``), ``meter`` (SunSpec model 307 on the site meter), or
    ``http_json`` (a weather feed: ``feed`` with ``unit: raw``, degrees Celsius). A reading
    outside ``-60..70`` °C, not finite, or older than ``max_age_s`` is not used: the model then
    plans at ``constant_c``, which should be a hot-day figure (the safe side).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["constant", "meter", "http_json"] = "constant"
    constant_c: float = Field(default=25.0, ge=-60, le=70)
    feed: HttpJsonSettings | None = None
    max_age_s: float = Field(default=1800.0, gt=0, le=10 * 365 * 86400.0)

    @model_validator(mode="after")
    def _feed_when_http(self) -> AmbientConfig:
        if self.source == "http_json" and self.feed is None:
            raise ValueError("ambient.source http_json needs ambient.feed (url, value_path)")
        return self


AMBIENT_RANGE_C = (-60.0, 70.0)


def plausible_ambient(value: float) -> bool:
    return math.isfinite(value) and AMBIENT_RANGE_C[0] <= value <= AMBIENT_RANGE_C[1]


def cooling_fraction(config: CoolingConfig, ambient_c: float | None) -> float:
    """Cooling power per watt of IT load at ``ambient_c`` (the reference temperature if None)."""
    t = config.reference_c if ambient_c is None or not math.isfinite(ambient_c) else ambient_c
    frac = config.base_frac + config.per_degree_frac * (t - config.reference_c)
    return min(max(frac, config.min_frac), config.max_frac)


def cooling_w(config: CoolingConfig, it_w: float, ambient_c: float | None) -> float:
    """Cooling power for ``it_w`` of IT load at ``ambient_c``."""
    return max(it_w, 0.0) * cooling_fraction(config, ambient_c)


@dataclass(frozen=True, slots=True)
class SiteLoadModel:
    """Power at the meter as a function of the devices' power: ``it × (1 + c) + fixed``.

    ``fixed_w`` is the base load plus either the meter trim (the measured error the cooling
    model does not explain) or, without a trusted meter, the configured fallback margin.
    ``source`` says which: ``devices`` (no meter configured), ``meter``, or ``fallback``.
    """

    cooling_frac: float = 0.0
    fixed_w: float = 0.0
    source: str = "devices"
    ambient_c: float | None = None
    trim_w: float = 0.0

    def site_w(self, device_w: float) -> float:
        return device_w * (1.0 + self.cooling_frac) + self.fixed_w

    def device_budget_w(self, site_limit_w: float) -> float:
        """The device power whose site power is ``site_limit_w`` (never negative)."""
        if math.isinf(site_limit_w):
            return site_limit_w
        return max((site_limit_w - self.fixed_w) / (1.0 + self.cooling_frac), 0.0)

    @property
    def identity(self) -> bool:
        return self.cooling_frac == 0.0 and self.fixed_w == 0.0
