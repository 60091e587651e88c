"""Job control over the in-process simulated scheduler (``simulators.jobs.SimScheduler``).

The scheduler is handed in, never imported: this driver only relies on its duck type (the
:class:`SchedulerApi` protocol below) and on the built-in exception types it raises
(``KeyError`` for an unknown job, ``ValueError`` for a request that does not fit the job's
state, ``ConnectionError`` when it does not answer), which it maps to the project's exceptions
with the job id. Times from the scheduler are Unix seconds; jobs' classes and states are its
strings, turned into :class:`JobClass` and :class:`JobState` here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from drivers.errors import BadReply, CommandRejected, DeviceUnavailable
from drivers.jobs.base import JobClass, JobReading, JobState

log = logging.getLogger(__name__)

SCHEDULER_ID = "sim-scheduler"
T = TypeVar("T")

_STATES = {
    "RUNNING": JobState.RUNNING,
    "SUSPENDED": JobState.SUSPENDED,
    "PENDING": JobState.PENDING,
    "COMPLETED": JobState.COMPLETED,
}  # anything else (CANCELLED) ended without finishing its work


class SimJobLike(Protocol):
    """The fields of a simulated job this driver reads."""

    @property
    def job_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def job_class(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def node(self) -> str | None: ...
    @property
    def gpus(self) -> int: ...
    @property
    def last_checkpoint_at(self) -> float | None: ...


class SchedulerApi(Protocol):
    """What ``SimScheduler`` offers."""

    def jobs(self) -> tuple[SimJobLike, ...]: ...
    def suspend(self, job_id: str) -> None: ...
    def resume(self, job_id: str) -> None: ...
    def requeue(self, job_id: str, grace_s: float) -> None: ...


class SimJobs:
    """``JobControl`` over an in-process simulated scheduler."""

    def __init__(
        self,
        scheduler: SchedulerApi,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.scheduler = scheduler
        self._clock = clock

    def _call(self, device_id: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except ConnectionError as exc:
            raise DeviceUnavailable(device_id, f"{what}: simulated scheduler down ({exc})") from exc
        except KeyError as exc:
            raise CommandRejected(device_id, f"{what}: no such job; nothing done") from exc
        except ValueError as exc:
            raise CommandRejected(device_id, f"{what}: {exc}; nothing done") from exc

    async def list_jobs(self) -> tuple[JobReading, ...]:
        jobs = self._call(SCHEDULER_ID, "listing jobs", self.scheduler.jobs)
        now = self._clock()
        readings = []
        for job in jobs:
            try:
                job_class = JobClass(job.job_class)
            except ValueError as exc:
                raise BadReply(job.job_id, f"unknown job class {job.job_class!r}") from exc
            checkpoint = job.last_checkpoint_at
            readings.append(
                JobReading(
                    job_id=job.job_id,
                    name=job.name,
                    job_class=job_class,
                    state=_STATES.get(job.state, JobState.FAILED),
                    node=job.node,
                    gpus=job.gpus,
                    at=now,
                    last_checkpoint_at=(
                        None if checkpoint is None else datetime.fromtimestamp(checkpoint, UTC)
                    ),
                )
            )
        return tuple(readings)

    async def suspend(self, job_id: str) -> None:
        self._call(job_id, "suspend", self.scheduler.suspend, job_id)
        log.info("simulated job %s suspended", job_id)

    async def resume(self, job_id: str) -> None:
        self._call(job_id, "resume", self.scheduler.resume, job_id)
        log.info("simulated job %s resumed", job_id)

    async def requeue(self, job_id: str, grace_s: float) -> None:
        self._call(job_id, "requeue", self.scheduler.requeue, job_id, grace_s)
        log.info("simulated job %s requeued (grace %g s)", job_id, grace_s)
