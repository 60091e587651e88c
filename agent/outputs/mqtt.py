"""The MQTT bridge: publishes the site's state and takes authenticated operator commands.

Topic tree, with ``P = {mqtt.topic_prefix}/{site_id}``:

=============================  =====  ======  ====================================================
topic                          QoS    retain  payload (JSON unless said)
=============================  =====  ======  ====================================================
``P/status``                   1      yes     ``online`` / ``offline`` (plain text; the last will)
``P/state``                    1      yes     site summary: power, limits, price, mode, fleet
``P/plan``                     1      yes     the current plan, every action with its reason
``P/events``                   1      yes     grid events in force, with target and shortfall
``P/telemetry/miner/{id}``     0      no      one miner: power, hashrate, state, commanded point
``P/telemetry/gpu_node/{id}``  0      no      one GPU node: power, cap, jobs
``P/command/{name}``           1      –       operator → agent: ``curtail``, ``release``,
                                              ``set_mode``, ``refresh``
``P/ack``                      1      no      agent → operator: one answer per command
=============================  =====  ======  ====================================================

A command payload is a JSON object with ``id`` (chosen by the sender, echoed in the ack),
``operator`` and ``token`` (checked against ``mqtt.command_tokens`` in constant time), plus the
command's own fields; unknown fields are refused. The broker's ACL decides which MQTT user may
publish under ``P/command/``; the token says which operator did. The ack is
``{"id", "command", "status": "accepted"|"rejected", "reason", "at"}``. A malformed,
unauthorised, unknown, invalid or expired command is rejected with a reason, reaches nobody
and is counted in ``AgentState.rejected`` under source ``mqtt``; the runtime also writes an
audit row for it (``command:NAME``), for at most a burst of 20 and then one a second, so a flood
is still counted in full but never floods the journal; a command the runtime refuses is audited
the same way. A repeated ``id`` from the same operator (QoS 1 redelivery) is answered again with
the first answer and not re-executed; the same ``id`` from another operator is rejected. The
runtime also deduplicates through the journal, across restarts. One message can never end the
bridge: a failure handling it is logged and acked as rejected.

Control never waits on the broker: :meth:`MqttBridge.publish_cycle` only fills in-memory
buffers. Retained topics keep only their newest payload (and are all republished after every
reconnect); telemetry sits in a bounded queue that drops the oldest when full. :meth:`run`
reconnects forever with capped exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.control.commands import (
    Command,
    CommandHandler,
    CommandResult,
    Curtail,
    Refresh,
    RejectCounter,
    RejectionAudit,
    Release,
    SetMode,
)
from agent.control.config import MqttConfig
from agent.control.domain import Plan, Snapshot
from agent.control.settlement import event_target_w
from agent.outputs.metrics import miner_state
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard, TaskHealth
from drivers.bus.base import Bus, BusError, BusMessage, BusSession, BusSettings, LastWill
from drivers.bus.mqtt import MqttBus
from drivers.inputs import InputRejected, load_json

log = logging.getLogger(__name__)

REJECT_SOURCE = "mqtt"  # the source name under which rejected commands are counted
MAX_COMMAND_BYTES = 16 * 1024  # a command is a few hundred bytes; more is abuse or a mistake


# Rejected commands reach the audit trail, at most AUDIT_BURST at once and one a second after
# that: a flood of garbage must not turn into a flood of journal writes.
AUDIT_BURST = 20


# --- the wire schema (pydantic at the edge) ------------------------------------------------------

CommandId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: CommandId
    operator: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=1, max_length=256, repr=False)


class _CurtailWire(_Wire):
    # strict: ``true`` is no target; the bound is the largest site, the runtime applies its own.
    target_kw: float = Field(ge=0, le=10_000_000, allow_inf_nan=False, strict=True)
    until: datetime

    @field_validator("until")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("until needs a time zone (e.g. 2026-01-01T12:00:00Z)")
        return value.astimezone(UTC)


class _ReleaseWire(_Wire):
    pass


class _SetModeWire(_Wire):
    mode: Literal["auto", "manual"]


class _RefreshWire(_Wire):
    pass


_SCHEMAS: dict[str, type[_Wire]] = {
    "curtail": _CurtailWire,
    "release": _ReleaseWire,
    "set_mode": _SetModeWire,
    "refresh": _RefreshWire,
}


class Rejected(Exception):
    """A command refused before it reached the runtime; ``code`` is the bounded metric reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_command(name: str, payload: bytes, tokens: Mapping[str, str], now: datetime) -> Command:
    """Validate one command message; raise :class:`Rejected` with a reason on any problem.

    Order: well-formed JSON object, then authentication, then a known command, then its schema,
    so an unauthenticated sender learns nothing about the schema.
    """
    data = _load(payload)
    if not isinstance(data, dict):
        raise Rejected("malformed", "payload must be a JSON object")
    operator, token = data.get("operator"), data.get("token")
    if not isinstance(operator, str) or not isinstance(token, str):
        raise Rejected("unauthorized", "operator and token are required")
    expected = tokens.get(operator)
    # Compare against a dummy for unknown operators so timing does not reveal who exists.
    # JSON may carry lone surrogates ("\ud800") that UTF-8 cannot encode: never a match.
    given = token.encode("utf-8", "surrogatepass")
    good = hmac.compare_digest(given, (expected or "\0" * 32).encode("utf-8", "surrogatepass"))
    if expected is None or not good:
        raise Rejected("unauthorized", f"operator {operator[:64]!r} not authorised")
    schema = _SCHEMAS.get(name)
    if schema is None:
        known = ", ".join(sorted(_SCHEMAS))
        raise Rejected("unknown_command", f"unknown command {name[:64]!r} (known: {known})")
    try:
        wire = schema.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
        )
        raise Rejected("invalid", f"invalid {name}: {problems}"[:300]) from None
    if isinstance(wire, _CurtailWire):
        if wire.until <= now:
            raise Rejected("expired", f"until {wire.until.isoformat()} is not in the future")
        return Curtail(wire.id, wire.operator, wire.target_kw, wire.until)
    if isinstance(wire, _SetModeWire):
        return SetMode(wire.id, wire.operator, wire.mode)
    if isinstance(wire, _RefreshWire):
        return Refresh(wire.id, wire.operator)
    return Release(wire.id, wire.operator)


