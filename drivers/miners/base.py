"""What a miner driver promises: one small protocol per capability, and the frozen readings.

A miner is a ladder of operating points: ``sleep`` plus one or more power profiles, each with
its power and hashrate. Drivers derive the miner's mode from measured power and hashrate, never
from firmware flags alone (pyasic's ``is_mining`` is wrong on LuxOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable


class MinerMode(StrEnum):
    """What the miner is doing, as measured."""

    MINING = "mining"
    SLEEPING = "sleeping"
    # Woken but not yet hashing at its profile: power is rising, hashrate not there yet.
    WAKING = "waking"


class MinerCapability(StrEnum):
    """How a firmware family lets the controller change a miner's power."""

    PROFILES = "profiles"  # discrete named profiles (LuxOS)
    POWER_TARGET = "power_target"  # any watts within a range (Braiins OS+)
    POWER_LIMIT = "power_limit"  # a power limit in watts (Whatsminer)
    SLEEP_ONLY = "sleep_only"  # only sleep and wake (stock Bitmain firmware)


@dataclass(frozen=True, slots=True)
class MinerProfile:
    """One operating point a miner offers (a LuxOS profile, a Braiins power target)."""

    name: str
    power_w: float
    hashrate_ths: float


@dataclass(frozen=True, slots=True)
class MinerReading:
    """One telemetry sample of one miner."""

    device_id: str
    address: str
    model: str
    firmware: str
    at: datetime
    power_w: float
    hashrate_ths: float
    mode: MinerMode
    temperature_c: float | None
    profile: str | None
    profiles: tuple[MinerProfile, ...]
    fans_rpm: tuple[int, ...] = ()
    # True when the firmware reports no power and ``power_w`` is estimated from the model's
    # ladder and the measured hashrate (stock Antminer): count it at nameplate until confirmed.
    power_estimated: bool = False
    capability: MinerCapability = MinerCapability.PROFILES


@runtime_checkable
class MinerTelemetry(Protocol):
    """Reads a miner. Raises :class:`drivers.errors.DeviceError` subclasses, never returns None."""

    @property
    def device_id(self) -> str: ...

    async def read(self) -> MinerReading: ...


@runtime_checkable
class MinerSleepWake(Protocol):
    """Puts a miner to sleep (standby power) and wakes it."""

    async def sleep(self) -> None: ...

    async def wake(self) -> None: ...


@runtime_checkable
class MinerPowerProfile(Protocol):
    """Selects an operating point by profile name (the highest profile at or below a power)."""

    async def set_profile(self, profile: str) -> None: ...


@runtime_checkable
class MinerCredentials(Protocol):
    """Keeps a privileged credential (a login token) fresh ahead of need, so that a curtailment
    pays one exchange, not a login first. Drivers whose firmware has none do not implement it."""

    def credential_stale(self) -> bool:
        """True when the credential is missing or past half its life."""
        ...

    async def prepare(self) -> None:
        """Renew a stale credential (raises :class:`drivers.errors.DeviceError`)."""
        ...
