"""The GPU side of the site as the runtime sees it: one protocol, implemented elsewhere.

A :class:`GpuFleet` polls the site's GPU nodes (NVML, locally or through a node agent) and the
job scheduler (Slurm or local processes), keeps the last good readings, turns them into
:class:`~agent.control.domain.GpuNodeView` for snapshots, and applies GPU and job actions (power
caps,
suspend, resume, requeue), checking each against the device before it returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from agent.control.domain import Action, ActionKind, GpuNodeView
from drivers.gpus.base import GpuReading

GPU_ACTIONS = frozenset(
    {
        ActionKind.SET_GPU_CAP,
        ActionKind.SUSPEND_JOB,
        ActionKind.RESUME_JOB,
        ActionKind.REQUEUE_JOB,
    }
)


class GpuFleet(Protocol):
    """GPU nodes and their AI jobs, polled and commanded as one."""

    async def poll(self) -> None:
        """Read every node's GPUs and the scheduler's jobs; keep the last good values."""

    def views(self, now: datetime) -> tuple[GpuNodeView, ...]:
        """The nodes as the policy sees them (commanded cap, jobs, measured power, faults)."""

    def readings(self) -> dict[str, tuple[GpuReading, ...]]:
        """Per node, its latest per-GPU readings (for per-GPU metrics)."""

    async def apply(self, action: Action) -> None:
        """Carry out one GPU or job action; raise a DeviceError if it fails."""
