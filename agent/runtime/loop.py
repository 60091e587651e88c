"""The agent's main loop: one TaskGroup owns every long-running task.

Tasks: the miner poller and price poller (coordinator), the control loop (snapshot → decide →
actuate → verify), and any outputs handed in (metrics server, MQTT). The control loop runs every
``control.interval_s`` and at once when the price interval changes or a grid event starts or
ends (the fast path). It waits for the first full poll before the first decision, so a restart
never commands from ignorance.

Stopping: setting the ``stop`` event (SIGTERM/SIGINT in :mod:`agent.runtime.daemon`) lets every
loop finish its current step; anything still running after ``grace_s`` is cancelled, so the
process exits within seconds even if a device call hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.control.config import AgentConfig
from agent.control.domain import ActiveEvent, Plan, Snapshot
from agent.control.policy import decide
from agent.journal.store import Store
from agent.outputs.logs import log_cycle
from agent.outputs.mqtt import Command, CommandResult, Curtail, Release, SetMode
from agent.runtime.actuator import ActionResult, Actuator, AuditSink
from agent.runtime.coordinator import Clock, Coordinator, utc_now
from agent.runtime.events import EventBook, EventSource
from agent.runtime.fleet import GpuFleet
from agent.runtime.state import AgentState
from drivers.errors import AgentError
from drivers.grid.base import GridEvent, ProgramKind
from drivers.miners.base import MinerSleepWake, MinerTelemetry
from drivers.prices.base import PriceSource
from drivers.prices.csv_replay import DayAheadForecast
from drivers.prices.system_load import SystemLoadReplay

log = logging.getLogger(__name__)


class MinerDevice(MinerTelemetry, MinerSleepWake, Protocol):
    """A miner driver that can be read and put to sleep or woken."""


CycleHook = Callable[[Snapshot, Plan, Sequence[ActionResult]], Awaitable[None] | None]


@dataclass(slots=True)
class Components:
    """What the runtime drives: built from config by :mod:`agent.runtime.wiring`, or by tests."""

    miners: Mapping[str, MinerDevice]
    price_source: PriceSource | None
    audit: AuditSink | None = None
    store: Store | None = None  # the journal; also the audit sink when audit is None
    grid_sources: list[EventSource] = field(default_factory=list)
    gpu_fleet: GpuFleet | None = None
    hashprice_source: PriceSource | None = None
    day_ahead: DayAheadForecast | None = None
    system_load: SystemLoadReplay | None = None
    # Extra long-running tasks (metrics server, MQTT...): each gets the stop event.
    services: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = field(
        default_factory=list
    )


class Agent:
    """The site agent: coordinator + policy + actuator, run by :meth:`run`."""

    def __init__(
        self,
        config: AgentConfig,
        components: Components,
        *,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        on_cycle: CycleHook | None = None,
    ) -> None:
        self.config = config
        self.components = components
        self.state = AgentState(site_id=config.site.id, started_at=clock())
        self.coordinator = Coordinator(
            config,
            self.state,
            components.miners,
            components.price_source,
            clock=clock,
            monotonic=monotonic,
        )
        self.coordinator.gpu_fleet = components.gpu_fleet
        self.coordinator.hashprice_source = components.hashprice_source
        self.coordinator.day_ahead = components.day_ahead
        self.coordinator.system_load = components.system_load
        self.actuator = Actuator(
            self.coordinator,
            self.state,
            components.miners,
            components.audit or components.store,
            components.store,
        )
        self.on_cycle = on_cycle
        self.wake_control = asyncio.Event()  # set to run a control cycle at once (fast path)
        self.event_book = EventBook(
            components.grid_sources,
            components.store,
            self.coordinator.events,
            on_change=self.wake_control.set,
        )
        self.event_book.count_rejected = self._count_rejected
        self.event_watch_s = 0.5
        self.metrics_port: int | None = None  # set by the metrics service once bound
        self.first_poll_timeout_s = max(30.0, 3 * config.control.device_timeout_s)
        self.watchdog: Callable[[], None] | None = None  # fed after every cycle (systemd)

    async def restore_journal(self) -> None:
        """Load commanded states and active events from the journal (restart rule)."""
        store = self.components.store
        if store is None:
            return
        known = 0
        for device_id, (point, since) in (await store.commanded_states()).items():
            slot = self.coordinator.slots.get(device_id)
            if slot is None or all(p.name != point for p in slot.points):
                continue  # a device no longer configured, or a profile that no longer exists
            self.coordinator.set_commanded(device_id, point, since)
            self.coordinator.journaled.add(device_id)
            known += 1
        now = self.coordinator.clock()
        for stored in await store.active_events():
            if stored.event.end > now:
                self.coordinator.events[stored.event.event_id] = ActiveEvent(
                    stored.event, stored.baseline_w
                )
        log.info(
            "journal: %d commanded state(s), %d active event(s) resumed",
            known,
            len(self.coordinator.events),
        )

    async def control_cycle(self) -> Plan:
        """One decision: verify last commands, snapshot, decide, actuate."""
        started = time.monotonic()
        await self.actuator.retry_journal()
        await self.actuator.verify()
        self.coordinator.reconcile_drift(set(self.actuator.pending))
        last = self.state.snapshot
        await self.event_book.sync(
            self.coordinator.clock(), None if last is None else last.measured_site_power_w
        )
        await self._audit_rejected_inputs()
        snapshot = self.coordinator.snapshot()
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
        self.state.cycles += 1
        self.state.last_cycle_at = snapshot.at
        self.state.last_cycle_duration_s = time.monotonic() - started
        log_cycle(
            log,
            plan,
            cycle=self.state.cycles,
            duration_s=self.state.last_cycle_duration_s,
            snapshot=snapshot,
            mode=self.state.mode,
        )
        if self.on_cycle is not None:
            maybe = self.on_cycle(snapshot, plan, results)
            if maybe is not None:
                await maybe
        if self.watchdog is not None:
            self.watchdog()
        return plan

    async def _control_loop(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.first_poll_timeout_s):
                # Hold every device where it is until the first full fleet poll (restart rule).
                await _first(self.coordinator.miners_polled.wait(), stop.wait())
        if stop.is_set():
            return
        adopted = self.coordinator.adopt_observed_state()
        log.info("first poll done: %d miner(s) adopted at their observed operating point", adopted)
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

    def _count_rejected(self, source: str, reason: str) -> None:
        self.state.rejected[(source, reason)] += 1

    async def handle_command(self, command: Command) -> CommandResult:
        """An authenticated operator command (MQTT): act on it, or refuse with the reason."""
        if isinstance(command, Curtail):
            now = self.coordinator.clock()
            if command.until <= now:
                return CommandResult.refuse(
                    f"until {command.until.isoformat()} is not in the future"
                )
            event = GridEvent(
                event_id=f"override-{command.id}",
                source=f"operator:{command.operator}",
                program="operator-override",
                kind=ProgramKind.OVERRIDE,
                start=now,
                end=command.until,
                max_site_kw=command.target_kw,
            )
            try:
                await self.event_book.add_override(event, command.operator, "MQTT command")
            except AgentError as exc:
                return CommandResult.refuse(f"cannot journal the override: {exc}")
            return CommandResult.ok(f"{event.event_id}: site load at most {command.target_kw} kW")
        if isinstance(command, Release):
            released = await self.event_book.release_overrides(command.operator)
            if not released:
                return CommandResult.refuse("no operator override is in force")
            return CommandResult.ok(f"released {', '.join(released)}")
        if isinstance(command, SetMode):
            if self.state.mode == "safe":
                return CommandResult.refuse(f"safe mode ({self.state.safe_reason}) cannot be left")
            self.state.mode = command.mode
            await self._audit_command(command.operator, f"set_mode:{command.mode}")
            self.wake_control.set()
            return CommandResult.ok(f"mode {command.mode}")
        self.wake_control.set()  # Refresh
        return CommandResult.ok("control cycle requested")

    async def _audit_rejected_inputs(self) -> None:
        """Refused feed answers reach the audit trail (design.md: bad input, an audit row)."""
        queue = self.coordinator.rejected_to_audit
        sink = self.components.audit or self.components.store
        while queue:
            source, reason = queue.popleft()
            if sink is None:
                continue
            with contextlib.suppress(AgentError):  # a journal failure is handled elsewhere
                await sink.audit(
                    source=source,
                    device_id=None,
                    action="reject_input",
                    reason=reason,
                    result="rejected",
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

    async def run(self, stop: asyncio.Event, *, grace_s: float = 3.0) -> None:
        """Run until ``stop`` is set; then give tasks ``grace_s`` to finish, and cancel the rest."""
        control = self.config.control
        await self.restore_journal()
        loops: list[Coroutine[Any, Any, None]] = [
            self.coordinator.run_poller(
                self.coordinator.poll_miners, control.poll_interval_s, stop
            ),
            self._control_loop(stop),
            self._event_watch(stop),
        ]
        fleet = self.components.gpu_fleet
        if fleet is not None:

            async def poll_gpus() -> None:
                health = self.state.source("gpus")
                try:
                    await fleet.poll()
                except AgentError as exc:  # the fleet keeps its last good readings
                    if health.last_error is None:
                        log.warning("GPU poll failed: %s", exc)
                    health.last_error, health.failures = str(exc), health.failures + 1
                    return
                health.last_error, health.last_success = None, self.coordinator.clock()
                health.successes += 1
                self.state.gpu_readings = fleet.readings()
                # GPU node faults join the miners' in the one fault list outputs read.
                for node in fleet.views(self.coordinator.clock()):
                    if node.fault is None:
                        self.state.faults.pop(node.device_id, None)
                    else:
                        self.state.faults[node.device_id] = node.fault

            loops.append(self.coordinator.run_poller(poll_gpus, control.poll_interval_s, stop))
        if self.components.hashprice_source is not None:
            every = self.config.economics.hashprice.poll_interval_s
            loops.append(self.coordinator.run_poller(self.coordinator.poll_hashprice, every, stop))
        if self.components.price_source is not None:
            price_every = min(control.poll_interval_s, control.interval_s)
            loops.append(
                self.coordinator.run_poller(self.coordinator.poll_price, price_every, stop)
            )
        loops.extend(service(stop) for service in self.components.services)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c) for c in loops]
                tg.create_task(_cancel_after_grace(stop, tasks, grace_s))
        finally:
            # Sources that own connections (HTTP clients) expose aclose().
            for source in (self.components.price_source, self.components.hashprice_source):
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
        log.info("agent stopped after %d cycle(s)", self.state.cycles)


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