def _load(payload: bytes) -> Any:
    """Bounded JSON (size, UTF-8, depth, duplicate keys, NaN): a hostile payload is refused
    with its reason as the metric code, never an exception that ends the bridge."""
    try:
        return load_json(payload, REJECT_SOURCE, max_bytes=MAX_COMMAND_BYTES, max_depth=8)
    except InputRejected as exc:
        if exc.reason == "bad_syntax":
            raise Rejected("malformed", f"payload is not JSON: {exc.message}") from None
        raise Rejected(exc.reason, f"payload refused: {exc.message}") from None


def _command_id(payload: bytes) -> str | None:
    """The sender's ``id`` if one can be read, for the ack of a command we reject."""
    try:
        data = _load(payload)
    except Rejected:
        return None
    cid = data.get("id") if isinstance(data, dict) else None
    return cid[:64] if isinstance(cid, str) else None


# --- payloads ---------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z") if at is not None else None


def _num(x: float | None) -> float | None:
    """JSON has no inf/NaN: send null for them."""
    return x if x is not None and math.isfinite(x) else None


def state_payload(
    state: AgentState,
    interconnect_limit_w: float | None = None,
    tasks: Mapping[str, TaskHealth] | None = None,
) -> dict[str, Any]:
    snap, plan = state.snapshot, state.plan
    fleet: dict[str, int] = {}
    if snap is not None:
        for m in snap.miners:
            s = miner_state(m)
            fleet[s] = fleet.get(s, 0) + m.count
    return {
        "site_id": state.site_id,
        "at": _iso(snap.at if snap else None),
        "mode": state.mode,
        "cycles": state.cycles,
        "site_power_w": _num(snap.measured_site_power_w) if snap else None,
        "planned_power_w": _num(plan.planned_power_w) if plan else None,
        "limit_w": _num(plan.limit_w) if plan else None,
        "interconnect_limit_w": _num(interconnect_limit_w),
        "price_usd_per_mwh": _num(snap.price.usd_per_mwh) if snap and snap.price else None,
        "price_age_s": _num(snap.price.age_s) if snap and snap.price else None,
        "hashprice_usd_per_ph_day": _num(snap.hashprice_usd_per_ph_day) if snap else None,
        "value_usd_per_h": _num(plan.value_usd_per_h) if plan else None,
        "cost_usd_per_h": _num(plan.cost_usd_per_h) if plan else None,
        "miners": fleet,
        "gpu_nodes": len(snap.gpu_nodes) if snap else 0,
        "events_active": len(snap.events) if snap else 0,
        "faults": dict(sorted(state.faults.items())),
        "tasks": {
            name: {"up": t.up, "restarts": t.restarts, "last_error": t.last_error}
            for name, t in sorted((tasks or {}).items())
        },
    }


