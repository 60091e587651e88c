"""The actuator: turns a Plan's actions into device commands, and checks they took effect.

Sheds run first and must finish before anything starts (never exceed a limit while switching).
Each command runs under the fleet semaphore with its own timeout, and transient failures are
retried with capped backoff. A command the device accepts is recorded as commanded and then
verified against telemetry: if the device has not reached the commanded point within
``control.verify_after_s``, it is marked faulted ("accepted but not applied"). The policy leaves
a faulted device alone and counts it at its measured power, so the next cycle sheds someone
else. A faulted device is given another chance after ``fault_retry_s``, or at once when
telemetry shows it where it was commanded.

Every action and its result is audited through the :class:`AuditSink`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.control.domain import SLEEP, Action, ActionKind, Plan
from agent.runtime.coordinator import Coordinator
from agent.runtime.fleet import GPU_ACTIONS
from agent.runtime.state import AgentState
from drivers.errors import AgentError, DeviceError, DeviceTimeout, TransientDeviceError
from drivers.miners.base import MinerMode, MinerPowerProfile, MinerSleepWake

log = logging.getLogger(__name__)


class AuditSink(Protocol):
    """Where audit rows go (the SQLite journal in production)."""

    async def audit(
        self, *, source: str, device_id: str | None, action: str, reason: str, result: str
    ) -> None: ...


class Journal(Protocol):
    """Where commanded states are made durable (the SQLite journal in production)."""

    async def record_command(self, device_id: str, state: str, since: datetime) -> None: ...

    async def record_commands(self, commands: Iterable[tuple[str, str, datetime]]) -> None: ...


class LogAudit:
    """An audit sink that only logs (used when no journal is configured)."""

    async def audit(
        self, *, source: str, device_id: str | None, action: str, reason: str, result: str
    ) -> None:
        log.info("audit %s %s %s: %s (%s)", source, device_id, action, result, reason)


@dataclass(frozen=True, slots=True)
class ActionResult:
    action: Action
    result: str  # "ok", "failed", "not_applied"
    error: str | None = None


@dataclass(slots=True)
class _Pending:
    action: Action
    issued_at: float  # monotonic
    deadline: float


class Actuator:
    """Executes plans against miner drivers and verifies them in telemetry."""

    def __init__(
        self,
        coordinator: Coordinator,
        state: AgentState,
        drivers: Mapping[str, MinerSleepWake],
        audit: AuditSink | None = None,
        journal: Journal | None = None,
        *,
        fault_retry_s: float | None = None,
        backoff_s: float = 0.2,
    ) -> None:
        self.coordinator = coordinator
        self.config = coordinator.config
        self.state = state
        self.drivers = drivers
        self.audit_sink: AuditSink = audit or LogAudit()
        self.journal = journal
        self.fault_retry_s = (
            coordinator.config.control.fault_retry_s if fault_retry_s is None else fault_retry_s
        )
        self.backoff_s = backoff_s
        self.semaphore = asyncio.Semaphore(self.config.control.max_concurrency)
        self.pending: dict[str, _Pending] = {}
        self.journal_failed = False  # safe mode was entered because the journal failed
        # Devices faulted because a command failed: being where they were proves nothing, so
        # only fault_retry_s gives them another chance.
        self.command_failed: set[str] = set()
        self.monotonic: Callable[[], float] = coordinator.monotonic
        self.clock: Callable[[], datetime] = coordinator.clock

    async def execute(self, plan: Plan) -> list[ActionResult]:
        """Run the plan's actions: all sheds, then all starts. Returns one result per action."""
        sheds = [a for a in plan.actions if a.sheds]
        starts = [a for a in plan.actions if not a.sheds]
        results: list[ActionResult] = []
        for batch in (sheds, starts):
            if not batch:
                continue
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._run(a)) for a in batch]
            results.extend(t.result() for t in tasks)
            failed_sheds = [r for r in results if r.result != "ok" and r.action.sheds]
            # A device on probation once acknowledged a command and ignored it: its shed is
            # not headroom until telemetry shows it (the next cycle counts what it draws).
            slots = self.coordinator.slots
            unconfirmed = [
                r
                for r in results
                if r.action.sheds
                and r.action.device_id in slots
                and slots[r.action.device_id].probation
            ]
            if batch is sheds and (failed_sheds or unconfirmed) and starts:
                # A shed that failed leaves less headroom than planned: starting devices now
                # could exceed the limit. The next cycle re-plans with the fault known.
                why = (
                    "a shed in this cycle failed"
                    if failed_sheds
                    else "a shed in this cycle is unconfirmed (device on probation)"
                )
                for a in starts:
                    results.append(ActionResult(a, "skipped", why))
                    self.state.actions[(a.kind.value, "skipped")] += 1
                    await self._audit(a, "skipped", why)
                break
        return results

    async def _run(self, action: Action) -> ActionResult:
        driver = self.drivers.get(action.device_id)
        attempts = self.config.control.retries + 1
        error: DeviceError | None = None
        for attempt in range(attempts):
            try:
                async with self.semaphore:
                    async with asyncio.timeout(self.config.control.device_timeout_s):
                        await self._command(driver, action)
            except TimeoutError:
                error = DeviceTimeout(action.device_id, f"{action.kind} timed out")
            except TransientDeviceError as exc:
                error = exc
            except DeviceError as exc:
                error = exc
                break  # permanent: retrying will not help
            else:
                now = self.clock()
                key = action.job_id or action.device_id
                if action.device_id in self.coordinator.slots:
                    self.coordinator.set_commanded(action.device_id, action.target, now)
                if self.journal is not None:
                    await self._journal(key, action.target, now)
                if action.kind not in GPU_ACTIONS:  # the GPU fleet verifies its own actions
                    mono = self.monotonic()
                    self.pending[action.device_id] = _Pending(
                        action, mono, mono + self.config.control.verify_after_s
                    )
                return await self._finish(action, "ok", None)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(self.backoff_s * 2**attempt, 5.0))
        assert error is not None
        if action.device_id in self.coordinator.slots:
            self.coordinator.set_fault(action.device_id, f"{action.kind} failed: {error.message}")
            self.command_failed.add(action.device_id)
        return await self._finish(action, "failed", error.message)

    async def _command(self, driver: MinerSleepWake | None, action: Action) -> None:
        if action.kind in GPU_ACTIONS:
            fleet = self.coordinator.gpu_fleet
            if fleet is None:
                raise DeviceError(action.device_id, "no GPU fleet is configured")
            await fleet.apply(action)
            return
        if driver is None:
            raise DeviceError(action.device_id, "no driver for this device")
        if action.kind is ActionKind.SLEEP:
            await driver.sleep()
        elif action.kind is ActionKind.WAKE:
            if isinstance(driver, MinerPowerProfile):
                await driver.set_profile(action.target)
            await driver.wake()
        elif action.kind is ActionKind.SET_PROFILE:
            if not isinstance(driver, MinerPowerProfile):
                raise DeviceError(action.device_id, "this miner cannot change power profile")
            await driver.set_profile(action.target)
        else:
            raise DeviceError(action.device_id, f"action {action.kind} is not for miners")

    async def _journal(self, device_id: str, state: str, since: datetime) -> None:
        assert self.journal is not None
        try:
            await self.journal.record_command(device_id, state, since)
        except AgentError as exc:
            self.journal_failed = True
            self.enter_safe_mode(f"journal write failed: {exc}")

    def enter_safe_mode(self, why: str) -> None:
        """Stop adding load: without a journal a restart could not know what was shed."""
        if self.state.mode != "safe":
            log.error("entering safe mode (sheds only, no restores): %s", why)
        self.state.mode = "safe"
        self.state.safe_reason = why

    async def _finish(self, action: Action, result: str, error: str | None) -> ActionResult:
        self.state.actions[(action.kind.value, result)] += 1
        if result != "ok":
            log.warning(
                "%s %s -> %s %s: %s", action.device_id, action.kind, action.target, result, error
            )
        await self._audit(action, result, error)
        return ActionResult(action, result, error)

    async def _audit(self, action: Action, result: str, error: str | None) -> None:
        reason = action.reason if error is None else f"{action.reason}; error: {error}"
        try:
            await self.audit_sink.audit(
                source="policy",
                device_id=action.device_id,
                action=f"{action.kind.value}:{action.target}",
                reason=reason,
                result=result,
            )
        except AgentError as exc:
            self.journal_failed = True
            self.enter_safe_mode(f"audit write failed: {exc}")

    async def retry_journal(self) -> bool:
        """After a journal failure, try writing again; leave safe mode when it works.

        The probe is an audit row (an insert, so it needs free space, unlike overwriting a
        commanded state in place), then every commanded state: the commands whose journaling
        failed are made durable before anything may be restored. Returns True on recovery.
        """
        if not self.journal_failed or self.state.mode != "safe":
            return False
        try:
            await self.audit_sink.audit(
                source="agent",
                device_id=None,
                action="journal",
                reason=f"journal writable again after: {self.state.safe_reason}",
                result="recovered",
            )
            if self.journal is not None:
                slots = self.coordinator.slots.values()
                await self.journal.record_commands(
                    (s.device_id, s.commanded, s.commanded_since) for s in slots
                )
        except AgentError:
            return False  # still failing: stay in safe mode, try again next cycle
        log.warning("journal writable again; leaving safe mode (%s)", self.state.safe_reason)
        self.journal_failed = False
        self.state.mode, self.state.safe_reason = "auto", None
        return True

    async def verify(self) -> list[ActionResult]:
        """Check pending commands against telemetry; fault devices that did not comply."""
        now = self.monotonic()
        out: list[ActionResult] = []
        for device_id, pending in list(self.pending.items()):
            slot = self.coordinator.slots[device_id]
            fresh = slot.read_at is not None and slot.read_at > pending.issued_at
            if fresh and self._complies(device_id, pending.action.target):
                del self.pending[device_id]
                slot.probation = False
                continue
            if now < pending.deadline:
                continue
            del self.pending[device_id]
            seen = "no fresh telemetry" if not fresh else self._describe(device_id)
            act = pending.action
            reason = f"{act.kind} to {act.target} accepted but not applied ({seen})"
            self.coordinator.set_fault(device_id, reason)
            result = ActionResult(pending.action, "not_applied", reason)
            self.state.actions[(pending.action.kind.value, "not_applied")] += 1
            await self._audit(pending.action, "not_applied", reason)
            out.append(result)
        self._retry_faults(now)
        return out

    def _complies(self, device_id: str, target: str) -> bool:
        reading = self.coordinator.slots[device_id].reading
        if reading is None:
            return False
        if target == SLEEP:
            return reading.mode is MinerMode.SLEEPING
        if reading.mode is MinerMode.SLEEPING:
            return False
        # Waking counts (it is ramping towards its profile), but only at the right profile.
        return reading.profile is None or reading.profile == target

    def _describe(self, device_id: str) -> str:
        r = self.coordinator.slots[device_id].reading
        if r is None:
            return "no telemetry"
        return f"telemetry shows {r.mode.value} at {r.power_w:.0f} W, profile {r.profile}"

    def _retry_faults(self, now: float) -> None:
        """Clear faults that telemetry contradicts, or that have waited ``fault_retry_s``."""
        for slot in self.coordinator.slots.values():
            if slot.fault is None or slot.device_id in self.pending:
                continue
            # Only a reading taken since the fault counts: the last good one from before it
            # would show the device where it was, "healed" at once (a device rejecting every
            # command would be retried every cycle).
            since = slot.fault_since
            if slot.read_at is None or since is None or slot.read_at <= since:
                continue
            observed = self.coordinator.observed_point(slot)
            healed = (
                observed is not None
                and observed == slot.commanded
                and slot.device_id not in self.command_failed
            )
            expired = slot.fault_since is not None and now - slot.fault_since >= self.fault_retry_s
            if healed or (expired and observed is not None):
                # Adopt what telemetry shows, so the policy re-commands from the truth.
                assert observed is not None
                self.coordinator.set_commanded(slot.device_id, observed, self.clock())
                self.coordinator.set_fault(slot.device_id, None)
                self.command_failed.discard(slot.device_id)
                # Retried, not healed: trusted again only once a command is seen to apply.
                slot.probation = not healed
