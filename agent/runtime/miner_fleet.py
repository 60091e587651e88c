"""The miners as one :class:`~agent.runtime.fleet.Fleet`: drivers, readings, commands, faults.

One :class:`MinerSlot` per configured miner holds everything the runtime knows about it: its
operating points, the last good reading and its (monotonic) time, what was commanded and since
when, the command waiting for telemetry, its fault and probation. Only this module reads or
writes slots.

Commands are checked in telemetry: a command the miner accepted is pending until a reading
taken after it shows the miner at the target (asleep, or awake at the target profile), or until
``verify_after_s``; then it is reported as not applied and the miner held faulted. A faulted
miner gets another chance after ``fault_retry_s``, or at once when telemetry shows it where it
was commanded. Given another chance after a fault, it is on probation: not trusted to follow a
command until telemetry confirms one, so it counts at what it draws meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from agent.control.config import AgentConfig
from agent.control.domain import SLEEP, Action, ActionKind, MinerView, OperatingPoint
from agent.control.site import miner_ladder
from agent.runtime.fleet import FleetViews, NotApplied
from drivers.errors import DeviceError
from drivers.miners.base import (
    MinerCapability,
    MinerCredentials,
    MinerMode,
    MinerPowerProfile,
    MinerReading,
    MinerSleepWake,
    MinerTelemetry,
)

log = logging.getLogger(__name__)

FAILED_POLLS_FOR_FAULT = 3
# Login tokens renewed ahead of need per poll interval (MinerFleet.run): a 10,000-miner fleet
# warms every token in a few minutes without a burst of logins.
CREDENTIALS_PER_ROUND = 250
CREDENTIALS_MIN_PERIOD_S = 1.0  # a round looks at every driver: not more often than this


class MinerDevice(MinerTelemetry, MinerSleepWake, Protocol):
    """A miner driver that can be read and put to sleep or woken."""


@dataclass(slots=True)
class MinerSlot:
    """Everything the fleet tracks for one miner."""

    device_id: str
    address: str
    model: str
    points: tuple[OperatingPoint, ...]
    nameplate_w: float
    circuit: str | None
    commanded: str
    commanded_since: datetime
    reading: MinerReading | None = None
    read_at: float | None = None  # monotonic time of the last good reading
    last_error: str | None = None
    consecutive_failures: int = 0
    fault: str | None = None
    fault_since: float | None = None  # monotonic time the fault was set
    probation: bool = False
    journaled: bool = False  # its commanded state came from the journal: adoption keeps it
    # Faulted because a command failed: being where it was proves nothing, so only
    # fault_retry_s gives it another chance.
    command_failed: bool = False


@dataclass(slots=True)
class _Pending:
    action: Action
    issued_at: float  # monotonic
    deadline: float


class MinerFleet:
    """Every configured miner, polled and commanded through its driver."""

    def __init__(
        self,
        config: AgentConfig,
        drivers: Mapping[str, MinerDevice],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.drivers = dict(drivers)
        self.clock = clock
        self.monotonic = monotonic
        self.started_mono = monotonic()
        self._polled = asyncio.Event()
        self._pending: dict[str, _Pending] = {}
        # Monotonic time a login-token renewal last failed, by device: not tried again before
        # fault_retry_s (a wrong password is not hammered; the commands log in themselves).
        self._renew_failed_at: dict[str, float] = {}
        now = clock()
        self.slots: dict[str, MinerSlot] = {}
        for device_id, address, line in config.expanded_miners():
            model = config.miner_models[line.model]
            points = miner_ladder(model)
            self.slots[device_id] = MinerSlot(
                device_id=device_id,
                address=address,
                model=line.model,
                points=points,
                nameplate_w=model.max_power_w,
                circuit=line.circuit,
                # Until the journal or telemetry says otherwise, assume the worst: flat out.
                commanded=points[-1].name,
                commanded_since=now,
            )

    @property
    def name(self) -> str:
        return "miners"

    @property
    def polled(self) -> asyncio.Event:
        return self._polled

    def owns(self, device_id: str) -> bool:
        return device_id in self.slots

    @property
    def max_reading_age_s(self) -> float:
        return 3 * self.config.control.poll_interval_s + self.config.control.device_timeout_s

    # --- polling -------------------------------------------------------------------------

    async def poll(self) -> str | None:
        """Read every miner once, concurrently (drivers bound the concurrency)."""

        async def one(device_id: str, driver: MinerTelemetry) -> None:
            slot = self.slots[device_id]
            try:
                reading = await driver.read()
            except DeviceError as exc:
                if slot.last_error is None:
                    log.warning("miner %s read failed: %s", device_id, exc.message)
                slot.last_error = exc.message
                slot.consecutive_failures += 1
                return
            if slot.last_error is not None:
                log.info("miner %s answers again", device_id)
            slot.reading, slot.read_at = reading, self.monotonic()
            slot.last_error, slot.consecutive_failures = None, 0
            if reading.capability is MinerCapability.SLEEP_ONLY and len(slot.points) > 2:
                # Stock firmware only sleeps or runs at its nominal point: the policy may offer
                # it nothing in between (its ladder is trimmed to sleep and the top point).
                slot.points = (slot.points[0], slot.points[-1])
                if slot.commanded not in (p.name for p in slot.points):
                    slot.commanded = slot.points[-1].name  # what a running stock miner does
                log.info(
                    "miner %s is sleep-only: ladder trimmed to sleep and %s",
                    device_id,
                    slot.points[-1].name,
                )

        try:
            async with asyncio.TaskGroup() as tg:
                for device_id, driver in self.drivers.items():
                    if device_id in self.slots:
                        tg.create_task(one(device_id, driver))
        finally:
            self._polled.set()
        failed = sum(1 for s in self.slots.values() if s.last_error is not None)
        return f"{failed} miner(s) not answering" if failed else None

    # --- what the policy sees ------------------------------------------------------------

    def views(self, now: datetime) -> FleetViews:
        mono = self.monotonic()
        return FleetViews(miners=tuple(self._view(s, mono) for s in self.slots.values()))

    def _view(self, slot: MinerSlot, now_mono: float) -> MinerView:
        # Never read: its age is the agent's age, so the policy treats it as unknown (nameplate).
        age = now_mono - (self.started_mono if slot.read_at is None else slot.read_at)
        fresh = slot.read_at is not None and age <= self.max_reading_age_s
        fault = slot.fault
        if fault is None and slot.consecutive_failures >= FAILED_POLLS_FOR_FAULT:
            fault = f"unreachable: {slot.last_error}"
        reading = slot.reading if fresh else None
        if fault is None and slot.probation and reading is not None:
            commanded_w = next(p.power_w for p in slot.points if p.name == slot.commanded)
            # A device that once accepted a command and ignored it may do so again: while it
            # draws well above its commanded point, the policy must count (and not move) it.
            if reading.power_w > commanded_w + 0.1 * slot.nameplate_w:
                fault = (
                    f"unconfirmed after a fault: draws {reading.power_w:.0f} W, "
                    f"commanded {slot.commanded} ({commanded_w:.0f} W)"
                )
        return MinerView(
            device_id=slot.device_id,
            model=slot.model,
            points=slot.points,
            nameplate_w=slot.nameplate_w,
            commanded=slot.commanded,
            commanded_since=slot.commanded_since,
            measured_power_w=None if reading is None else reading.power_w,
            measured_hashrate_ths=None if reading is None else reading.hashrate_ths,
            reading_age_s=age,
            fault=fault,
            circuit=slot.circuit,
            temperature_c=None if reading is None else reading.temperature_c,
            power_estimated=reading is not None and reading.power_estimated,
        )

    def faults(self) -> dict[str, str]:
        return {s.device_id: s.fault for s in self.slots.values() if s.fault is not None}

    def largest_step_w(self) -> float:
        return max(
            (s.points[-1].power_w - s.points[0].power_w for s in self.slots.values()), default=0.0
        )

    # --- commands ------------------------------------------------------------------------

    async def apply(self, action: Action) -> None:
        driver = self.drivers.get(action.device_id)
        if driver is None or action.device_id not in self.slots:
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
        slot = self.slots[action.device_id]
        slot.commanded, slot.commanded_since = action.target, self.clock()
        mono = self.monotonic()
        verify_s = self.config.control.verify_after_s
        self._pending[action.device_id] = _Pending(action, mono, mono + verify_s)

    def command_failed(self, action: Action, message: str) -> None:
        slot = self.slots.get(action.device_id)
        if slot is None:
            return
        self._set_fault(slot, f"{action.kind} failed: {message}")
        slot.command_failed = True

    def unconfirmed(self, device_id: str) -> bool:
        slot = self.slots.get(device_id)
        return slot is not None and slot.probation

    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    def verify(self) -> list[NotApplied]:
        now = self.monotonic()
        out: list[NotApplied] = []
        for device_id, pending in list(self._pending.items()):
            slot = self.slots[device_id]
            fresh = slot.read_at is not None and slot.read_at > pending.issued_at
            if fresh and self._complies(slot, pending.action.target):
                del self._pending[device_id]
                slot.probation = False
                continue
            if now < pending.deadline:
                continue
            del self._pending[device_id]
            seen = "no fresh telemetry" if not fresh else self._describe(slot)
            act = pending.action
            reason = f"{act.kind} to {act.target} accepted but not applied ({seen})"
            self._set_fault(slot, reason)
            out.append(NotApplied(act, reason))
        self._retry_faults(now)
        return out

    def _set_fault(self, slot: MinerSlot, reason: str | None) -> None:
        if slot.fault == reason:
            return
        if reason is None:
            log.info("device %s recovered from fault: %s", slot.device_id, slot.fault)
        else:
            log.warning("device %s faulted: %s", slot.device_id, reason)
        slot.fault = reason
        slot.fault_since = None if reason is None else self.monotonic()

    @staticmethod
    def _complies(slot: MinerSlot, target: str) -> bool:
        reading = slot.reading
        if reading is None:
            return False
        if target == SLEEP:
            return reading.mode is MinerMode.SLEEPING
        if reading.mode is MinerMode.SLEEPING:
            return False
        # Waking counts (it is ramping towards its profile), but only at the right profile.
        return reading.profile is None or reading.profile == target

    @staticmethod
    def _describe(slot: MinerSlot) -> str:
        r = slot.reading
        if r is None:
            return "no telemetry"
        return f"telemetry shows {r.mode.value} at {r.power_w:.0f} W, profile {r.profile}"

    def _retry_faults(self, now: float) -> None:
        """Clear faults that telemetry contradicts, or that have waited ``fault_retry_s``."""
        retry_s = self.config.control.fault_retry_s
        for slot in self.slots.values():
            if slot.fault is None or slot.device_id in self._pending:
                continue
            # Only a reading taken since the fault counts: the last good one from before it
            # would show the device where it was, "healed" at once (a device rejecting every
            # command would be retried every cycle).
            since = slot.fault_since
            if slot.read_at is None or since is None or slot.read_at <= since:
                continue
            observed = observed_point(slot)
            healed = observed is not None and observed == slot.commanded and not slot.command_failed
            expired = now - since >= retry_s
            if healed or (expired and observed is not None):
                # Adopt what telemetry shows, so the policy re-commands from the truth.
                assert observed is not None
                slot.commanded, slot.commanded_since = observed, self.clock()
                self._set_fault(slot, None)
                slot.command_failed = False
                # Retried, not healed: trusted again only once a command is seen to apply.
                slot.probation = not healed

    # --- restart and drift ---------------------------------------------------------------

    def resume(self, commanded: Mapping[str, tuple[str, datetime]]) -> int:
        known = 0
        for device_id, (point, since) in commanded.items():
            slot = self.slots.get(device_id)
            if slot is None or all(p.name != point for p in slot.points):
                continue  # a device no longer configured, or a profile that no longer exists
            slot.commanded, slot.commanded_since, slot.journaled = point, since, True
            known += 1
        return known

    def _undated(self) -> datetime:
        """A time dated back by the dwell times: for a state the agent did not cause."""
        control = self.config.control
        return self.clock() - timedelta(seconds=max(control.min_on_s, control.min_off_s))

    def adopt_observed(self) -> int:
        """On start, take each miner's observed operating point as its commanded state.

        Without a journal entry the agent must not assume it put a miner where it is; adopting
        what telemetry shows avoids a storm of commands on the first cycle.
        """
        adopted = 0
        since = self._undated()
        for slot in self.slots.values():
            if slot.journaled:
                continue
            observed = observed_point(slot)
            if observed is not None:
                slot.commanded, slot.commanded_since = observed, since
                adopted += 1
        return adopted

    def reconcile(self) -> list[tuple[str, str, str]]:
        """Adopt the observed point of miners that drifted from their commanded one.

        A miner restored by hand, rebooted into its default profile, or woken by its own
        firmware is no longer where the agent put it. Taking what telemetry shows as the
        commanded state (dated back, so no dwell time protects it) makes the policy decide
        afresh, and re-shed it if a grid event is still in force: an OFF signal is a level.
        Miners with a command in flight or a fault are skipped.
        """
        since = self._undated()
        drifted = []
        mono = self.monotonic()
        for slot in self.slots.values():
            if slot.device_id in self._pending or slot.fault is not None or slot.read_at is None:
                continue
            if mono - slot.read_at > self.max_reading_age_s:
                continue
            observed = observed_point(slot)
            if observed is None or observed == slot.commanded:
                continue
            drifted.append((slot.device_id, slot.commanded, observed))
            log.warning(
                "miner %s drifted: commanded %s, telemetry shows %s",
                slot.device_id,
                slot.commanded,
                observed,
            )
            slot.commanded, slot.commanded_since = observed, since
        return drifted

    def commanded(self) -> Iterable[tuple[str, str, datetime]]:
        return [(s.device_id, s.commanded, s.commanded_since) for s in self.slots.values()]

    async def run(self, stop: asyncio.Event) -> None:
        """Keep login tokens warm until stop; then drivers give back what they hold.

        Every poll interval (at least a second), at most :data:`CREDENTIALS_PER_ROUND`
        answering miners whose driver holds a stale login token
        (:class:`~drivers.miners.base.MinerCredentials`: BOS+, Whatsminer) renew it, so that a
        spike's commands go out without a login first. A failed renewal changes nothing (the
        command that needs the token logs in itself) and is not tried again before
        ``control.fault_retry_s``; the first failure of a streak is logged.
        """
        try:
            while not stop.is_set():
                await self.renew_credentials()
                with contextlib.suppress(TimeoutError):
                    period = max(self.config.control.poll_interval_s, CREDENTIALS_MIN_PERIOD_S)
                    async with asyncio.timeout(period):
                        await stop.wait()
        finally:
            await release_drivers(self.drivers.values())

    async def renew_credentials(self, most: int | None = None) -> int:
        """Renew up to ``most`` stale login tokens concurrently; returns how many were renewed."""
        now = self.monotonic()
        retry_s = self.config.control.fault_retry_s
        stale: list[tuple[str, MinerCredentials]] = []
        for device_id, driver in self.drivers.items():
            slot = self.slots.get(device_id)
            failed_at = self._renew_failed_at.get(device_id)
            if (
                slot is None
                or slot.fault is not None
                or slot.last_error is not None
                or slot.reading is None
                or (failed_at is not None and now - failed_at < retry_s)
                or not isinstance(driver, MinerCredentials)
                or not driver.credential_stale()
            ):
                continue
            stale.append((device_id, driver))
            if len(stale) >= (CREDENTIALS_PER_ROUND if most is None else most):
                break
        if not stale:
            return 0
        results = await asyncio.gather(*(d.prepare() for _, d in stale), return_exceptions=True)
        renewed = 0
        for (device_id, _), result in zip(stale, results, strict=True):
            if isinstance(result, DeviceError):
                if device_id not in self._renew_failed_at:
                    log.info("miner %s: login token not renewed: %s", device_id, result.message)
                self._renew_failed_at[device_id] = self.monotonic()
            elif isinstance(result, BaseException):
                raise result  # a bug, not a device: the supervisor reports and restarts
            else:
                self._renew_failed_at.pop(device_id, None)
                renewed += 1
        return renewed


def observed_point(slot: MinerSlot) -> str | None:
    """The operating point telemetry shows the miner at, or None if unclear."""
    r = slot.reading
    if r is None:
        return None
    if r.mode is MinerMode.SLEEPING:
        return SLEEP
    if r.profile is not None and any(p.name == r.profile for p in slot.points):
        return r.profile
    if r.mode is MinerMode.MINING and r.capability in (
        MinerCapability.POWER_TARGET,
        MinerCapability.POWER_LIMIT,
    ):
        # A target or limit between ladder points (set by hand, or the firmware's default):
        # the nearest point by power, so the policy sees where the miner is and commands it
        # onto the ladder when it wants another point. (If it wants that very point, the
        # miner stays off it by at most half a step: drawn power is still what is measured.)
        running = slot.points[1:]
        if running:
            return min(running, key=lambda p: abs(p.power_w - r.power_w)).name
    return None


async def release_drivers(drivers: Iterable[object], timeout_s: float = 2.0) -> None:
    """Let drivers give back what they hold on devices (a LuxOS session), bounded in time.

    A session left behind would lock the next agent out until LuxOS expires it (a minute).
    """
    closes = [c() for d in drivers if (c := getattr(d, "aclose", None)) is not None]
    if not closes:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*closes, return_exceptions=True)
