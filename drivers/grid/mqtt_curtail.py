"""MQTT curtailment source: grid events from a command topic, watched by a heartbeat.

An operator or aggregator publishes JSON on ``topic``::

    {"event_id": "dr-17", "state": "on", "program": "ercot-ers", "max_site_kw": 500,
     "start": "2026-07-01T20:00:00Z", "until": "2026-07-01T22:00:00Z"}

``state: on`` starts (or updates) a curtailment with one target, ``max_site_kw`` or ``shed_kw``;
``state: off`` releases it. A curtailment is a level: it holds until its release or its
``until``, with no need to repeat it. ``program`` must be configured (it gives the kind,
payment, penalty and fail direction); an optional ``kind`` must agree with it.

A message that is malformed, names an unknown program or kind, or whose window is already over
changes nothing: it is recorded in ``rejected`` (and passed to ``on_rejected``) with the reason.
Conflicting events are all reported; the policy applies the stricter target.

``heartbeat_topic`` must see a message at least every ``heartbeat_max_age_s`` (any payload; the
age is measured on our clock, immune to the sender's). When it goes stale, each program does what
its ``fail`` says: ``curtail`` adds a synthesized full-shed event (site load ≤ 0 kW) until the
heartbeat returns, ``hold`` keeps the known events, ``release`` drops that program's events.
The connection is kept by :meth:`MqttCurtailSource.run`, reconnecting with capped backoff, over
the project's one MQTT transport (:mod:`drivers.bus`); the broker keys are the shared
:class:`~drivers.bus.settings.BrokerSettings`. The MQTT library loads only when the source
connects, so reading a config that has one costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.bus.base import Bus, BusError, topic_matches
from drivers.bus.settings import BrokerSettings
from drivers.grid.base import GridEvent, ProgramKind
from drivers.grid.common import (
    ProgramSettings,
    Rejection,
    apply_fail_directions,
    run_until_stopped,
)
from drivers.inputs import (
    InputRejected,
    StrictSettings,
    load_json,
    one_line,
    validation_problems,
)

log = logging.getLogger(__name__)

# A curtailment message is a few hundred bytes; targets are bounded by the largest site.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_TARGET_KW = 10_000_000.0
MAX_SETTING_S = 7 * 86400.0


class MqttCurtailSettings(BrokerSettings):
    """Config of an MQTT curtailment source (``type: mqtt``): a broker, and what to watch."""

    type: Literal["mqtt"] = "mqtt"
    topic: str = "grid/curtail"
    heartbeat_topic: str = "grid/heartbeat"
    heartbeat_max_age_s: float = Field(default=60.0, gt=0, le=MAX_SETTING_S)
    programs: dict[str, ProgramSettings] = Field(min_length=1)
    default_program: str | None = Field(
        default=None, description="program of messages that name none"
    )

    @model_validator(mode="after")
    def _default_known(self) -> MqttCurtailSettings:
        if self.default_program is not None and self.default_program not in self.programs:
            raise ValueError(
                f"default_program {self.default_program!r} is not one of {sorted(self.programs)}"
            )
        return self


class CurtailMessage(StrictSettings):
    """The JSON schema of one message on the curtailment topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=1, max_length=200)
    state: Literal["on", "off"]
    program: str | None = Field(default=None, min_length=1, max_length=200)
    kind: str | None = Field(default=None, max_length=64)
    max_site_kw: float | None = Field(default=None, ge=0, le=MAX_TARGET_KW, allow_inf_nan=False)
    shed_kw: float | None = Field(default=None, gt=0, le=MAX_TARGET_KW, allow_inf_nan=False)
    start: datetime | None = None
    until: datetime | None = None

    @field_validator("start", "until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expected a timestamp with a time zone, e.g. 2026-07-01T20:00:00Z")
        return value

    @model_validator(mode="after")
    def _target(self) -> CurtailMessage:
        if self.state == "on":
            if (self.max_site_kw is None) == (self.shed_kw is None):
                raise ValueError("state 'on' needs exactly one of max_site_kw or shed_kw")
            if self.until is None:
                raise ValueError("state 'on' needs 'until' (the end of the window)")
            if self.start is not None and self.until <= self.start:
                raise ValueError("'until' must be after 'start'")
        return self


