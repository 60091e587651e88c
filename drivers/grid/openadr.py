"""OpenADR 2.0b VEN (``openleadr``): grid events from a VTN, opt in/out by rule, telemetry reports.

The VEN registers with the VTN (retrying with capped backoff until it is accepted), polls it for
events, and turns each event into :class:`~drivers.grid.base.GridEvent` values, one per signal
interval that asks for something:

* ``SIMPLE`` (type ``level``): level 0 is normal operation (no target); levels 1–3 map to a
  site-load ceiling through ``simple_level_max_site_kw`` (default: every level is a full shed);
* ``LOAD_DISPATCH`` / ``LOAD_CONTROL``: ``setpoint`` or ``x-loadControlSetpoint`` is a ceiling on
  site load (``max_site_kw``), ``delta`` or ``x-loadControlLevelOffset`` a reduction
  (``shed_kw``); values are kW unless the signal's measurement says W (scale none) or MW (M).

The event's market context selects the configured program (kind, payment, penalty, fail
direction). Mandatory programs (emergency, override) are always opted in; the others are opted
in when ``opt_rule(event)`` says so (e.g. the payment beats the margin the site would lose).
An event with an unknown market context, an unsupported signal, a non-finite or negative value,
or a window already over is opted out and recorded in ``rejected`` with the reason; nothing
changes. A cancelled or completed event disappears. If the VTN has not answered for
``max_silence_s``, each program's fail direction applies, as for a stale MQTT heartbeat.

With ``site_power_w``, the VEN offers a TELEMETRY_USAGE report of site real power (W), which the
VTN may request at ``report_sampling_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from drivers.grid.base import GridEvent
from drivers.grid.common import (
    ProgramSettings,
    Rejection,
    apply_fail_directions,
    run_until_stopped,
)
from drivers.inputs import InputRejected, StrictSettings, finite_in_range

if TYPE_CHECKING:  # openleadr loads only when a VEN is built, not when a config is read
    from openleadr import OpenADRClient

log = logging.getLogger(__name__)

SIMPLE_NAMES = frozenset({"SIMPLE", "simple"})
LOAD_NAMES = frozenset({"LOAD_DISPATCH", "LOAD_CONTROL"})
CEILING_TYPES = frozenset({"setpoint", "x-loadControlSetpoint"})
SHED_TYPES = frozenset({"delta", "x-loadControlLevelOffset"})
KW_PER_UNIT = {"none": 1e-3, "k": 1.0, "M": 1e3}  # powerReal is in W with an SI scale
# Bounds of one event: no site is bigger than 10 GW, no interval longer than a month, and a
# day of 5-minute intervals is the most a real VTN sends.
MAX_TARGET_KW = 10_000_000.0
MAX_INTERVAL = timedelta(days=31)
MAX_INTERVALS = 288


class OpenAdrProgram(ProgramSettings):
    """A program reached through one OpenADR market context."""

    name: str = Field(min_length=1, description="the program name events carry")


class OpenAdrSettings(StrictSettings):
    """Config of an OpenADR 2.0b VEN (``type: openadr``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["openadr"] = "openadr"
    vtn_url: str = Field(description="e.g. https://vtn.example/OpenADR2/Simple/2.0b")
    ven_name: str = Field(min_length=1)
    ven_id: str | None = None
    programs: dict[str, OpenAdrProgram] = Field(
        default_factory=dict, description="market context URI → program"
    )
    default_program: OpenAdrProgram | None = Field(
        default=None, description="program of events whose market context is not in programs"
    )
    # TLS and message signing (OpenADR 2.0b profile); all optional on a trusted network.
    cert: Path | None = None
    key: Path | None = None
    passphrase: SecretStr | None = None
    ca_file: Path | None = None
    vtn_fingerprint: str | None = None
    check_hostname: bool = True
    simple_level_max_site_kw: dict[int, float] = Field(
        default_factory=lambda: {1: 0.0, 2: 0.0, 3: 0.0}
    )
    report_sampling_s: int = Field(default=10, ge=1, le=86400)
    report_resource_id: str = "site"
    max_silence_s: float = Field(default=300.0, gt=0, le=7 * 86400)
    register_retry_min_s: float = Field(default=1.0, gt=0, le=86400)
    register_retry_max_s: float = Field(default=60.0, gt=0, le=86400)

    @field_validator("vtn_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url

    @model_validator(mode="after")
    def _some_program(self) -> OpenAdrSettings:
        if not self.programs and self.default_program is None:
            raise ValueError("expected at least one program (programs or default_program)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self

    @field_validator("simple_level_max_site_kw")
    @classmethod
    def _levels(cls, levels: dict[int, float]) -> dict[int, float]:
        for level, kw in levels.items():
            if level not in (1, 2, 3) or not math.isfinite(kw) or not 0 <= kw <= MAX_TARGET_KW:
                raise ValueError(f"expected levels 1–3 mapped to kW ≥ 0, got {level}: {kw}")
        return levels


def certificate_fingerprint(pem_path: Path) -> str:
    """The OpenADR fingerprint of a PEM certificate (what a VTN or VEN operator exchanges)."""
    from openleadr.utils import certificate_fingerprint

    return str(certificate_fingerprint(pem_path.read_text()))


class _Reject(Exception):
    """An OpenADR event we cannot use; the message is the audit reason."""


def _now_utc() -> datetime:
    return datetime.now(UTC)


def grid_events_from_openadr(
    event: Mapping[str, Any],
    *,
    source: str,
    programs: Mapping[str, OpenAdrProgram],
    simple_level_max_site_kw: Mapping[int, float],
    now: datetime,
    default_program: OpenAdrProgram | None = None,
) -> tuple[GridEvent, ...]:
    """Translate one parsed openleadr event dict; raise ``_Reject`` with the reason if unusable."""
    descriptor = event.get("event_descriptor") or {}
    oadr_id = str(descriptor.get("event_id"))
    context = descriptor.get("market_context")
    program = programs.get(str(context), default_program)
    if program is None:
        raise _Reject(f"unknown market context {context!r} (known: {sorted(programs)})")
    signals = event.get("event_signals") or []
    usable = [s for s in signals if s.get("signal_name") in SIMPLE_NAMES | LOAD_NAMES]
    if not usable:
        names = [s.get("signal_name") for s in signals]
        raise _Reject(
            f"unsupported signal(s) {names}: expected SIMPLE, LOAD_DISPATCH or LOAD_CONTROL"
        )
    signal = usable[0]
    name, kind = signal.get("signal_name"), signal.get("signal_type")
    kw_per_unit = 1.0
    measurement = signal.get("measurement")
    if isinstance(measurement, Mapping) and measurement.get("scale") is not None:
        scale = str(measurement["scale"])
        if scale not in KW_PER_UNIT:
            raise _Reject(f"unsupported power scale {scale!r} (one of {sorted(KW_PER_UNIT)})")
        kw_per_unit = KW_PER_UNIT[scale]
    if name in SIMPLE_NAMES and kind != "level":
        raise _Reject(f"SIMPLE signal of type {kind!r}: expected 'level'")
    if name in LOAD_NAMES and kind not in CEILING_TYPES | SHED_TYPES:
        raise _Reject(
            f"{name} signal of type {kind!r}: expected one of {sorted(CEILING_TYPES | SHED_TYPES)}"
        )
    intervals = signal.get("intervals") or []
    if not intervals:
        raise _Reject("event has no intervals")
    if len(intervals) > MAX_INTERVALS:
        raise _Reject(f"too_large: {len(intervals)} intervals (at most {MAX_INTERVALS})")
    active = event.get("active_period") or {}
    cursor: datetime | None = active.get("dtstart")
    out: list[GridEvent] = []
    any_future = False
    for k, interval in enumerate(intervals):
        start = interval.get("dtstart") or cursor
        duration = interval.get("duration")
        if not isinstance(start, datetime) or not isinstance(duration, timedelta):
            raise _Reject(f"interval {k}: expected dtstart and duration, got {interval!r}")
        if duration <= timedelta(0):
            raise _Reject(f"interval {k}: expected a positive duration, got {duration}")
        if duration > MAX_INTERVAL:
            raise _Reject(
                f"out_of_range: interval {k}: a duration of {duration} (at most {MAX_INTERVAL})"
            )
        if start.tzinfo is None:
            raise _Reject(f"bad_type: interval {k}: dtstart {start} has no time zone")
        try:
            end = start + duration
        except OverflowError:
            raise _Reject(f"out_of_range: interval {k}: ends after the year 9999") from None
        cursor = end
        value = interval.get("signal_payload")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _Reject(f"interval {k}: expected a finite number, got {value!r}")
        if value < 0:
            raise _Reject(f"interval {k}: expected a value ≥ 0, got {value!r}")
        try:
            # Finite and in range *after* the W/kW/MW conversion, not only as sent.
            target_kw = finite_in_range(
                value, 0.0, MAX_TARGET_KW, f"interval {k}", source=source, scale=kw_per_unit
            )
        except InputRejected as exc:
            raise _Reject(f"{exc.reason}: {exc.message}") from None
        if end <= now:
            continue
        any_future = True
        max_site_kw: float | None = None
        shed_kw: float | None = None
        if name in SIMPLE_NAMES:
            level = int(value)
            if level != value or level not in (0, 1, 2, 3):
                raise _Reject(f"interval {k}: SIMPLE level must be 0, 1, 2 or 3, got {value!r}")
            if level == 0:
                continue  # normal operation: nothing asked in this interval
            if level not in simple_level_max_site_kw:
                raise _Reject(f"interval {k}: SIMPLE level {level} has no configured target")
            max_site_kw = simple_level_max_site_kw[level]
        elif kind in CEILING_TYPES:
            max_site_kw = target_kw
        else:
            shed_kw = target_kw
            if shed_kw == 0:
                continue
        out.append(
            GridEvent(
                event_id=oadr_id if len(intervals) == 1 else f"{oadr_id}/{k}",
                source=source,
                program=program.name,
                kind=program.kind,
                start=start.astimezone(UTC),
                end=end.astimezone(UTC),
                max_site_kw=max_site_kw,
                shed_kw=shed_kw,
                payment_usd_per_mwh=program.payment_usd_per_mwh,
                penalty_usd_per_mwh=program.penalty_usd_per_mwh,
                fail=program.fail,
            )
        )
    if not any_future:
        raise _Reject(f"window already over: every interval ended by {now.isoformat()}")
    return tuple(out)


class OpenAdrVen:
    """A :class:`~drivers.grid.base.GridEventSource` backed by an openleadr VEN."""

    def __init__(
        self,
        settings: OpenAdrSettings,
        *,
        opt_rule: Callable[[GridEvent], bool] | None = None,
        site_power_w: Callable[[], float] | None = None,
        name: str = "openadr",
        clock: Callable[[], datetime] = _now_utc,
        on_rejected: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.settings = settings
        self._opt_rule = opt_rule
        self._site_power_w = site_power_w
        self._name = name
        self._clock = clock
        self._on_rejected = on_rejected
        self._events: dict[str, tuple[GridEvent, ...]] = {}  # OpenADR event id → opted-in events
        self.opted: dict[str, str] = {}  # OpenADR event id → optIn/optOut, as answered
        self.rejected: list[Rejection] = []
        self.changed = asyncio.Event()
        self.client: OpenADRClient | None = None
        self._started_at = clock()
        self._last_contact: datetime | None = None
        self._was_silent = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def registered(self) -> bool:
        return self.client is not None and self.client.registration_id is not None

    @property
    def ven_id(self) -> str | None:
        return None if self.client is None else self.client.ven_id

    # --- events -----------------------------------------------------------------------------

    def _programs_by_name(self) -> dict[str, ProgramSettings]:
        programs = list(self.settings.programs.values())
        if self.settings.default_program is not None:
            programs.append(self.settings.default_program)
        return {p.name: p for p in programs}

    def silence_s(self, now: datetime | None = None) -> float:
        """Seconds since the VTN last answered (since start-up if it never did)."""
        now = now or self._clock()
        return (now - (self._last_contact or self._started_at)).total_seconds()

    def events(self) -> tuple[GridEvent, ...]:
        now = self._clock()
        known = [e for group in self._events.values() for e in group if e.end > now]
        if self.silence_s(now) <= self.settings.max_silence_s:
            if self._was_silent:
                log.info("%s: VTN answers again", self._name)
                self._was_silent = False
            return tuple(known)
        if not self._was_silent:
            log.warning(
                "%s: VTN silent for %.0f s: applying fail directions",
                self._name,
                self.silence_s(now),
            )
            self._was_silent = True
        silence = timedelta(seconds=self.settings.max_silence_s)
        return apply_fail_directions(
            known,
            self._programs_by_name(),
            source=self._name,
            silent_since=(self._last_contact or self._started_at) + silence,
            now=now,
            hold_for=silence,
        )

    def _reject(self, event: Mapping[str, Any], reason: str) -> str:
        descriptor = event.get("event_descriptor") or {}
        rejection = Rejection(
            self._clock(),
            f"{descriptor.get('market_context')}#{descriptor.get('event_id')}",
            repr(event)[:200],
            reason,
        )
        self.rejected.append(rejection)
        log.warning("%s: rejected event %s: %s", self._name, rejection.topic, reason)
        if self._on_rejected is not None:
            self._on_rejected(rejection)
        return "optOut"

    async def _on_event(self, event: dict[str, Any]) -> str:
        """openleadr's on_event and on_update_event: decide and answer optIn/optOut."""
        descriptor = event.get("event_descriptor") or {}
        oadr_id = str(descriptor.get("event_id"))
        status = descriptor.get("event_status")
        if status == "completed" and oadr_id not in self.opted:
            # Delivered only after its end: nothing to do, but the VTN should hear about it.
            self.opted[oadr_id] = self._reject(
                event, f"window already over: event {oadr_id} arrived completed"
            )
            return "optOut"
        if status in ("cancelled", "completed"):
            if self._events.pop(oadr_id, None) is not None:
                log.info("%s: event %s %s", self._name, oadr_id, status)
                self.changed.set()
            return self.opted.get(oadr_id, "optIn")
        try:
            events = grid_events_from_openadr(
                event,
                source=self._name,
                programs=self.settings.programs,
                simple_level_max_site_kw=self.settings.simple_level_max_site_kw,
                now=self._clock(),
                default_program=self.settings.default_program,
            )
        except (_Reject, TypeError, AttributeError, ValueError, OverflowError) as exc:
            # Anything else the VTN's shapes can raise is a refusal too, never a dead VEN.
            why = str(exc) if isinstance(exc, _Reject) else f"bad_type: {type(exc).__name__}"
            self._events.pop(oadr_id, None)
            self.opted[oadr_id] = self._reject(event, why)
            self.changed.set()
            return "optOut"
        opt_in = True
        if events and not events[0].mandatory and self._opt_rule is not None:
            try:
                opt_in = bool(self._opt_rule(events[0]))
            except Exception:  # a broken rule must not take the VEN down; opting out is safe
                log.exception("%s: opt rule failed for %s; opting out", self._name, oadr_id)
                opt_in = False
        answer = "optIn" if opt_in else "optOut"
        self.opted[oadr_id] = answer
        previous = self._events.get(oadr_id)
        if opt_in:
            self._events[oadr_id] = events
        else:
            self._events.pop(oadr_id, None)
        if previous != self._events.get(oadr_id):
            self.changed.set()
        log.info("%s: event %s (%d interval(s)): %s", self._name, oadr_id, len(events), answer)
        return answer

    def _contact(self, *args: Any) -> None:
        self._last_contact = self._clock()

    # --- connection -------------------------------------------------------------------------

    def _new_client(self) -> OpenADRClient:
        from openleadr import OpenADRClient

        s = self.settings
        client = OpenADRClient(
            ven_name=s.ven_name,
            vtn_url=s.vtn_url,
            ven_id=s.ven_id,
            show_fingerprint=False,
            cert=str(s.cert) if s.cert else None,
            key=str(s.key) if s.key else None,
            passphrase=s.passphrase.get_secret_value() if s.passphrase else None,
            ca_file=str(s.ca_file) if s.ca_file else None,
            vtn_fingerprint=s.vtn_fingerprint,
            check_hostname=s.check_hostname,
            # Without a key there is nothing to sign with.
            disable_signature=s.key is None,
        )
        client.add_handler("on_event", self._on_event)
        client.add_handler("on_update_event", self._on_event)
        client.add_hook("after_receive_xml", self._contact)
        if self._site_power_w is not None:
            site_power_w = self._site_power_w
            client.add_report(
                callback=lambda: float(site_power_w()),
                resource_id=s.report_resource_id,
                measurement="power_real",
                unit="W",
                sampling_rate=timedelta(seconds=s.report_sampling_s),
                report_duration=timedelta(hours=1),
            )
        return client

    async def run(self, stop: asyncio.Event) -> None:
        """Register (retrying with capped backoff), then let openleadr poll until ``stop``."""
        s = self.settings
        delay_s = s.register_retry_min_s
        while not stop.is_set():
            client = self._new_client()
            self.client = client
            try:
                await run_until_stopped(client.run(), stop)
            except Exception as exc:  # openleadr raises bare errors on odd VTN answers
                log.warning("%s: registration failed: %s: %s", self._name, type(exc).__name__, exc)
            if stop.is_set():
                await self._close(client)
                return
            if client.registration_id is not None:
                log.info("%s: registered as %s", self._name, client.ven_id)
                try:
                    await stop.wait()
                finally:
                    await self._close(client)
                return
            await self._close(client)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)
            delay_s = min(delay_s * 2, s.register_retry_max_s)

    @staticmethod
    async def _close(client: OpenADRClient) -> None:
        if client.scheduler.running:
            client.scheduler.shutdown(wait=False)
        if client.report_queue_task is not None:
            client.report_queue_task.cancel()
            await asyncio.gather(client.report_queue_task, return_exceptions=True)
        if client.client_session is not None and not client.client_session.closed:
            await client.client_session.close()
