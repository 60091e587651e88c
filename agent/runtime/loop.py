"""The agent's main loop: one TaskGroup owns every long-running task.

Tasks: a poller per fleet, per signal and for the site meter and the ambient feed (through the
coordinator), the control loop (snapshot →
decide → actuate → verify), the operator inbox, the grid event watch, and the services handed in
(metrics server, MQTT, fleet drivers). The control loop runs every ``control.interval_s`` and at
once when the price interval changes or a grid event starts or ends (the fast path). It waits for
every fleet's first poll before the first decision, so a restart never commands from ignorance.

The loop is the only writer of :class:`~agent.runtime.state.AgentState`: after each poll and each
cycle it publishes what the coordinator, the fleets and the actuator report (source health,
faults, action results, safe mode, the meter's status, thermal derates, the 4CP account of
:mod:`agent.runtime.fourcp`); outputs only read it.
Every part is handed in at construction: the components (fleets, signals, journal, grid sources,
meter, services), the cycle observers (logs, MQTT), the operator inbox, the watchdog and the
supervised tasks' :class:`~agent.runtime.supervisor.TaskBoard` (not part of the state: the
supervisor writes it, even when the control loop itself died).

Stopping: setting the ``stop`` event (SIGTERM/SIGINT in :mod:`agent.cli.daemon`) lets every
loop finish its current step; anything still running after ``grace_s`` is cancelled, so the
process exits within seconds even if a device call hangs.

Every task runs under :func:`agent.runtime.supervisor.supervise`: one that dies (a hostile
input, a bug) is logged, shown in ``/metrics`` and restarted with back-off; the others, the
control loop first, go on. Operator commands are deduplicated through the journal and checked
against the limits every channel shares (:mod:`agent.control.limits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from agent.control.commands import Command, CommandResult, Curtail, Refresh, Release, SetMode
from agent.control.config import AgentConfig, ControlConfig
from agent.control.domain import ActiveEvent, Plan, Snapshot
from agent.control.limits import (
    CommandLimits,
    LimitError,
    check_end,
    check_event,
    check_target_kw,
)
from agent.control.policy import decide
from agent.journal.store import Store
from agent.runtime.actuator import ActionResult, Actuator, AuditSink
from agent.runtime.coordinator import Clock, Coordinator, utc_now
from agent.runtime.events import EventBook, EventSource
from agent.runtime.fleet import Fleet
from agent.runtime.fourcp import FourCpBook
from agent.runtime.inbox import AuditRequest, CommandInbox, Item, Rejection
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard, TaskFactory, supervise
from drivers.errors import AgentError
from drivers.gpus.base import GpuReading
from drivers.grid.base import GridEvent, ProgramKind
from drivers.meters.base import Meter
from drivers.prices.base import PriceSource
from drivers.prices.csv_replay import DayAheadForecast
from drivers.prices.system_load import SystemLoadReplay

log = logging.getLogger(__name__)

_COMMAND_NAMES: dict[type, str] = {
    Curtail: "curtail",
    Release: "release",
    SetMode: "set_mode",
    Refresh: "refresh",
}

CycleHook = Callable[[Snapshot, Plan, Sequence[ActionResult]], Awaitable[None] | None]
Service = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


@runtime_checkable
class PerGpuReadings(Protocol):
    """Optional for a fleet: the latest per-GPU readings of each node (per-GPU metrics)."""

    def readings(self) -> dict[str, tuple[GpuReading, ...]]: ...


@dataclass(frozen=True, slots=True)
class Components:
    """What the runtime drives: built from config by :mod:`agent.runtime.wiring`, or by tests."""

    fleets: Sequence[Fleet]
    price_source: PriceSource | None
    store: Store | None = None  # the journal; also the audit sink when audit is None
    audit: AuditSink | None = None
    grid_sources: Sequence[EventSource] = ()
    hashprice_source: PriceSource | None = None
    day_ahead: DayAheadForecast | None = None
    system_load: SystemLoadReplay | None = None
    meter: Meter | None = None  # the site meter, when the config has a meter: block
    ambient_source: PriceSource | None = None  # a weather feed (ambient.source http_json)
    # Extra long-running tasks (metrics server, MQTT, grid sources...): each gets the stop event.
    services: Sequence[Service] = field(default_factory=tuple)


def first_poll_timeout_s(control: ControlConfig) -> float:
    """How long the first decision waits for every fleet's first poll (then it goes ahead)."""
    return max(30.0, 3 * control.device_timeout_s)


