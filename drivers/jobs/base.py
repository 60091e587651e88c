"""What a job-control driver promises, and the frozen job reading it returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable


class JobClass(StrEnum):
    """How a job may be interrupted (see economics.md)."""

    SLA = "sla"  # contracted: shed only for mandatory grid events, last of all
    PREEMPTIBLE = "preemptible"  # suspend/requeue; loses work since its last checkpoint
    FILLER = "filler"  # runs only on power nothing better wants


class JobState(StrEnum):
    RUNNING = "running"
    SUSPENDED = "suspended"
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class JobReading:
    """One AI job as the scheduler reports it."""

    job_id: str
    name: str
    job_class: JobClass
    state: JobState
    node: str | None
    gpus: int
    at: datetime
    last_checkpoint_at: datetime | None = None
    # Deferrable work: done by ``deadline``, with ``work_left_s`` of running still to do (per
    # GPU, at full throughput). Slurm: ``--deadline`` and the ``--time`` limit less the time
    # run. None: no deadline, or no way to know the work left.
    deadline: datetime | None = None
    work_left_s: float | None = None


@runtime_checkable
class JobControl(Protocol):
    """Lists jobs and suspends, resumes or requeues them."""

    async def list_jobs(self) -> tuple[JobReading, ...]: ...

    async def suspend(self, job_id: str) -> None: ...

    async def resume(self, job_id: str) -> None: ...

    async def requeue(self, job_id: str, grace_s: float) -> None: ...
