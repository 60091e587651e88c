"""The site meter and the ambient temperature in the runtime: poll, judge, trim, fall back.

:class:`MeterWatch` is the only reader of the meter and the ambient source. It keeps the last
good meter reading with its age and last error (like the coordinator does for devices), and at
each snapshot turns the device sum into a :class:`~agent.control.cooling.SiteLoadModel`:

* a trusted meter (fresh, and within ``max_residual_kw`` of the modelled site) is the site's
  power; each new reading taken while the devices and the meter are steady (each moved less
  than 2 % since the previous reading) moves the trim (:func:`agent.control.metering.trim_step`);
* otherwise the site is the device sum + cooling + base load + ``fallback_margin_kw``, and the
  reason is kept for ``/metrics`` and written to the audit once per change (lost, back).

It reports through its own records: the sources' health (``meter``, ``ambient``), the
:class:`MeterStatus` of the latest snapshot and the audit rows waiting to be written. The loop
publishes them (it is the only writer of the agent's state) and writes the audit.

Without a ``meter:`` block it still applies the cooling model, so planned power includes
cooling on every site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.control.config import AgentConfig
from agent.control.cooling import SiteLoadModel, cooling_fraction, plausible_ambient
from agent.control.metering import TrimParams, trim_step
from agent.runtime.state import SourceHealth
from drivers.errors import AgentError, DeviceError
from drivers.meters.base import Meter, MeterReading
from drivers.prices.base import PriceSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeterStatus:
    """What outputs show about the meter and the load model (one per snapshot)."""

    configured: bool
    trusted: bool
    source: str  # "meter", "fallback" or "devices" (no meter configured)
    reason: str | None  # why the meter is not trusted
    meter_w: float | None
    meter_age_s: float | None
    device_w: float | None
    site_w: float | None
    cooling_w: float | None
    trim_w: float
    ambient_c: float | None
    fallbacks: int  # times the agent fell back from a trusted meter (or started without one)
    errors: int  # failed meter reads


class MeterWatch:
    """Polls the meter and the ambient source; builds each snapshot's load model."""

    def __init__(
        self,
        config: AgentConfig,
        meter: Meter | None,
        *,
        ambient_source: PriceSource | None = None,
        health: dict[str, SourceHealth] | None = None,
        monotonic: Callable[[], float],
    ) -> None:
        self.config = config
        # Source health by name: the coordinator hands in its own, so the loop publishes one.
        self.health: dict[str, SourceHealth] = {} if health is None else health
        self.meter = meter if config.meter is not None else None
        self.ambient_source = ambient_source
        self.monotonic = monotonic
        self.reading: MeterReading | None = None
        self.read_at: float | None = None
        self.last_error: str | None = None
        self.errors = 0
        self.trim_w = 0.0
        self._trimmed_at: float | None = None  # read_at of the reading last used for the trim
        self._last_device_w: float | None = None  # device sum at the previous new reading
        self._last_meter_w: float | None = None  # the meter at the previous new reading
        self.ambient_c: float | None = None
        self.ambient_at: float | None = None
        self.trusted: bool | None = None  # None until judged once
        self.reason: str | None = None
        self.fallbacks = 0
        self.pending_audit: list[tuple[str, str]] = []  # (action, reason), written by the loop
        self.status: MeterStatus | None = None
        # The load model of the latest snapshot (for the horizon planner's device budget);
        # until the first, the one planned without a meter reading: cooling at the configured
        # ambient, base load, and the fallback margin where a meter is configured.
        margin_w = 0.0 if config.meter is None else config.meter.fallback_margin_kw * 1000.0
        self.model = SiteLoadModel(
            cooling_fraction(config.cooling, config.ambient.constant_c),
            config.cooling.base_load_kw * 1000.0 + margin_w,
            "devices" if config.meter is None else "fallback",
            config.ambient.constant_c,
        )

    def source(self, name: str) -> SourceHealth:
        health = self.health.get(name)
        if health is None:
            health = self.health[name] = SourceHealth(name)
        return health

    # --- polling -------------------------------------------------------------------------

    async def poll(self) -> None:
        if self.meter is None:
            return
        health = self.source("meter")
        try:
            reading = await self.meter.read()
        except DeviceError as exc:
            if self.last_error is None:
                log.warning("meter read failed: %s", exc.message)
            self.last_error, self.errors = exc.message, self.errors + 1
            health.last_error, health.failures = exc.message, health.failures + 1
            return
        if self.last_error is not None:
            log.info("meter answers again")
        self.reading, self.read_at, self.last_error = reading, self.monotonic(), None
        health.last_error, health.last_success = None, reading.at
        health.successes += 1
        if self.config.ambient.source == "meter" and reading.ambient_c is not None:
            self._set_ambient(reading.ambient_c, "meter")

    async def poll_ambient(self) -> None:
        source = self.ambient_source
        if source is None:
            return
        health = self.source("ambient")
        try:
            reading = await source.latest()
        except AgentError as exc:
            if health.last_error is None:
                log.warning("ambient feed failed: %s", exc)
            health.last_error, health.failures = str(exc), health.failures + 1
            return
        if self._set_ambient(reading.value, source.name):
            health.last_error, health.last_success = None, reading.at
            health.successes += 1
        else:
            health.last_error = f"implausible ambient {reading.value}"
            health.failures += 1

    def _set_ambient(self, value: float, source: str) -> bool:
        if not plausible_ambient(value):
            log.warning("ambient %s from %s is not plausible: ignored", value, source)
            return False
        self.ambient_c, self.ambient_at = value, self.monotonic()
        return True

    def current_ambient_c(self, mono: float) -> float:
        amb = self.config.ambient
        live = amb.source != "constant" and self.ambient_c is not None
        if live and self.ambient_at is not None and mono - self.ambient_at <= amb.max_age_s:
            return self.ambient_c if self.ambient_c is not None else amb.constant_c
        return amb.constant_c

    # --- the load model ------------------------------------------------------------------

    def load_model(self, device_w: float | None, mono: float) -> tuple[SiteLoadModel, float | None]:
        """This snapshot's load model and site power (None: neither meter nor devices known)."""
        cfg = self.config
        ambient = self.current_ambient_c(mono)
        frac = cooling_fraction(cfg.cooling, ambient)
        base_w = cfg.cooling.base_load_kw * 1000.0
        meter_cfg = cfg.meter
        if meter_cfg is None or self.meter is None:
            model = SiteLoadModel(frac, base_w, "devices", ambient)
            site_w = None if device_w is None else model.site_w(device_w)
            self._publish(model, device_w, site_w, None)
            return model, site_w
        reason: str | None = None
        reading, age = self.reading, None
        if reading is None or self.read_at is None:
            reason = f"meter not read yet: {self.last_error}" if self.last_error else "not read yet"
        else:
            age = mono - self.read_at
            if age > meter_cfg.max_age_s:
                why = f": {self.last_error}" if self.last_error else ""
                reason = f"meter reading {age:.0f} s old (max {meter_cfg.max_age_s:g} s){why}"
        residual_w: float | None = None
        if reason is None and reading is not None and device_w is not None:
            residual_w = reading.site_w - (device_w * (1.0 + frac) + base_w)
            if abs(residual_w) > meter_cfg.max_residual_kw * 1000.0:
                reason = (
                    f"meter reads {reading.site_w / 1000:,.1f} kW, devices + cooling "
                    f"{(reading.site_w - residual_w) / 1000:,.1f} kW: off by more than "
                    f"{meter_cfg.max_residual_kw:g} kW"
                )
        if reason is None and reading is not None:
            if residual_w is not None and device_w is not None and self._trimmed_at != self.read_at:
                # Learn only while the devices and the meter are both steady: during a ramp the
                # meter and the device readings are taken at different instants, and their gap
                # is not load. On a busy machine the device poll can lag a shed the meter has
                # already seen (devices look steady, the meter dropped): that gap is not load
                # either.
                last, self._last_device_w = self._last_device_w, device_w
                last_m, self._last_meter_w = self._last_meter_w, reading.site_w
                if (
                    last is not None
                    and last_m is not None
                    and abs(device_w - last) <= max(0.02 * device_w, 100.0)
                    and abs(reading.site_w - last_m) <= max(0.02 * reading.site_w, 100.0)
                ):
                    self.trim_w = trim_step(self.trim_w, residual_w, TrimParams.of(meter_cfg))
                self._trimmed_at = self.read_at
            model = SiteLoadModel(frac, base_w + self.trim_w, "meter", ambient, self.trim_w)
            self._judge(True, None)
            self._publish(model, device_w, reading.site_w, age)
            return model, reading.site_w
        margin_w = meter_cfg.fallback_margin_kw * 1000.0
        model = SiteLoadModel(frac, base_w + margin_w, "fallback", ambient)
        site_w = None if device_w is None else model.site_w(device_w)
        self._judge(False, reason)
        self._publish(model, device_w, site_w, age)
        return model, site_w

    def _judge(self, trusted: bool, reason: str | None) -> None:
        if trusted == self.trusted:
            self.reason = reason
            return
        margin = self.config.meter.fallback_margin_kw if self.config.meter else 0.0
        if trusted:
            log.info("meter trusted: limits judged on the meter")
            self.pending_audit.append(("meter_trusted", "limits judged on the meter"))
        else:
            self.fallbacks += 1
            log.warning("meter not trusted (%s): falling back to devices + %g kW", reason, margin)
            self.pending_audit.append(
                ("meter_fallback", f"{reason}; planning on devices + cooling + {margin:g} kW")
            )
        self.trusted, self.reason = trusted, reason

    def _publish(
        self,
        model: SiteLoadModel,
        device_w: float | None,
        site_w: float | None,
        age: float | None,
    ) -> None:
        self.model = model
        self.status = MeterStatus(
            configured=self.meter is not None,
            trusted=model.source == "meter",
            source=model.source,
            reason=self.reason if model.source == "fallback" else None,
            meter_w=None if self.reading is None else self.reading.site_w,
            meter_age_s=age,
            device_w=device_w,
            site_w=site_w,
            cooling_w=None if device_w is None else device_w * model.cooling_frac,
            trim_w=model.trim_w,
            ambient_c=model.ambient_c,
            fallbacks=self.fallbacks,
            errors=self.errors,
        )
