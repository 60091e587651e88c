"""Local job control: AI jobs as child processes of the agent on a single GPU host.

Each job runs in its own session (so its process group id is its pid) and every signal goes to
the whole group, which catches the worker processes a training launcher spawns. Suspend is
SIGSTOP, resume SIGCONT. Preempting (``requeue``) continues a stopped job, sends SIGTERM, waits
the grace period for the job to checkpoint and exit, then SIGKILLs what is left; the job is then
pending, and ``resume`` starts its command again (the job itself resumes from its checkpoint).

Checkpoints: a job may be given a checkpoint file (exported to it as ``SITE_AGENT_CHECKPOINT``);
the file's modification time is the job's ``last_checkpoint_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from drivers.errors import CommandRejected, DeviceUnavailable
from drivers.jobs.base import JobClass, JobReading, JobState

log = logging.getLogger(__name__)

CHECKPOINT_ENV = "SITE_AGENT_CHECKPOINT"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(slots=True)
class _Job:
    job_id: str
    name: str
    argv: tuple[str, ...]
    job_class: JobClass
    gpus: int
    checkpoint_path: Path | None
    env: dict[str, str] | None
    cwd: Path | None
    proc: asyncio.subprocess.Process | None = None
    suspended: bool = False
    requeued: bool = False


class LocalJobs:
    """``JobControl`` for processes on this host. Use as an async context manager: leaving it
    kills every job still running (SIGCONT, SIGTERM, then SIGKILL after ``stop_grace_s``)."""

    def __init__(
        self,
        *,
        node: str | None = None,
        stop_grace_s: float = 5.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.node = node or socket.gethostname()
        self._stop_grace_s = stop_grace_s
        self._clock = clock
        self._jobs: dict[str, _Job] = {}

    async def __aenter__(self) -> LocalJobs:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every job that still runs."""
        for job in self._jobs.values():
            if _alive(job):
                await self._stop(job, self._stop_grace_s)

    # ---- starting -------------------------------------------------------------------------

    async def start(
        self,
        job_id: str,
        argv: Sequence[str],
        *,
        job_class: JobClass,
        gpus: int = 1,
        name: str | None = None,
        checkpoint_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> JobReading:
        """Start ``argv`` as job ``job_id``; a clear error (and nothing started) on bad input."""
        if not _JOB_ID.match(job_id):
            raise CommandRejected(job_id, "job id must be 1-64 letters, digits, '_', '.' or '-'")
        if job_id in self._jobs:
            raise CommandRejected(job_id, "a job with this id already exists")
        if not argv:
            raise CommandRejected(job_id, "the job command is empty")
        if gpus < 0:
            raise CommandRejected(job_id, f"gpus must be >= 0, got {gpus}")
        full_env = None
        if env is not None or checkpoint_path is not None:
            full_env = dict(os.environ if env is None else env)
            if checkpoint_path is not None:
                full_env[CHECKPOINT_ENV] = str(checkpoint_path)
        job = _Job(
            job_id=job_id,
            name=name or Path(argv[0]).name,
            argv=tuple(argv),
            job_class=job_class,
            gpus=gpus,
            checkpoint_path=checkpoint_path,
            env=full_env,
            cwd=cwd,
        )
        await self._spawn(job)
        self._jobs[job_id] = job
        return self._reading(job)

    async def _spawn(self, job: _Job) -> None:
        try:
            job.proc = await asyncio.create_subprocess_exec(
                *job.argv,
                env=job.env,
                cwd=job.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                # A new session makes the job a process group we can signal as a whole, and
                # keeps a Ctrl-C on the agent's terminal from reaching it.
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandRejected(job.job_id, f"cannot start {job.argv[0]!r}: {exc}") from exc
        job.suspended = False
        job.requeued = False
        log.info("job %s started as pid %d", job.job_id, job.proc.pid)

    def pid(self, job_id: str) -> int | None:
        """The job's process (group) id while it runs."""
        job = self._job(job_id)
        return job.proc.pid if job.proc is not None and _alive(job) else None

    # ---- JobControl -----------------------------------------------------------------------

    async def list_jobs(self) -> tuple[JobReading, ...]:
        return tuple(self._reading(job) for job in self._jobs.values())

    async def suspend(self, job_id: str) -> None:
        job = self._job(job_id)
        self._require_alive(job, "suspend")
        if job.suspended:
            return
        self._signal(job, signal.SIGSTOP)
        job.suspended = True
        log.info("job %s suspended", job_id)

    async def resume(self, job_id: str) -> None:
        """Continue a suspended job, or start a requeued one again."""
        job = self._job(job_id)
        if job.requeued:
            await self._spawn(job)
            log.info("job %s restarted after requeue", job_id)
            return
        self._require_alive(job, "resume")
        if not job.suspended:
            return
        self._signal(job, signal.SIGCONT)
        job.suspended = False
        log.info("job %s resumed", job_id)

    async def requeue(self, job_id: str, grace_s: float) -> None:
        """Preempt: SIGTERM, wait ``grace_s`` for a checkpoint and exit, then SIGKILL."""
        if grace_s < 0:
            raise CommandRejected(job_id, f"grace_s must be >= 0, got {grace_s}")
        job = self._job(job_id)
        self._require_alive(job, "requeue")
        await self._stop(job, grace_s)
        job.requeued = True
        job.suspended = False
        log.info("job %s preempted and pending", job_id)

    # ---- internals ------------------------------------------------------------------------

    async def _stop(self, job: _Job, grace_s: float) -> None:
        assert job.proc is not None
        # A stopped process cannot act on SIGTERM (nor checkpoint) until it is continued.
        if job.suspended:
            self._signal(job, signal.SIGCONT)
        self._signal(job, signal.SIGTERM)
        try:
            await asyncio.wait_for(job.proc.wait(), grace_s)
        except TimeoutError:
            log.warning("job %s ignored SIGTERM for %g s; killing it", job.job_id, grace_s)
        # Kill the whole group even if the leader exited: its workers may linger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.proc.pid, signal.SIGKILL)
        await job.proc.wait()

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise CommandRejected(job_id, "no such local job") from None

    def _require_alive(self, job: _Job, what: str) -> None:
        if not _alive(job):
            state = "pending after requeue" if job.requeued else "finished"
            raise CommandRejected(job.job_id, f"cannot {what}: the job has {state}; nothing done")

    def _signal(self, job: _Job, sig: signal.Signals) -> None:
        assert job.proc is not None
        try:
            os.killpg(job.proc.pid, sig)
        except ProcessLookupError as exc:
            raise DeviceUnavailable(job.job_id, f"process group {job.proc.pid} is gone") from exc

    def _reading(self, job: _Job) -> JobReading:
        return JobReading(
            job_id=job.job_id,
            name=job.name,
            job_class=job.job_class,
            state=_state(job),
            node=self.node,
            gpus=job.gpus,
            at=self._clock(),
            last_checkpoint_at=_checkpoint_time(job.checkpoint_path),
        )


def _alive(job: _Job) -> bool:
    return job.proc is not None and job.proc.returncode is None


def _state(job: _Job) -> JobState:
    if job.requeued:
        return JobState.PENDING
    assert job.proc is not None
    if job.proc.returncode is None:
        return JobState.SUSPENDED if job.suspended else JobState.RUNNING
    return JobState.COMPLETED if job.proc.returncode == 0 else JobState.FAILED


def _checkpoint_time(path: Path | None) -> datetime | None:
    if path is None:
        return None
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
