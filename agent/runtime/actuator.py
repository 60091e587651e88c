"""The actuator: turns a Plan's actions into fleet commands, and has fleets check them.

Sheds run first and must finish before anything starts (never exceed a limit while switching).
Each command goes to the fleet that owns its device (:mod:`agent.runtime.fleet`), under one
semaphore with its own timeout, and transient failures are retried with capped backoff. A
command the fleet accepts is journaled; the fleet then checks it in telemetry and reports what
was accepted but not applied (:meth:`Actuator.verify`). The policy leaves a faulted device alone
and counts it at its measured power, so the next cycle sheds someone else.

Every action and its result is audited through the :class:`AuditSink`. A journal or audit write
that fails puts the actuator in safe mode (:attr:`Actuator.safe_reason`: sheds only) until a
write works again. The actuator writes no shared state: it returns its results, and the loop
publishes them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.control.config import ControlConfig
from agent.control.domain import Action, Plan
from agent.runtime.fleet import Fleet
from drivers.errors import AgentError, DeviceError, DeviceTimeout, TransientDeviceError

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


class Actuator:
    """Executes plans through the fleets, journals and audits every action."""

    def __init__(
        self,
        control: ControlConfig,
        fleets: Sequence[Fleet],
        audit: AuditSink | None = None,
        journal: Journal | None = None,
        *,
        clock: Callable[[], datetime],
        backoff_s: float = 0.2,
    ) -> None:
        self.control = control
        self.fleets = tuple(fleets)
        self.audit_sink: AuditSink = audit or LogAudit()
        self.journal = journal
        self.clock = clock
        self.backoff_s = backoff_s
        self.semaphore = asyncio.Semaphore(control.max_concurrency)
        # Why the actuator is in safe mode (a journal or audit write failed), or None.
        self.safe_reason: str | None = None

    def fleet_of(self, device_id: str) -> Fleet | None:
        return next((f for f in self.fleets if f.owns(device_id)), None)

    def pending(self) -> frozenset[str]:
        """Devices whose last command is still waiting for telemetry."""
        return frozenset(itertools.chain.from_iterable(f.pending() for f in self.fleets))

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
            unconfirmed = [r for r in results if r.action.sheds and self._unconfirmed(r.action)]
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
                    await self._audit(a, "skipped", why)
                break
        return results

    def _unconfirmed(self, action: Action) -> bool:
        fleet = self.fleet_of(action.device_id)
        return fleet is not None and fleet.unconfirmed(action.device_id)

    async def _run(self, action: Action) -> ActionResult:
        fleet = self.fleet_of(action.device_id)
        if fleet is None:
            return await self._finish(action, "failed", "no fleet owns this device")
        attempts = self.control.retries + 1
        error: DeviceError | None = None
        for attempt in range(attempts):
            try:
                async with self.semaphore:
                    async with asyncio.timeout(self.control.device_timeout_s):
                        await fleet.apply(action)
            except TimeoutError:
                error = DeviceTimeout(action.device_id, f"{action.kind} timed out")
            except TransientDeviceError as exc:
                error = exc
            except DeviceError as exc:
                error = exc
                break  # permanent: retrying will not help
            else:
                if self.journal is not None:
                    await self._journal(action.job_id or action.device_id, action.target)
                return await self._finish(action, "ok", None)
            if attempt + 1 < attempts:
                await asyncio.sleep(min(self.backoff_s * 2**attempt, 5.0))
        assert error is not None
        fleet.command_failed(action, error.message)
        return await self._finish(action, "failed", error.message)

    async def _journal(self, key: str, state: str) -> None:
        assert self.journal is not None
        try:
            await self.journal.record_command(key, state, self.clock())
        except AgentError as exc:
            self.enter_safe_mode(f"journal write failed: {exc}")

    def enter_safe_mode(self, why: str) -> None:
        """Stop adding load: without a journal a restart could not know what was shed."""
        if self.safe_reason is None:
            log.error("entering safe mode (sheds only, no restores): %s", why)
        self.safe_reason = why

    async def _finish(self, action: Action, result: str, error: str | None) -> ActionResult:
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
            self.enter_safe_mode(f"audit write failed: {exc}")

    async def retry_journal(self) -> bool:
        """After a journal failure, try writing again; leave safe mode when it works.

        The probe is an audit row (an insert, so it needs free space, unlike overwriting a
        commanded state in place), then every commanded state: the commands whose journaling
        failed are made durable before anything may be restored. Returns True on recovery.
        """
        if self.safe_reason is None:
            return False
        try:
            await self.audit_sink.audit(
                source="agent",
                device_id=None,
                action="journal",
                reason=f"journal writable again after: {self.safe_reason}",
                result="recovered",
            )
            if self.journal is not None:
                await self.journal.record_commands(
                    itertools.chain.from_iterable(f.commanded() for f in self.fleets)
                )
        except AgentError:
            return False  # still failing: stay in safe mode, try again next cycle
        log.warning("journal writable again; leaving safe mode (%s)", self.safe_reason)
        self.safe_reason = None
        return True

    async def verify(self) -> list[ActionResult]:
        """Ask every fleet to check its pending commands; audit what was not applied."""
        out: list[ActionResult] = []
        for fleet in self.fleets:
            for missed in fleet.verify():
                out.append(ActionResult(missed.action, "not_applied", missed.reason))
                await self._audit(missed.action, "not_applied", missed.reason)
        return out
