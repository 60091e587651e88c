"""The one fleet protocol: how the runtime polls, reads, commands and checks any set of devices.

A fleet owns a set of devices and everything the runtime knows about them: their drivers, the
last good readings and when they were taken, what was commanded and since when, the commands
still waiting for telemetry to confirm them, faults and probation. Nobody else reads or writes
those. The coordinator polls fleets and asks them for views to build snapshots; the actuator
hands them actions (with its retries, timeouts and audit) and asks them to verify; the loop asks
them for their faults to publish. Three implementations: miners through their drivers
(:class:`~agent.runtime.miner_fleet.MinerFleet`), GPU nodes and their jobs
(:class:`~agent.runtime.gpu_fleet.GpuFleet`), and (next) remote node agents over MQTT.

The life of a command in a fleet: :meth:`Fleet.apply` carries it out once (the actuator retries
transient errors and bounds each attempt); on success the fleet records the commanded state and,
when it cannot confirm the command at once, keeps it pending until :meth:`Fleet.verify` sees it
in telemetry or its verification deadline passes (then it reports it as not applied and holds
the device faulted). :meth:`Fleet.command_failed` tells the fleet that every attempt failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.control.domain import Action, GpuNodeView, MinerView


@dataclass(frozen=True, slots=True)
class FleetViews:
    """A fleet's devices as the policy sees them."""

    miners: tuple[MinerView, ...] = ()
    gpu_nodes: tuple[GpuNodeView, ...] = ()


@dataclass(frozen=True, slots=True)
class NotApplied:
    """A command a device accepted but telemetry did not confirm before its deadline."""

    action: Action
    reason: str


class Fleet(Protocol):
    """A set of devices the runtime polls, reads and commands through one interface."""

    @property
    def name(self) -> str:
        """The fleet's source name (its health in ``/metrics``): ``miners``, ``gpus``..."""

    @property
    def polled(self) -> asyncio.Event:
        """Set once the first full poll has been attempted (the first decision waits for it)."""

    def owns(self, device_id: str) -> bool:
        """Whether actions for ``device_id`` go to this fleet."""

    async def poll(self) -> str | None:
        """Read every device once; keep the last good values.

        Returns a one-line summary of what did not answer (None when all did); raises an
        :class:`~drivers.errors.AgentError` only when nothing at all answered.
        """

    def views(self, now: datetime) -> FleetViews:
        """The devices as the policy sees them (commanded state, measured power, faults)."""

    def faults(self) -> Mapping[str, str]:
        """Devices the fleet holds faulted now: device id -> reason."""

    def largest_step_w(self) -> float:
        """The largest power step one action can add (the ramp budget must allow it)."""

    async def apply(self, action: Action) -> None:
        """Carry out one action once; raise a :class:`~drivers.errors.DeviceError` on failure."""

    def command_failed(self, action: Action, message: str) -> None:
        """Every attempt of ``action`` failed: hold its device as the fleet's rules say."""

    def unconfirmed(self, device_id: str) -> bool:
        """A shed of this device is not headroom until telemetry shows it (probation)."""

    def pending(self) -> frozenset[str]:
        """Devices with a command still waiting for telemetry to confirm it."""

    def verify(self) -> list[NotApplied]:
        """Check pending commands against telemetry; retry faults that have waited enough."""

    def resume(self, commanded: Mapping[str, tuple[str, datetime]]) -> int:
        """Take commanded states from the journal (restart); returns how many were taken."""

    def adopt_observed(self) -> int:
        """After the first poll, adopt what telemetry shows for devices the journal omits."""

    def reconcile(self) -> list[tuple[str, str, str]]:
        """Adopt the observed state of devices that drifted; returns (id, was, now)."""

    def commanded(self) -> Iterable[tuple[str, str, datetime]]:
        """Every commanded state the journal must hold: (key, state, since)."""

    async def run(self, stop: asyncio.Event) -> None:
        """A runtime service: open what the drivers need, and close it once ``stop`` is set."""