class Agent:
    """The site agent: coordinator + policy + actuator, run by :meth:`run`."""

    def __init__(
        self,
        config: AgentConfig,
        components: Components,
        *,
        state: AgentState | None = None,
        tasks: TaskBoard | None = None,
        observers: Sequence[CycleHook] = (),
        inbox: CommandInbox | None = None,
        watchdog: Callable[[], None] | None = None,
        wake_control: asyncio.Event | None = None,
        event_watch_s: float = 0.5,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.components = components
        # Built by the caller when outputs need it before the agent exists; written only here.
        self.state = state or AgentState(site_id=config.site.id, started_at=clock())
        # The supervised tasks' health (written only by the supervisor; outputs read it).
        self.tasks = tasks if tasks is not None else TaskBoard()
        self.fleets = tuple(components.fleets)
        self.coordinator = Coordinator(
            config,
            self.fleets,
            components.price_source,
            hashprice_source=components.hashprice_source,
            day_ahead=components.day_ahead,
            system_load=components.system_load,
            meter=components.meter,
            ambient_source=components.ambient_source,
            count_rejected=self._count_rejected,
            clock=clock,
            monotonic=monotonic,
        )
        self.meter_watch = self.coordinator.meter_watch
        self.actuator = Actuator(
            config.control,
            self.fleets,
            components.audit or components.store,
            components.store,
            clock=clock,
        )
        self.observers = tuple(observers)
        self.inbox = inbox
        self.watchdog = watchdog  # fed after every cycle (systemd)
        self.operator_mode: Literal["auto", "manual"] = "auto"
        # Set to run a control cycle at once (the fast path); a caller may share it with a part
        # that must wake the loop (a node agent's link, on a new envelope).
        self.wake_control = wake_control if wake_control is not None else asyncio.Event()
        self.limits = CommandLimits.of(config)  # one set of limits for every channel
        self.event_book = EventBook(
            list(components.grid_sources),
            components.store,
            self.coordinator.events,
            on_change=self.wake_control.set,
            count_rejected=self._count_rejected,
            limits=self.limits,
        )
        # The site's demand in 4CP-risk intervals, at the meter when it is trusted.
        self.fourcp_book = FourCpBook(config, components.store)
        self.event_watch_s = event_watch_s  # how often grid sources are checked for changes
        self.first_poll_timeout_s = first_poll_timeout_s(config.control)
        self._adopted = False  # the first poll's adoption, once per process
        # Restart back-off of a supervised task that died: first and longest (tests shorten it).
        self.backoff_s: tuple[float, float] = (0.5, 30.0)

    def pending(self) -> frozenset[str]:
        """Devices whose last command still waits for telemetry to confirm it."""
        return self.actuator.pending()

    def publish(self) -> None:
        """Copy what the parts report into the state outputs read (the only writer)."""
        state = self.state
        state.sources = {n: replace(h) for n, h in self.coordinator.health.items()}
        state.faults = dict(itertools.chain.from_iterable(f.faults().items() for f in self.fleets))
        readings: dict[str, tuple[GpuReading, ...]] = {}
        for fleet in self.fleets:
            if isinstance(fleet, PerGpuReadings):
                readings.update(fleet.readings())
        state.gpu_readings = readings
        state.meter = self.meter_watch.status
        state.fourcp = self.fourcp_book.figures
        thermal = self.coordinator.thermal
        state.thermal_derates = dict(thermal.derates)
        state.thermal_derated = dict(thermal.derated)
        state.safe_reason = self.actuator.safe_reason
        planner = self.coordinator
        state.planner_solve_s = planner.planner_solve_s
        state.planner_status = planner.planner_status
        state.planner_reason = planner.planner_reason
        state.mode = "safe" if state.safe_reason is not None else self.operator_mode

    async def restore_journal(self) -> None:
        """Load commanded states, active events and the 4CP account from the journal (restart
        rule)."""
        await self.fourcp_book.restore()
        self.publish()
        store = self.components.store
        if store is None:
            return
        commanded = await store.commanded_states()
        known = sum(fleet.resume(commanded) for fleet in self.fleets)
        now = self.coordinator.clock()
        for stored in await store.active_events():
            if stored.event.end > now:
                try:  # re-validated as read back: a bad entry is quarantined, never a crash
                    check_event(stored.event, now, self.limits)
                except LimitError as exc:
                    self.event_book.rejected.add(stored.event.event_id)
                    self._count_rejected("journal", "limits")
                    await self.event_book.quarantine(stored.event.event_id, str(exc))
                    continue
                self.coordinator.events[stored.event.event_id] = ActiveEvent(
                    stored.event, stored.baseline_w
                )
        log.info(
            "journal: %d commanded state(s), %d active event(s) resumed",
            known,
            len(self.coordinator.events),
        )

    async def control_cycle(self) -> Plan:
        """One decision: verify last commands, snapshot, decide, actuate, publish."""
        started = time.monotonic()
        await self.actuator.retry_journal()
        missed = await self.actuator.verify()
        # Counted before the first publish: a fault and the action that caused it appear in
        # the same state, never the fault first.
        for r in missed:
            self.state.actions[(r.action.kind.value, r.result)] += 1
        for fleet in self.fleets:
            fleet.reconcile()
        self.publish()
        last = self.state.snapshot
        await self.event_book.sync(
            self.coordinator.clock(), None if last is None else last.measured_site_power_w
        )
        await self._audit_rejected_inputs()
        snapshot = self.coordinator.snapshot()
        await self._audit_meter()
        await self.fourcp_book.record(self.coordinator.market_now(), snapshot)
        plan = decide(snapshot, self.config, snapshot.at)
        if self.state.mode == "manual":
            plan = replace(plan, actions=(), summary=f"manual mode: no actions; {plan.summary}")
        elif self.state.mode == "safe":
            sheds = tuple(a for a in plan.actions if a.sheds)
            why = f"safe mode ({self.state.safe_reason}): sheds only"
            plan = replace(plan, actions=sheds, summary=f"{why}; {plan.summary}")
        self.state.snapshot, self.state.plan = snapshot, plan
        results = await self.actuator.execute(plan) if plan.actions else []
        self.coordinator.spend_ramp(
            sum(r.action.delta_power_w for r in results if r.result == "ok" and not r.action.sheds)
        )
        for r in results:
            self.state.actions[(r.action.kind.value, r.result)] += 1
        self.publish()
        self.state.cycles += 1
        self.state.last_cycle_at = snapshot.at
        self.state.last_cycle_duration_s = time.monotonic() - started
        for observer in self.observers:
            maybe = observer(snapshot, plan, results)
            if maybe is not None:
                await maybe
        if self.watchdog is not None:
            self.watchdog()
        return plan

    async def _control_loop(self, stop: asyncio.Event) -> None:
        if not self._adopted:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.first_poll_timeout_s):
                    # Hold every device where it is until every fleet's first poll (restart rule).
                    await _first(_all_polled(self.fleets), stop.wait())
            if stop.is_set():
                return
            adopted = sum(fleet.adopt_observed() for fleet in self.fleets)
            # Once per process: a control loop restarted by its supervisor keeps its commands.
            self._adopted = True
            log.info("first poll done: %d device(s) adopted at their observed state", adopted)
        interval = self.config.control.interval_s
        while not stop.is_set():
            await self.control_cycle()
            self.wake_control.clear()
            self.coordinator.price_changed.clear()
            await _first(
                asyncio.sleep(interval),
                stop.wait(),
                self.wake_control.wait(),
                self.coordinator.price_changed.wait(),
            )

    async def _audit_meter(self) -> None:
        """Write the meter's trust changes (lost, back) to the audit, once each."""
        pending, self.meter_watch.pending_audit = self.meter_watch.pending_audit, []
        sink = self.components.audit or self.components.store
        if sink is None:
            return
        for action, reason in pending:
            with contextlib.suppress(AgentError):
                await sink.audit(
                    source="meter", device_id=None, action=action, reason=reason, result="ok"
                )

    def _count_rejected(self, source: str, reason: str) -> None:
        self.state.rejected[(source, reason)] += 1

    async def _serve_inbox(self, inbox: CommandInbox, stop: asyncio.Event) -> None:
        """Answer operator commands and count rejected inputs, in the loop's own task."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                getting = asyncio.ensure_future(inbox.next())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()  # a cancelled get() takes nothing off the queue
                    return
                await self._serve(getting.result())
        finally:
            stopping.cancel()

    async def _serve(self, item: Item) -> None:
        if isinstance(item, Rejection):
            self._count_rejected(item.source, item.reason)
            return
        if isinstance(item, AuditRequest):
            await self._audit_rejection(item.source, item.action, item.reason)
            return
        if item.answer.done():  # the sender gave up waiting: nothing to do
            return
        try:
            result = await self.handle_command(item.command)
        except Exception as exc:  # a bug here must not stop the loop's other tasks
            log.exception("command %s failed", item.command.id)
            result = CommandResult.refuse(f"internal error: {type(exc).__name__}")
        if not item.answer.done():
            item.answer.set_result(result)

    async def handle_command(self, command: Command) -> CommandResult:
        """An authenticated operator command (MQTT): act on it, or refuse with the reason.

        Deduplicated through the journal by (operator, id): a command id already answered is
        answered again with its first result and not executed, even after a restart; an id
        another operator already used is refused.
        """
        store = self.components.store
        if store is not None:
            try:
                previous = await store.command_answer(command.id)
            except AgentError as exc:
                return CommandResult.refuse(f"cannot read the command journal: {exc}")
            if previous is not None:
                if previous.operator != command.operator:
                    return CommandResult.refuse(
                        f"command id {command.id!r} was already used by another operator"
                    )
                return CommandResult(previous.accepted, previous.reason)
        result = await self._execute(command)
        if store is not None:
            try:
                await store.record_command_answer(
                    command.id,
                    command.operator,
                    _COMMAND_NAMES[type(command)],
                    result.accepted,
                    result.reason,
                )
            except AgentError as exc:  # answered all the same; a replay may then run it again
                log.error("cannot journal the answer to command %s: %s", command.id, exc)
        return result

    async def _execute(self, command: Command) -> CommandResult:
        if isinstance(command, Curtail):
            now = self.coordinator.clock()
            if self.operator_mode == "manual":
                # Manual mode sends no device commands: "accepted" would be a promise not kept.
                return CommandResult.refuse("manual mode: the agent sends no device commands")
            try:
                target_kw = check_target_kw(command.target_kw, self.limits, "target_kw")
                until = check_end(command.until, now, self.limits, "until")
            except LimitError as exc:
                return CommandResult.refuse(str(exc))
            event = GridEvent(
                event_id=f"override-{command.id}",
                source=f"operator:{command.operator}",
                program="operator-override",
                kind=ProgramKind.OVERRIDE,
                start=now,
                end=until,
                max_site_kw=target_kw,
            )
            try:
                await self.event_book.add_override(event, command.operator, "MQTT command")
            except AgentError as exc:
                return CommandResult.refuse(f"cannot journal the override: {exc}")
            return CommandResult.ok(f"{event.event_id}: site load at most {target_kw} kW")
        if isinstance(command, Release):
            try:
                released = await self.event_book.release_overrides(command.operator)
            except AgentError as exc:
                return CommandResult.refuse(f"cannot journal the release: {exc}")
            if not released:
                return CommandResult.refuse("no operator override is in force")
            return CommandResult.ok(f"released {', '.join(released)}")
        if isinstance(command, SetMode):
            if self.actuator.safe_reason is not None:
                return CommandResult.refuse(
                    f"safe mode ({self.actuator.safe_reason}) cannot be left"
                )
            self.operator_mode = command.mode
            self.publish()
            await self._audit_command(command.operator, f"set_mode:{command.mode}")
            self.wake_control.set()
            return CommandResult.ok(f"mode {command.mode}")
        self.wake_control.set()  # Refresh
        return CommandResult.ok("control cycle requested")

    async def _audit_rejected_inputs(self) -> None:
        """Refused feed answers reach the audit trail (design.md: bad input, an audit row)."""
        queue = self.coordinator.rejected_to_audit
        while queue:
            source, reason = queue.popleft()
            await self._audit_rejection(source, "reject_input", reason)

    async def _audit_rejection(self, source: str, action: str, reason: str) -> None:
        sink = self.components.audit or self.components.store
        if sink is None:
            return
        with contextlib.suppress(AgentError):  # a journal failure is handled elsewhere
            await sink.audit(
                source=source, device_id=None, action=action, reason=reason, result="rejected"
            )

    async def _audit_command(self, operator: str, action: str) -> None:
        sink = self.components.audit or self.components.store
        if sink is None:
            return
        with contextlib.suppress(AgentError):
            await sink.audit(
                source=f"operator:{operator}",
                device_id=None,
                action=action,
                reason="MQTT command",
                result="accepted",
            )

    def _event_signature(self, operator_ids: frozenset[str]) -> tuple[frozenset[str], ...]:
        now = self.coordinator.clock()
        offered: set[GridEvent] = set()
        for source in self.components.grid_sources:
            with contextlib.suppress(AgentError):
                offered.update(source.events())
        active = frozenset(e.event_id for e in offered if e.active_at(now)) | frozenset(
            eid for eid, a in self.coordinator.events.items() if a.event.active_at(now)
        )
        return frozenset(f"{e.event_id}:{hash(e)}" for e in offered), active, operator_ids

    async def _event_watch(self, stop: asyncio.Event) -> None:
        """The fast path: run a control cycle at once when an event appears, starts or ends."""
        store = self.components.store
        last: tuple[frozenset[str], ...] | None = None
        while not stop.is_set():
            operator_ids: frozenset[str] = frozenset()
            if store is not None:
                with contextlib.suppress(AgentError):
                    operator_ids = frozenset(
                        s.event.event_id
                        for s in await store.active_events()
                        if s.event.source.startswith("operator")
                    )
            signature = self._event_signature(operator_ids)
            if last is not None and signature != last:
                self.wake_control.set()
            last = signature
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.event_watch_s)

    async def _poll(
        self, poll: Callable[[], Awaitable[None]], every_s: float, stop: asyncio.Event
    ) -> None:
        """A poller that publishes what it learnt after every poll."""

        async def poll_and_publish() -> None:
            await poll()
            self.publish()

        await self.coordinator.run_poller(poll_and_publish, every_s, stop)

    async def run(self, stop: asyncio.Event, *, grace_s: float = 3.0) -> None:
        """Run until ``stop`` is set; then give tasks ``grace_s`` to finish, and cancel the rest."""
        control = self.config.control
        coordinator = self.coordinator
        await self.restore_journal()
        loops: dict[str, TaskFactory] = {
            "control": lambda: self._control_loop(stop),
            "event_watch": lambda: self._event_watch(stop),
        }
        for fleet in self.fleets:

            async def poll_fleet(fleet: Fleet = fleet) -> None:
                await coordinator.poll_fleet(fleet)

            name = _unique(loops, f"poll:{getattr(fleet, 'name', type(fleet).__name__)}")
            loops[name] = functools.partial(self._poll, poll_fleet, control.poll_interval_s, stop)
            # Opens the fleet's drivers, closes them at stop.
            loops[_unique(loops, name.replace("poll:", "fleet:"))] = functools.partial(
                fleet.run, stop
            )
        if self.config.meter is not None and self.components.meter is not None:
            loops["meter"] = functools.partial(
                self._poll, self.meter_watch.poll, self.config.meter.poll_s, stop
            )
        feed = self.config.ambient.feed
        if self.components.ambient_source is not None and feed is not None:
            loops["ambient"] = functools.partial(
                self._poll, self.meter_watch.poll_ambient, feed.poll_interval_s, stop
            )
        if self.components.hashprice_source is not None:
            every = self.config.economics.hashprice.poll_interval_s
            loops["hashprice"] = functools.partial(
                self._poll, coordinator.poll_hashprice, every, stop
            )
        if self.components.price_source is not None:
            price_every = min(control.poll_interval_s, control.interval_s)
            loops["price"] = functools.partial(
                self._poll, coordinator.poll_price, price_every, stop
            )
        if coordinator.day_ahead is not None:
            # Cheap when nothing changed: it re-plans only on a new hour, a new forecast or new
            # deferrable work, which waits for it (so it looks every poll, 5 to 60 s apart).
            every = min(max(control.poll_interval_s, 5.0), 60.0)
            loops["horizon"] = functools.partial(
                self._poll, coordinator.refresh_horizon, every, stop
            )
        if self.inbox is not None:
            inbox = self.inbox
            loops["inbox"] = functools.partial(self._serve_inbox, inbox, stop)
        for service in self.components.services:
            loops[_unique(loops, _service_name(service))] = functools.partial(service, stop)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        supervise(
                            name,
                            factory,
                            stop,
                            self.tasks,
                            initial_backoff_s=self.backoff_s[0],
                            max_backoff_s=self.backoff_s[1],
                        ),
                        name=name,
                    )
                    for name, factory in loops.items()
                ]
                tg.create_task(_cancel_after_grace(stop, tasks, grace_s))
        finally:
            # Sources that own connections (HTTP clients) expose aclose().
            for source in (
                self.components.price_source,
                self.components.hashprice_source,
                self.components.ambient_source,
            ):
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
            if self.components.meter is not None:
                await self.components.meter.close()
        log.info("agent stopped after %d cycle(s)", self.state.cycles)


def _unique(taken: dict[str, TaskFactory], name: str) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}#{n}"
    return out


def _service_name(service: Callable[..., object]) -> str:
    """The task name of a service: its ``task_name``, its owner's ``name``, or its own name."""
    named = getattr(service, "task_name", None)
    if isinstance(named, str):
        return named
    owner = getattr(service, "__self__", None)
    owner_name = getattr(owner, "name", None)
    if isinstance(owner_name, str):
        return owner_name
    qualname = str(getattr(service, "__qualname__", type(service).__name__))
    if ".<locals>" in qualname:  # a closure made by e.g. metrics_service(): "metrics"
        return qualname.split(".<locals>")[0].removesuffix("_service")
    return qualname.split(".")[0].lower()


async def _all_polled(fleets: Sequence[Fleet]) -> None:
    for fleet in fleets:
        await fleet.polled.wait()


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _cancel_after_grace(
    stop: asyncio.Event, tasks: list[asyncio.Task[None]], grace_s: float
) -> None:
    await stop.wait()
    _done, pending = await asyncio.wait(tasks, timeout=grace_s)
    for t in pending:
        log.warning("task %s did not stop within %.1f s; cancelling", t.get_coro(), grace_s)
        t.cancel()