def plan_payload(plan: Plan) -> dict[str, Any]:
    return {
        "at": _iso(plan.at),
        "summary": plan.summary,
        "limit_w": _num(plan.limit_w),
        "planned_power_w": _num(plan.planned_power_w),
        "effective_price_usd_per_mwh": _num(plan.effective_price_usd_per_mwh),
        "value_usd_per_h": _num(plan.value_usd_per_h),
        "cost_usd_per_h": _num(plan.cost_usd_per_h),
        "binding": list(plan.binding),
        "actions": [
            {
                "device_id": a.device_id,
                "kind": a.kind.value,
                "target": a.target,
                "reason": a.reason,
                "delta_power_w": _num(a.delta_power_w),
                "job_id": a.job_id,
            }
            for a in plan.actions
        ],
    }


def events_payload(snap: Snapshot) -> dict[str, Any]:
    site_w = snap.measured_site_power_w
    events = []
    for a in snap.events:
        e, target = a.event, event_target_w(a.event, a.baseline_w)
        events.append(
            {
                "event_id": e.event_id,
                "program": e.program,
                "kind": e.kind.value,
                "source": e.source,
                "start": _iso(e.start),
                "end": _iso(e.end),
                "target_w": _num(target),
                "baseline_w": _num(a.baseline_w),
                "shortfall_w": (
                    max(0.0, site_w - target) if target is not None and site_w is not None else None
                ),
            }
        )
    return {"at": _iso(snap.at), "events": events}


def telemetry_payloads(snap: Snapshot) -> list[tuple[str, dict[str, Any]]]:
    """(topic suffix, payload) per device."""
    out: list[tuple[str, dict[str, Any]]] = []
    for m in snap.miners:
        out.append(
            (
                f"telemetry/miner/{m.device_id}",
                {
                    "at": _iso(snap.at),
                    "model": m.model,
                    "state": miner_state(m),
                    "commanded": m.commanded,
                    "power_w": _num(m.measured_power_w),
                    "hashrate_ths": _num(m.measured_hashrate_ths),
                    "reading_age_s": _num(m.reading_age_s),
                    "fault": m.fault,
                },
            )
        )
    for n in snap.gpu_nodes:
        out.append(
            (
                f"telemetry/gpu_node/{n.device_id}",
                {
                    "at": _iso(snap.at),
                    "power_w": _num(n.measured_power_w),
                    "cap_w": _num(n.cap_w),
                    "gpus": n.gpu_count,
                    "reading_age_s": _num(n.reading_age_s),
                    "fault": n.fault,
                    "jobs": [
                        {"job_id": j.job_id, "class": j.job_class.value, "state": j.state.value}
                        for j in n.jobs
                    ],
                },
            )
        )
    return out


