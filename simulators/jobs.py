"""An in-process AI job scheduler for simulated GPU nodes: places jobs, runs them, checkpoints.

``SimScheduler`` is a small stand-in for Slurm on a simulated site. It owns named nodes, each a
list of simulated GPUs (anything with ``attach``/``detach``/``suspend``/``resume`` and a
``throughput_fraction``, such as :class:`simulators.nvml.SimGpu`). Jobs of a class (``sla``,
``preemptible``, ``filler``) ask for a number of GPUs; pending jobs are placed first come, first
served on the first node with enough free GPUs (or on the node they are pinned to). A placed job
is a process on each of its GPUs, so the GPU's utilization, power and throughput follow the job:

* running: the job's utilization on every GPU it holds; the work it does is the sum of its GPUs'
  throughput fractions over time (GPU-seconds at full speed), so a lower power cap slows it;
* suspended: the processes stop (utilization 0, memory kept), no work is done;
* requeued (preempted): the processes exit and the GPUs are freed; with a grace period the job
  checkpoints first and keeps all its work, without one it falls back to its last checkpoint;
  it waits ``requeue_delay_s`` (Slurm delays a requeued job's start too) and is placed again;
* a job with a work target completes when it is reached and frees its GPUs.

A running job checkpoints every ``checkpoint_interval_s`` of running time. Time comes from the
injected ``clock`` (Unix seconds by default) and is integrated lazily on every call, the way
``SimGpu`` integrates energy. ``ignore_commands`` makes a job's commands succeed without
effect. Errors use built-in types a driver can map without importing this module:
:class:`NoSuchJob` (a ``KeyError``), :class:`BadJobState` (a ``ValueError``) and
:class:`SchedulerDown` (a ``ConnectionError``, injected with :meth:`SimScheduler.go_down`).

This module imports neither ``agent`` nor ``drivers``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

JOB_CLASSES = ("sla", "preemptible", "filler")
RUNNING = "RUNNING"
SUSPENDED = "SUSPENDED"
PENDING = "PENDING"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"


class NoSuchJob(KeyError):
    """The scheduler knows no job with this id."""

    def __str__(self) -> str:
        return f"no such job {self.args[0]!r}"


class BadJobState(ValueError):
    """The request does not fit the job's state (or the request itself is malformed)."""


class SchedulerDown(ConnectionError):
    """The scheduler does not answer (fault injection)."""