def _now_utc() -> datetime:
    return datetime.now(UTC)


class MqttCurtailSource:
    """A :class:`~drivers.grid.base.GridEventSource` fed by an MQTT topic (module docstring).

    ``handle(topic, payload)`` is the whole message logic and needs no broker; ``run(stop)``
    connects, subscribes and feeds it. ``changed`` is set whenever the event set changes, so the
    agent can run its fast path at once.
    """

    def __init__(
        self,
        settings: MqttCurtailSettings,
        *,
        name: str = "mqtt",
        clock: Callable[[], datetime] = _now_utc,
        on_rejected: Callable[[Rejection], None] | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self._bus = bus  # the transport; by default MQTT to the configured broker
        self._name = name
        self._clock = clock
        self._on_rejected = on_rejected
        self._events: dict[str, GridEvent] = {}
        self.rejected: list[Rejection] = []
        self.changed = asyncio.Event()
        self.connected = False
        self.connects = 0
        self._started_at = clock()
        self._last_heartbeat: datetime | None = None
        self._was_stale = False

    @property
    def name(self) -> str:
        return self._name

    # --- message logic (no I/O) -------------------------------------------------------------

    def _reject(self, topic: str, payload: bytes, reason: str) -> None:
        text = payload[:200].decode("utf-8", "replace")
        rejection = Rejection(self._clock(), topic[:200], text, one_line(reason))
        self.rejected.append(rejection)
        log.warning("%s: rejected message on %s: %s", self._name, topic, reason)
        if self._on_rejected is not None:
            self._on_rejected(rejection)

    def handle(self, topic: str, payload: bytes) -> None:
        """Apply one message from ``topic`` (heartbeat or curtailment)."""
        now = self._clock()
        if topic_matches(topic, self.settings.heartbeat_topic):
            self._last_heartbeat = now
            if self._was_stale:
                log.info("%s: heartbeat back", self._name)
                self._was_stale = False
                self.changed.set()
            return
        if not payload:
            return  # an empty retained message clears the topic; it carries no command
        try:
            # Bounded: size, strict UTF-8, depth, no duplicate keys, no NaN (drivers/inputs.py).
            document = load_json(payload, self._name, max_bytes=MAX_MESSAGE_BYTES, what="message")
        except InputRejected as exc:
            self._reject(topic, payload, f"{exc.reason}: {exc.message}")
            return
        try:
            message = CurtailMessage.model_validate(document)
        except ValidationError as exc:
            reasons = validation_problems(exc)
            self._reject(topic, payload, f"invalid curtailment message: {reasons}")
            return
        program_name = message.program or self.settings.default_program
        if program_name is None:
            self._reject(topic, payload, "no program named, and no default_program configured")
            return
        program = self.settings.programs.get(program_name)
        if program is None:
            known = sorted(self.settings.programs)
            self._reject(topic, payload, f"unknown program {program_name!r} (known: {known})")
            return
        if message.kind is not None:
            try:
                kind = ProgramKind(message.kind)
            except ValueError:
                kinds = [k.value for k in ProgramKind]
                self._reject(topic, payload, f"unknown kind {message.kind!r} (one of {kinds})")
                return
            if kind != program.kind:
                self._reject(
                    topic,
                    payload,
                    f"kind {kind.value!r} contradicts program {program_name!r}, "
                    f"configured as {program.kind.value!r}",
                )
                return
        if message.state == "off":
            if self._events.pop(message.event_id, None) is None:
                self._reject(topic, payload, f"release of unknown event {message.event_id!r}")
                return
            log.info("%s: event %s released", self._name, message.event_id)
            self.changed.set()
            return
        assert message.until is not None  # checked by the schema for state 'on'
        if message.until <= now:
            self._reject(
                topic,
                payload,
                f"window already over: until {message.until.isoformat()} is not after "
                f"{now.isoformat()}",
            )
            return
        previous = self._events.get(message.event_id)
        # A repeated "on" without a start keeps the original start: republishing a command as a
        # keep-alive must not move the event window (compliance is measured from the start).
        default_start = previous.start if previous is not None else now
        event = GridEvent(
            event_id=message.event_id,
            source=self._name,
            program=program_name,
            kind=program.kind,
            start=(message.start or default_start).astimezone(UTC),
            end=message.until.astimezone(UTC),
            max_site_kw=message.max_site_kw,
            shed_kw=message.shed_kw,
            payment_usd_per_mwh=program.payment_usd_per_mwh,
            penalty_usd_per_mwh=program.penalty_usd_per_mwh,
            fail=program.fail,
        )
        if self._events.get(event.event_id) != event:
            self._events[event.event_id] = event
            log.info("%s: event %s: %s", self._name, event.event_id, _describe(event))
            self.changed.set()

    def heartbeat_age_s(self, now: datetime | None = None) -> float:
        """Seconds since the last heartbeat (since start-up if none came yet)."""
        now = now or self._clock()
        return (now - (self._last_heartbeat or self._started_at)).total_seconds()

    def heartbeat_stale(self, now: datetime | None = None) -> bool:
        return self.heartbeat_age_s(now) > self.settings.heartbeat_max_age_s

    def events(self) -> tuple[GridEvent, ...]:
        """Every event not yet over, with the fail directions applied if the heartbeat is stale."""
        now = self._clock()
        known = [e for e in self._events.values() if e.end > now]
        if not self.heartbeat_stale(now):
            return tuple(known)
        if not self._was_stale:
            log.warning(
                "%s: heartbeat stale (%.0f s > %g s): applying fail directions",
                self._name,
                self.heartbeat_age_s(now),
                self.settings.heartbeat_max_age_s,
            )
            self._was_stale = True
        max_age = timedelta(seconds=self.settings.heartbeat_max_age_s)
        return apply_fail_directions(
            known,
            self.settings.programs,
            source=self._name,
            silent_since=(self._last_heartbeat or self._started_at) + max_age,
            now=now,
            hold_for=max_age,
        )

    # --- connection -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay subscribed until ``stop`` is set; reconnect with capped exponential backoff."""
        s = self.settings
        delay_s = s.reconnect_initial_s
        bus = self._bus
        if bus is None:
            from drivers.bus.mqtt import MqttBus  # the MQTT library loads only to connect

            bus = MqttBus(s.bus_settings(f"site-agent-{self._name}"))
        while not stop.is_set():
            try:
                await run_until_stopped(self._session(bus), stop)
            except BusError as exc:
                if self.connected:
                    log.warning("%s: connection lost: %s", self._name, exc)
                else:
                    log.debug("%s: cannot connect: %s", self._name, exc)
            finally:
                if self.connected:
                    delay_s = s.reconnect_initial_s  # it worked for a while: retry quickly
                self.connected = False
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)
            delay_s = min(delay_s * 2, s.reconnect_max_s)

    async def _session(self, bus: Bus) -> None:
        """One connection: subscribe and feed every message to :meth:`handle` until it drops."""
        s = self.settings
        async with bus.session() as session:
            await session.subscribe(s.topic, qos=1)
            await session.subscribe(s.heartbeat_topic, qos=0)
            self.connected = True
            self.connects += 1
            log.info("%s: subscribed to %s on %s:%d", self._name, s.topic, s.host, s.port)
            async for message in session.messages():
                self.handle(message.topic, message.payload)


def _describe(event: GridEvent) -> str:
    target = (
        f"site ≤ {event.max_site_kw:g} kW"
        if event.max_site_kw is not None
        else f"shed {event.shed_kw:g} kW"
    )
    return (
        f"{event.kind.value} {event.program} {target} "
        f"{event.start.isoformat()} → {event.end.isoformat()}"
    )