async def _wait_set(event: asyncio.Event) -> None:
    await event.wait()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel and reap ``tasks``, cancelling again if one swallowed it.

    Python 3.11's ``asyncio.wait_for`` (inside aiomqtt's publish) can lose a cancellation
    that races with its inner future completing; a single ``cancel()`` is then not enough.
    """
    while pending := {t for t in tasks if not t.done()}:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


def _dump(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


# --- the bridge -------------------------------------------------------------------------------


def bus_settings(config: MqttConfig, site_id: str) -> BusSettings:
    """Transport settings from config, with the retained ``offline`` status as last will."""
    prefix = f"{config.topic_prefix}/{site_id}"
    will = LastWill(f"{prefix}/status", b"offline", qos=1, retain=True)
    return config.bus_settings(f"site-agent-{site_id}", will)


@dataclass(frozen=True, slots=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttBridge:
    """Publishes :class:`AgentState` over MQTT and hands validated commands to ``handler``.

    The runtime calls :meth:`publish_cycle` after each control cycle (never blocks, never
    raises) and runs :meth:`run` as one task of its TaskGroup (cancel it to stop; it then
    publishes ``offline`` and disconnects cleanly).
    """

    def __init__(
        self,
        config: MqttConfig,
        state: AgentState,
        handler: CommandHandler,
        *,
        count_rejected: RejectCounter,
        interconnect_limit_w: float | None = None,
        bus: Bus | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        audit_rejection: RejectionAudit | None = None,
        tasks: TaskBoard | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.tasks = tasks  # the supervised tasks' health (the supervisor's; None: not shown)
        self.handler = handler
        self.count_rejected = count_rejected  # rejections are the runtime's to count
        # ... and to audit: the bridge only decides which ones, at a bounded rate.
        self.audit_rejection = audit_rejection
        self._audit_tokens = float(AUDIT_BURST)
        self._audit_at: float | None = None
        self.unaudited_rejections = 0
        self.interconnect_limit_w = interconnect_limit_w
        self.clock = clock
        self.prefix = f"{config.topic_prefix}/{state.site_id}"
        self.bus: Bus = bus or MqttBus(bus_settings(config, state.site_id))
        self.connected = asyncio.Event()
        self.connections = 0  # sessions that got as far as subscribing (tests and status)
        self.dropped_telemetry = 0
        self._retained: dict[str, bytes] = {}  # topic -> newest payload
        self._dirty: set[str] = set()  # retained topics not yet published on this connection
        self._telemetry: deque[_Out] = deque(maxlen=config.queue_size)
        self._acks: deque[_Out] = deque(maxlen=config.queue_size)
        self._wake = asyncio.Event()
        # id -> (operator, first answer): a redelivery is answered again, never re-executed.
        self._answered: OrderedDict[str, tuple[str, CommandResult]] = OrderedDict()
        self._tokens = {k: v.get_secret_value() for k, v in config.command_tokens.items()}

    # --- what the runtime calls ---------------------------------------------------------------

    task_name = "mqtt"  # the supervised task's name in /metrics and the retained state

    async def __call__(self, stop: asyncio.Event) -> None:
        """Run as a runtime service until ``stop`` is set (then say offline and disconnect).

        If the connection loop dies of anything but a broker outage, its exception is raised
        here, so the runtime's supervisor logs it, shows it and starts the bridge again.
        """
        task = asyncio.create_task(self.run(), name="mqtt-bridge")
        stopping = asyncio.create_task(_wait_set(stop), name="mqtt-stop")
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all({task, stopping})
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    def publish_cycle(self) -> None:
        """Queue state, plan, events and per-device telemetry from the current AgentState."""
        try:
            self._publish_cycle()
        except Exception:  # an output's bug must never stop the control loop that calls it
            log.exception("mqtt: could not build the cycle's messages; skipped")

    def _publish_cycle(self) -> None:
        state = self.state
        self._set_retained("state", state_payload(state, self.interconnect_limit_w, self.tasks))
        if state.plan is not None:
            self._set_retained("plan", plan_payload(state.plan))
        snap = state.snapshot
        if snap is not None:
            self._set_retained("events", events_payload(snap))
            if self.config.publish_telemetry:
                for suffix, payload in telemetry_payloads(snap):
                    self._enqueue_telemetry(f"{self.prefix}/{suffix}", _dump(payload))
        self._wake.set()

    def _set_retained(self, suffix: str, payload: Mapping[str, Any]) -> None:
        topic = f"{self.prefix}/{suffix}"
        self._retained[topic] = _dump(payload)
        self._dirty.add(topic)

    def _enqueue_telemetry(self, topic: str, payload: bytes) -> None:
        if len(self._telemetry) == self._telemetry.maxlen:
            self.dropped_telemetry += 1  # deque drops the oldest on append
        self._telemetry.append(_Out(topic, payload, 0, False))

    # --- the connection loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled: reconnect with capped exponential backoff."""
        delay = self.config.reconnect_initial_s
        failing = False
        while True:
            try:
                async with self.bus.session() as session:
                    delay = self.config.reconnect_initial_s
                    if failing:
                        log.info("mqtt: reconnected to the broker")
                    else:
                        log.info("mqtt: connected to %s:%d", self.config.host, self.config.port)
                    failing = False
                    await self._connected(session)
            except BusError as exc:
                if not failing:  # log an outage once, not every retry
                    log.warning("mqtt: broker unavailable, retrying with backoff: %s", exc)
                failing = True
            finally:
                self.connected.clear()
            # Jitter keeps a fleet of agents from reconnecting in lockstep after a broker restart.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _connected(self, session: BusSession) -> None:
        await session.subscribe(f"{self.prefix}/command/+", qos=1)
        await session.publish(f"{self.prefix}/status", b"online", qos=1, retain=True)
        # A broker restarted without persistence has forgotten our retained state: resend it all.
        self._dirty = set(self._retained)
        self.connections += 1
        self.connected.set()
        self._wake.set()
        # Two tasks on one connection; whichever ends first (the connection broke) ends both.
        tasks = {
            asyncio.create_task(self._sender(session), name="mqtt-sender"),
            asyncio.create_task(self._receiver(session), name="mqtt-receiver"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel_all(tasks)
            await self._say_offline(session)
            raise
        await _cancel_all(tasks)
        for task in done:
            exc = task.exception()
            if exc is not None:
                if not isinstance(exc, BusError):
                    # The bridge itself failed, not the broker: the retained status must not
                    # keep saying online while nobody answers commands.
                    await self._say_offline(session)
                raise exc
        raise BusError("message stream ended")

    async def _say_offline(self, session: BusSession) -> None:
        """A clean shutdown sends no last will, so say ``offline`` ourselves (best effort)."""
        try:
            async with asyncio.timeout(2.0):
                await session.publish(f"{self.prefix}/status", b"offline", qos=1, retain=True)
        except (BusError, TimeoutError):
            pass

    async def _sender(self, session: BusSession) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._acks or self._dirty or self._telemetry:
                if self._acks:  # answers first: an operator is waiting on them
                    out = self._acks[0]
                    await session.publish(out.topic, out.payload, out.qos, out.retain)
                    self._acks.popleft()
                elif self._dirty:
                    topic = min(self._dirty)
                    payload = self._retained[topic]
                    await session.publish(topic, payload, qos=1, retain=True)
                    # Marked clean only once acknowledged; a newer payload set meanwhile stays.
                    if self._retained[topic] is payload:
                        self._dirty.discard(topic)
                else:
                    out = self._telemetry.popleft()  # lost if the broker goes now: fine
                    await session.publish(out.topic, out.payload, out.qos, out.retain)

    async def _receiver(self, session: BusSession) -> None:
        async for message in session.messages():
            try:
                await self._on_command(message)
            except Exception as exc:  # one message must never end the command bridge
                log.exception("mqtt: command on %r could not be handled", message.topic[:64])
                name = message.topic.removeprefix(f"{self.prefix}/command/")
                reason = f"internal error: {type(exc).__name__}"
                self._reject(_command_id(message.payload), name, "internal", reason)
                self._audit(name, "internal", reason)

    # --- commands -----------------------------------------------------------------------------

    async def _on_command(self, message: BusMessage) -> None:
        name = message.topic.removeprefix(f"{self.prefix}/command/")
        cid = _command_id(message.payload)
        try:
            command = parse_command(name, message.payload, self._tokens, self.clock())
        except Rejected as rej:
            self._reject(cid, name, rej.code, rej.reason)
            self._audit(name, rej.code, rej.reason)
            return
        previous = self._answered.get(command.id)
        if previous is not None:
            operator, answer = previous
            if operator != command.operator:  # never someone else's result
                reason = f"command id {command.id!r} was already used by another operator"
                self._reject(command.id, name, "duplicate_id", reason)
                self._audit(name, "duplicate_id", reason)
                return
            self._ack(command.id, name, answer)  # QoS 1 redelivery or a resend: no second effect
            return
        try:
            async with asyncio.timeout(self.config.command_timeout_s):
                result = await self.handler(command)
        except TimeoutError:
            result = CommandResult.refuse("the agent did not answer in time")
        except Exception as exc:  # the handler's bug must not kill the bridge
            log.exception("mqtt: command handler failed on %s", name)
            result = CommandResult.refuse(f"internal error: {type(exc).__name__}")
        self._answered[command.id] = (command.operator, result)
        while len(self._answered) > 1000:
            self._answered.popitem(last=False)
        if result.accepted:
            log.info("mqtt: %s %s from %s accepted", name, command.id, command.operator)
            if isinstance(command, Refresh):
                self.publish_cycle()
        else:
            self.count_rejected(REJECT_SOURCE, "refused")
            log.warning("mqtt: %s %s refused: %s", name, command.id, result.reason)
            self._audit(name, "refused", f"by {command.operator}: {result.reason}")
        self._ack(command.id, name, result)

    def _audit(self, name: str, code: str, reason: str) -> None:
        if self.audit_rejection is None:
            return
        now = asyncio.get_running_loop().time()
        if self._audit_at is not None:
            self._audit_tokens = min(AUDIT_BURST, self._audit_tokens + (now - self._audit_at))
        self._audit_at = now
        if self._audit_tokens < 1.0:
            self.unaudited_rejections += 1  # still counted in rejected_inputs_total
            return
        self._audit_tokens -= 1.0
        # Handed to the runtime, which writes the row (the journal is the loop's to write).
        self.audit_rejection(REJECT_SOURCE, f"command:{name[:64]}", f"{code}: {reason}")

    def _reject(self, cid: str | None, name: str, code: str, reason: str) -> None:
        self.count_rejected(REJECT_SOURCE, code)
        log.warning("mqtt: rejected command on %r: %s", name[:64], reason)
        self._ack(cid, name[:64], CommandResult.refuse(reason))

    def _ack(self, cid: str | None, name: str, result: CommandResult) -> None:
        payload = {
            "id": cid,
            "command": name,
            "status": "accepted" if result.accepted else "rejected",
            "reason": result.reason,
            "at": _iso(self.clock()),
        }
        self._acks.append(_Out(f"{self.prefix}/ack", _dump(payload), 1, False))
        self._wake.set()