class SimGpuLike(Protocol):
    """What the scheduler needs of a simulated GPU."""

    def attach(self, pid: int, memory_mib: float, utilization_pct: float) -> None: ...

    def detach(self, pid: int) -> None: ...

    def suspend(self, pid: int) -> None: ...

    def resume(self, pid: int) -> None: ...

    @property
    def throughput_fraction(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SimJobInfo:
    """One job as the scheduler reports it (what ``squeue`` would show, and the work ledger)."""

    job_id: str
    name: str
    job_class: str
    state: str  # RUNNING, SUSPENDED, PENDING, COMPLETED, CANCELLED
    node: str | None
    gpus: int
    utilization_pct: float  # what the job drives its GPUs to while it runs
    gpu_indices: tuple[int, ...]
    pids: tuple[int, ...]
    submitted_at: float
    started_at: float | None
    last_checkpoint_at: float | None
    work_done_gpu_s: float  # GPU-seconds of full-speed work done so far
    work_saved_gpu_s: float  # as of the last checkpoint
    work_lost_gpu_s: float  # thrown away by preemptions without a checkpoint
    work_target_gpu_s: float | None
    preemptions: int
    suspensions: int


@dataclass(slots=True)
class _Job:
    job_id: str
    name: str
    job_class: str
    gpus: int
    utilization_pct: float
    memory_mib: float
    checkpoint_interval_s: float
    work_target_gpu_s: float | None
    pinned_node: str | None
    submitted_at: float
    state: str = PENDING
    node: str | None = None
    gpu_indices: tuple[int, ...] = ()
    pids: tuple[int, ...] = ()
    eligible_at: float = 0.0
    started_at: float | None = None
    last_checkpoint_at: float | None = None
    run_since_checkpoint_s: float = 0.0
    work_done_gpu_s: float = 0.0
    work_saved_gpu_s: float = 0.0
    work_lost_gpu_s: float = 0.0
    preemptions: int = 0
    suspensions: int = 0


@dataclass(slots=True)
class _Node:
    name: str
    gpus: Sequence[SimGpuLike]
    owner: list[str | None] = field(default_factory=list)  # job id per GPU index, or None


class SimScheduler:
    """A first-come-first-served GPU job scheduler over simulated nodes.

    ``nodes`` maps a node name to its GPUs in index order. ``requeue_delay_s``: how long a
    preempted job waits before it may be placed again.
    """

    def __init__(
        self,
        nodes: Mapping[str, Sequence[SimGpuLike]],
        *,
        clock: Callable[[], float] = time.time,
        requeue_delay_s: float = 60.0,
        first_pid: int = 200_000,
    ) -> None:
        if requeue_delay_s < 0:
            raise ValueError("requeue_delay_s must be >= 0")
        self.clock = clock
        self.requeue_delay_s = requeue_delay_s
        self._nodes = {
            name: _Node(name, list(gpus), [None] * len(gpus)) for name, gpus in nodes.items()
        }
        self._jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self._pids = itertools.count(first_pid)
        self._last_s = clock()
        self._down = False
        self._ignored: set[str] = set()

    # ---- fault injection ------------------------------------------------------------------

    def go_down(self) -> None:
        """Every later call raises :class:`SchedulerDown` until :meth:`come_back`."""
        self._down = True

    def come_back(self) -> None:
        self._down = False

    def ignore_commands(self, job_id: str, ignore: bool = True) -> None:
        """Suspend, resume and requeue of this job are accepted but do nothing (a lost
        signal, a wedged slurmstepd)."""
        self._get(job_id)
        if ignore:
            self._ignored.add(job_id)
        else:
            self._ignored.discard(job_id)

    def _answer(self) -> None:
        if self._down:
            raise SchedulerDown("scheduler is not answering")
        self._advance()

    # ---- submitting and reading -----------------------------------------------------------

    def submit(
        self,
        *,
        job_class: str,
        gpus: int,
        name: str | None = None,
        node: str | None = None,
        utilization_pct: float = 95.0,
        memory_mib: float = 40_000.0,
        checkpoint_interval_s: float = 1800.0,
        work_target_gpu_s: float | None = None,
    ) -> str:
        """Queue a job; it starts at once if a node has room. Returns the job id."""
        self._answer()
        if job_class not in JOB_CLASSES:
            raise BadJobState(f"unknown job class {job_class!r}; known: {', '.join(JOB_CLASSES)}")
        if gpus < 1:
            raise BadJobState(f"a job needs at least one GPU, got {gpus}")
        if node is not None and node not in self._nodes:
            raise BadJobState(f"unknown node {node!r}; known: {', '.join(self._nodes)}")
        largest = max((len(n.gpus) for n in self._nodes.values()), default=0)
        room = len(self._nodes[node].gpus) if node is not None else largest
        if gpus > room:
            raise BadJobState(f"{gpus} GPUs asked, but no node has more than {room}")
        if not 0 < utilization_pct <= 100 or not math.isfinite(utilization_pct):
            raise BadJobState(f"utilization_pct must be in (0, 100], got {utilization_pct}")
        if checkpoint_interval_s < 0:
            raise BadJobState("checkpoint_interval_s must be >= 0 (0: never checkpoints)")
        job_id = str(next(self._ids))
        now = self.clock()
        self._jobs[job_id] = _Job(
            job_id=job_id,
            name=name or f"{job_class}-{job_id}",
            job_class=job_class,
            gpus=gpus,
            utilization_pct=utilization_pct,
            memory_mib=memory_mib,
            checkpoint_interval_s=checkpoint_interval_s,
            work_target_gpu_s=work_target_gpu_s,
            pinned_node=node,
            submitted_at=now,
            eligible_at=now,
        )
        self._schedule(now)
        return job_id

    def jobs(self) -> tuple[SimJobInfo, ...]:
        """Every job, in submission order."""
        self._answer()
        return tuple(self._info(j) for j in self._jobs.values())

    def job(self, job_id: str) -> SimJobInfo:
        self._answer()
        return self._info(self._get(job_id))

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    # ---- commands -------------------------------------------------------------------------

    def suspend(self, job_id: str) -> None:
        """Stop a running job's processes (they keep their GPU memory). Idempotent."""
        self._answer()
        job = self._get(job_id)
        if job.state == SUSPENDED or job_id in self._ignored:
            return
        if job.state != RUNNING:
            raise BadJobState(f"job {job_id} is {job.state}; only a running job can be suspended")
        for gpu, pid in self._gpus_of(job):
            gpu.suspend(pid)
        job.state = SUSPENDED
        job.suspensions += 1

    def resume(self, job_id: str) -> None:
        """Continue a suspended job. Idempotent for a running job."""
        self._answer()
        job = self._get(job_id)
        if job.state == RUNNING or job_id in self._ignored:
            return
        if job.state != SUSPENDED:
            raise BadJobState(f"job {job_id} is {job.state}; only a suspended job can be resumed")
        for gpu, pid in self._gpus_of(job):
            gpu.resume(pid)
        job.state = RUNNING

    def requeue(self, job_id: str, grace_s: float) -> None:
        """Preempt: with ``grace_s > 0`` the job checkpoints first; then it goes back to the
        queue and its GPUs are freed. A pending job is left alone."""
        self._answer()
        if grace_s < 0 or not math.isfinite(grace_s):
            raise BadJobState(f"grace_s must be a number >= 0, got {grace_s}")
        job = self._get(job_id)
        if job.state == PENDING or job_id in self._ignored:
            return
        if job.state not in (RUNNING, SUSPENDED):
            raise BadJobState(f"job {job_id} is {job.state}; it cannot be requeued")
        now = self.clock()
        if grace_s > 0:
            self._checkpoint(job, now)
        job.work_lost_gpu_s += job.work_done_gpu_s - job.work_saved_gpu_s
        job.work_done_gpu_s = job.work_saved_gpu_s
        self._release(job)
        job.state = PENDING
        job.preemptions += 1
        job.eligible_at = now + self.requeue_delay_s
        self._schedule(now)

    def cancel(self, job_id: str) -> None:
        self._answer()
        job = self._get(job_id)
        if job.state in (COMPLETED, CANCELLED):
            return
        self._release(job)
        job.state = CANCELLED
        self._schedule(self.clock())

    # ---- internals ------------------------------------------------------------------------

    def _get(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NoSuchJob(job_id) from None

    def _gpus_of(self, job: _Job) -> list[tuple[SimGpuLike, int]]:
        if job.node is None:
            return []
        gpus = self._nodes[job.node].gpus
        return [(gpus[i], pid) for i, pid in zip(job.gpu_indices, job.pids, strict=True)]

    def _checkpoint(self, job: _Job, at: float) -> None:
        job.work_saved_gpu_s = job.work_done_gpu_s
        job.last_checkpoint_at = at
        job.run_since_checkpoint_s = 0.0

    def _advance(self) -> None:
        """Integrate work and checkpoints of running jobs up to now; place waiting jobs."""
        now = self.clock()
        dt = now - self._last_s
        if dt > 0:
            for job in self._jobs.values():
                if job.state == RUNNING:
                    self._run_for(job, dt, now)
            self._last_s = now
        self._schedule(now)

    def _run_for(self, job: _Job, dt: float, now: float) -> None:
        # Throughput is taken as constant since the last call: callers poll often compared
        # with how often caps change, and the error is bounded by one poll of work.
        rate = sum(gpu.throughput_fraction for gpu, _ in self._gpus_of(job))
        job.work_done_gpu_s += rate * dt
        interval = job.checkpoint_interval_s
        if interval > 0:
            job.run_since_checkpoint_s += dt
            if job.run_since_checkpoint_s >= interval:
                # The latest checkpoint was written at the last multiple of the interval.
                overshoot = job.run_since_checkpoint_s % interval
                self._checkpoint(job, now - overshoot)
                job.work_saved_gpu_s = max(0.0, job.work_done_gpu_s - rate * overshoot)
                job.run_since_checkpoint_s = overshoot
        target = job.work_target_gpu_s
        if target is not None and job.work_done_gpu_s >= target:
            job.work_done_gpu_s = job.work_saved_gpu_s = target
            self._release(job)
            job.state = COMPLETED

    def _release(self, job: _Job) -> None:
        if job.node is not None:
            node = self._nodes[job.node]
            for gpu, pid in self._gpus_of(job):
                gpu.detach(pid)
            for i in job.gpu_indices:
                node.owner[i] = None
        job.node, job.gpu_indices, job.pids = None, (), ()

    def _schedule(self, now: float) -> None:
        for job in self._jobs.values():
            if job.state != PENDING or job.eligible_at > now:
                continue
            for node in self._nodes.values():
                if job.pinned_node is not None and node.name != job.pinned_node:
                    continue
                free = [i for i, owner in enumerate(node.owner) if owner is None]
                if len(free) >= job.gpus:
                    self._place(job, node, tuple(free[: job.gpus]), now)
                    break

    def _place(self, job: _Job, node: _Node, indices: tuple[int, ...], now: float) -> None:
        job.node, job.gpu_indices = node.name, indices
        job.pids = tuple(next(self._pids) for _ in indices)
        for i, pid in zip(indices, job.pids, strict=True):
            node.owner[i] = job.job_id
            node.gpus[i].attach(pid, job.memory_mib, job.utilization_pct)
        job.state = RUNNING
        job.started_at = now
        job.run_since_checkpoint_s = 0.0

    def _info(self, job: _Job) -> SimJobInfo:
        return SimJobInfo(
            job_id=job.job_id,
            name=job.name,
            job_class=job.job_class,
            state=job.state,
            node=job.node,
            gpus=job.gpus,
            utilization_pct=job.utilization_pct,
            gpu_indices=job.gpu_indices,
            pids=job.pids,
            submitted_at=job.submitted_at,
            started_at=job.started_at,
            last_checkpoint_at=job.last_checkpoint_at,
            work_done_gpu_s=job.work_done_gpu_s,
            work_saved_gpu_s=job.work_saved_gpu_s,
            work_lost_gpu_s=job.work_lost_gpu_s,
            work_target_gpu_s=job.work_target_gpu_s,
            preemptions=job.preemptions,
            suspensions=job.suspensions,
        )
