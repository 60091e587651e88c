"""The site's GPU nodes and AI jobs as one :class:`~agent.runtime.fleet.Fleet`, built from config.

:class:`GpuFleet` holds one GPU driver per node (NVML on this host, or whatever the registry's
``driver:`` factory builds) and one job-control driver for the whole site (Slurm, local
processes, or a scheduler registered by the demo and the tests). It polls them, keeps the last
good readings, and gives the coordinator one :class:`~agent.control.domain.GpuNodeView` per node:

* the per-GPU cap the agent commanded, or before any command the highest limit NVML reports
  (the node's maximum cap until the first reading);
* the scheduler's jobs placed on the node (``scheduler_node``, default the node id), priced with
  the contract of their class from ``ai:``; a job's ``commanded_since`` is when the agent last
  changed it, or a time dated back by the dwell times for a state the agent did not cause, so
  no dwell time protects it (the same rule as for miners);
* measured power = the GPUs' measured power + the host overhead, with a GPU that fell off the
  bus counted at the node's maximum cap (it may still draw power; nobody can read it);
* a fault text when the node cannot be trusted or steered: a GPU lost, fewer or more GPUs than
  configured, three failed polls in a row, a job scheduler that stopped answering, or a command
  that failed (held for ``fault_retry_s``). The policy leaves a faulted node alone and counts it
  at that worst-case power, so limits still hold with the other devices.

:meth:`GpuFleet.apply` carries out one GPU or job action and checks it at once in telemetry, so
nothing stays pending for :meth:`GpuFleet.verify`: a power cap is set on every GPU of the node
and read back; a job is suspended, resumed or requeued and its new state read back from the
scheduler. A command that was accepted but not applied raises
:class:`~drivers.errors.CommandNotApplied`.

Drivers that are async context managers (NVML, local jobs) are opened on the first poll and
closed by :meth:`GpuFleet.run` (a runtime service) when the agent stops.
:func:`build_gpu_fleet` turns ``gpu_nodes:`` and ``ai:`` into a :class:`GpuFleet` through the
driver registry (:mod:`agent.runtime.registry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from agent.control.config import (
    AgentConfig,
    AiConfig,
    ConfigError,
    ControlConfig,
    JobClassContract,
)
from agent.control.domain import Action, ActionKind, GpuNodeView, JobView
from agent.control.site import gpu_nodes
from agent.runtime.coordinator import utc_now
from agent.runtime.fleet import FleetViews, NotApplied
from agent.runtime.registry import DriverConfigError, DriverRegistry, GpuNodeSpec, live_drivers
from drivers.errors import (
    CommandNotApplied,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
)
from drivers.gpus.base import GpuControl, GpuReading
from drivers.jobs.base import JobClass, JobControl, JobReading, JobState

log = logging.getLogger(__name__)

FLEET_ID = "gpus"  # the device id of errors that concern the whole GPU fleet
CAP_TOLERANCE_W = 0.5  # NVML works in mW; a read-back within this is the cap asked for
FAILED_POLLS_FOR_FAULT = 3


class _Refused(CommandRejected):
    """Refused by the fleet's own checks, before any device was asked: not the node's fault."""


@runtime_checkable
class GpuEachReader(Protocol):
    """Optional: a GPU driver that reports a failing GPU in its place (``NvmlGpus``)."""

    async def read_each(self) -> tuple[GpuReading | DeviceError, ...]: ...


@dataclass(slots=True)
class _Node:
    spec: GpuNodeSpec
    driver: GpuControl
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    opened: bool = False
    readings: tuple[GpuReading, ...] = ()
    lost: dict[int, str] = field(default_factory=dict)  # GPU index -> why it cannot be read
    seen_gpus: int | None = None  # how many GPUs the driver reported last time
    read_at: float | None = None  # monotonic
    last_error: str | None = None
    failures: int = 0
    cap_w: float | None = None  # commanded (or adopted) per-GPU cap
    command_fault: str | None = None
    command_fault_at: float | None = None  # monotonic
    logged_fault: str | None = None


@dataclass(slots=True)
class _JobTrack:
    state: JobState
    since: datetime


class GpuFleet:
    """GPU nodes and their jobs, polled and commanded as one :class:`~agent.runtime.fleet.Fleet`."""

    def __init__(
        self,
        nodes: Sequence[tuple[GpuNodeSpec, GpuControl]],
        jobs: JobControl | None,
        ai: AiConfig,
        control: ControlConfig,
        *,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        fault_retry_s: float = 300.0,
    ) -> None:
        ids = [spec.device_id for spec, _ in nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"GPU node ids must be unique, got {ids}")
        self._nodes = {spec.device_id: _Node(spec, driver) for spec, driver in nodes}
        self.jobs = jobs
        self.ai = ai
        self.control = control
        self.clock = clock
        self.monotonic = monotonic
        self.fault_retry_s = fault_retry_s
        self._stack = contextlib.AsyncExitStack()
        self._open_lock = asyncio.Lock()  # the poller and the run() service both open
        self._jobs_opened = False
        self._job_readings: tuple[JobReading, ...] = ()
        self._jobs_error: str | None = None
        self._jobs_failures = 0
        self._tracks: dict[str, _JobTrack] = {}
        self._jobs_polled = False
        self._closed = False
        self._polled = asyncio.Event()

    @property
    def name(self) -> str:
        return "gpus"

    @property
    def polled(self) -> asyncio.Event:
        return self._polled

    def owns(self, device_id: str) -> bool:
        return device_id in self._nodes

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    async def _open(self) -> None:
        """Enter the drivers that are context managers; one that fails is retried next poll."""
        async with self._open_lock:
            await self._open_locked()

    async def _open_locked(self) -> None:
        if self._closed:
            raise DeviceUnavailable(FLEET_ID, "the GPU fleet is closed (the agent is stopping)")
        for node in self._nodes.values():
            if node.opened:
                continue
            if hasattr(node.driver, "__aenter__"):
                try:
                    await self._stack.enter_async_context(node.driver)  # type: ignore[arg-type]
                except DeviceError as exc:
                    node.last_error = f"cannot open the GPU driver: {exc.message}"
                    node.failures += 1
                    continue
            node.opened = True
        if not self._jobs_opened and self.jobs is not None:
            if hasattr(self.jobs, "__aenter__"):
                await self._stack.enter_async_context(self.jobs)  # type: ignore[arg-type]
            self._jobs_opened = True

    async def aclose(self) -> None:
        """Close every driver that was opened (local jobs are stopped, NVML shut down)."""
        async with self._open_lock:
            self._closed = True
            for node in self._nodes.values():
                node.opened = False
            self._jobs_opened = False
            await self._stack.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """A runtime service: open the drivers, and close them once ``stop`` is set."""
        try:
            await self._open()
            await stop.wait()
        finally:
            await self.aclose()

    # ---- polling --------------------------------------------------------------------------

    @property
    def max_reading_age_s(self) -> float:
        return 3 * self.control.poll_interval_s + self.control.device_timeout_s

    async def poll(self) -> str | None:
        """Read every node and the scheduler. Raises only when nothing at all answered."""
        try:
            await self._open()
            nodes_ok = await asyncio.gather(*(self._poll_node(n) for n in self._nodes.values()))
            jobs_ok = await self._poll_jobs()
        finally:
            self._polled.set()
        self._log_faults()
        if not any(nodes_ok) and not jobs_ok:
            errors = [f"{n.spec.device_id}: {n.last_error}" for n in self._nodes.values()]
            if self._jobs_error is not None:
                errors.append(f"scheduler: {self._jobs_error}")
            raise DeviceUnavailable(FLEET_ID, "; ".join(errors) or "no GPU node answered")
        return None

    async def _poll_node(self, node: _Node) -> bool:
        if not node.opened:
            return False
        try:
            async with node.lock:
                results = await self._read(node)
        except DeviceError as exc:
            self._node_failed(node, exc.message)
            return False
        self._store_readings(node, results)
        return True

    async def _read(self, node: _Node) -> tuple[GpuReading | DeviceError, ...]:
        """Every GPU of the node, a failing one as its error (if the driver can say so)."""
        try:
            async with asyncio.timeout(self.control.device_timeout_s):
                if isinstance(node.driver, GpuEachReader):
                    return await node.driver.read_each()
                return await node.driver.read_all()
        except TimeoutError:
            raise DeviceTimeout(
                node.spec.device_id,
                f"no complete GPU reading within {self.control.device_timeout_s} s",
            ) from None

    def _node_failed(self, node: _Node, message: str) -> None:
        if node.last_error is None:
            log.warning("GPU node %s read failed: %s", node.spec.device_id, message)
        node.last_error = message
        node.failures += 1

    def _store_readings(
        self, node: _Node, results: tuple[GpuReading | DeviceError, ...], *, adopt: bool = True
    ) -> None:
        """Keep a node's readings; with ``adopt``, take a cap changed outside the agent."""
        spec = node.spec
        if node.last_error is not None:
            log.info("GPU node %s answers again", spec.device_id)
        good = tuple(r for r in results if isinstance(r, GpuReading))
        node.lost = {i: r.message for i, r in enumerate(results) if isinstance(r, DeviceError)}
        node.readings, node.seen_gpus = good, len(results)
        node.read_at, node.last_error, node.failures = self.monotonic(), None, 0
        if not good or not adopt:
            return
        observed = max(r.power_limit_w for r in good)
        if node.cap_w is None:
            node.cap_w = observed  # before any command: what the cards are set to
            return
        if any(abs(r.power_limit_w - node.cap_w) > CAP_TOLERANCE_W for r in good):
            # Changed outside the agent (nvidia-smi, a reboot): adopt the highest limit seen,
            # the worst case for power, so the policy re-commands from the truth.
            log.warning(
                "GPU node %s drifted: commanded cap %.0f W, GPUs report %s W",
                spec.device_id,
                node.cap_w,
                "/".join(f"{r.power_limit_w:.0f}" for r in good),
            )
            node.cap_w = observed

    async def _poll_jobs(self) -> bool:
        if self.jobs is None:
            self._jobs_polled = True
            return True
        try:
            async with asyncio.timeout(self.control.device_timeout_s):
                readings = await self.jobs.list_jobs()
        except TimeoutError:
            message = f"job list gave no answer within {self.control.device_timeout_s} s"
        except DeviceError as exc:
            message = exc.message
        else:
            if self._jobs_error is not None:
                log.info("job scheduler answers again")
            self._store_jobs(readings)
            return True
        if self._jobs_error is None:
            log.warning("job scheduler failed: %s", message)
        self._jobs_error = message
        self._jobs_failures += 1
        return False

    def _store_jobs(self, readings: tuple[JobReading, ...]) -> None:
        now = self.clock()
        undated = now - timedelta(seconds=max(self.control.min_on_s, self.control.min_off_s))
        tracks: dict[str, _JobTrack] = {}
        for job in readings:
            track = self._tracks.get(job.job_id)
            if track is None or track.state is not job.state:
                if track is not None:
                    log.info("job %s is %s (was %s)", job.job_id, job.state, track.state)
                # A state the agent did not cause: no dwell time protects it.
                track = _JobTrack(job.state, undated)
            tracks[job.job_id] = track
        self._tracks = tracks
        self._job_readings = readings
        self._jobs_error, self._jobs_failures = None, 0
        self._jobs_polled = True

    # ---- what the policy sees -------------------------------------------------------------

    def readings(self) -> dict[str, tuple[GpuReading, ...]]:
        return {node_id: node.readings for node_id, node in self._nodes.items()}

    def fault(self, node_id: str) -> str | None:
        """Why the node is held faulted now, or None."""
        return self._fault(self._nodes[node_id], self.monotonic())

    def _fault(self, node: _Node, mono: float) -> str | None:
        spec = node.spec
        if node.command_fault is not None:
            assert node.command_fault_at is not None
            if mono - node.command_fault_at < self.fault_retry_s:
                return node.command_fault
            node.command_fault = node.command_fault_at = None
        if node.failures >= FAILED_POLLS_FOR_FAULT:
            return f"unreachable: {node.last_error}"
        if node.lost:
            return "; ".join(f"GPU {i} lost: {why}" for i, why in sorted(node.lost.items()))
        if node.seen_gpus is not None and node.seen_gpus != spec.gpus:
            return f"config says {spec.gpus} GPUs, the driver sees {node.seen_gpus}"
        if self._jobs_failures >= FAILED_POLLS_FOR_FAULT:
            return f"job scheduler unreachable: {self._jobs_error}"
        return None

    def _log_faults(self) -> None:
        mono = self.monotonic()
        for node in self._nodes.values():
            fault = self._fault(node, mono)
            if fault == node.logged_fault:
                continue
            if fault is None:
                log.info(
                    "GPU node %s recovered from fault: %s", node.spec.device_id, node.logged_fault
                )
            else:
                log.warning("GPU node %s faulted: %s", node.spec.device_id, fault)
            node.logged_fault = fault

    def views(self, now: datetime) -> FleetViews:
        return FleetViews(gpu_nodes=self.node_views(now))

    def faults(self) -> dict[str, str]:
        mono = self.monotonic()
        held = ((node_id, self._fault(node, mono)) for node_id, node in self._nodes.items())
        return {node_id: fault for node_id, fault in held if fault is not None}

    def largest_step_w(self) -> float:
        return max((n.spec.gpus * n.spec.max_cap_w for n in self._nodes.values()), default=0.0)

    def node_views(self, now: datetime) -> tuple[GpuNodeView, ...]:
        mono = self.monotonic()
        by_node: dict[str, list[JobReading]] = {}
        for job in self._job_readings:
            if job.node is not None:
                by_node.setdefault(job.node, []).append(job)
        views = []
        for node in self._nodes.values():
            spec = node.spec
            age = math.inf if node.read_at is None else mono - node.read_at
            # Until the scheduler has listed the jobs once, the policy would see busy GPUs as
            # idle ones: keep the node in an unknown state (counted at nameplate) until then.
            fresh = age <= self.max_reading_age_s and self._jobs_polled
            measured: float | None = None
            temperature_c: float | None = None
            if fresh:
                temperature_c = max((r.temperature_c for r in node.readings), default=None)
                measured = (
                    sum(r.power_w for r in node.readings)
                    + len(node.lost) * spec.max_cap_w
                    + spec.host_overhead_w
                )
            jobs = tuple(
                self._job_view(j, spec.device_id) for j in by_node.get(spec.scheduler_node, ())
            )
            views.append(
                GpuNodeView(
                    device_id=spec.device_id,
                    gpu_count=spec.gpus,
                    min_cap_w=spec.min_cap_w,
                    max_cap_w=spec.max_cap_w,
                    idle_w=spec.idle_w,
                    host_overhead_w=spec.host_overhead_w,
                    cap_w=spec.max_cap_w if node.cap_w is None else node.cap_w,
                    jobs=jobs,
                    measured_power_w=measured,
                    # Never read: an unknown state, counted at nameplate by the policy.
                    reading_age_s=age,
                    fault=self._fault(node, mono),
                    circuit=spec.circuit,
                    temperature_c=temperature_c,
                )
            )
        return tuple(views)

    def _contract(self, job_class: JobClass) -> JobClassContract:
        contract: JobClassContract = getattr(self.ai, job_class.value)
        return contract

    def _job_view(self, job: JobReading, node_id: str) -> JobView:
        contract = self._contract(job.job_class)
        track = self._tracks.get(job.job_id)
        return JobView(
            job_id=job.job_id,
            job_class=job.job_class,
            state=job.state,
            gpus=job.gpus,
            node_id=node_id,
            usd_per_gpu_hour=contract.usd_per_gpu_hour,
            penalty_usd=contract.penalty_usd,
            commanded_since=job.at if track is None else track.since,
            last_checkpoint_at=job.last_checkpoint_at,
            # Deferrable: a deadline and a known amount of work left (SLA work is never moved).
            deadline=None
            if job.work_left_s is None or job.job_class is JobClass.SLA
            else job.deadline,
            remaining_gpu_h=0.0 if job.work_left_s is None else job.work_left_s / 3600 * job.gpus,
        )

    # ---- commands -------------------------------------------------------------------------
    # A GPU command is checked as it is given (caps read back, job states listed again), so
    # nothing stays pending; drift (a cap changed by hand) is adopted as each poll sees it.

    def command_failed(self, action: Action, message: str) -> None:
        """Nothing more to do: :meth:`apply` holds the node faulted when a command fails."""

    def unconfirmed(self, device_id: str) -> bool:
        return False

    def pending(self) -> frozenset[str]:
        return frozenset()

    def verify(self) -> list[NotApplied]:
        return []

    def resume(self, commanded: Mapping[str, tuple[str, datetime]]) -> int:
        """Caps and job states are read from the devices, not taken from the journal."""
        return 0

    def adopt_observed(self) -> int:
        return 0

    def reconcile(self) -> list[tuple[str, str, str]]:
        return []

    def commanded(self) -> Iterable[tuple[str, str, datetime]]:
        return ()

    async def apply(self, action: Action) -> None:
        """Carry out one GPU or job action and check it took effect."""
        node = self._nodes.get(action.device_id)
        if node is None:
            raise _Refused(action.device_id, "no such GPU node; nothing done")
        try:
            if action.kind is ActionKind.SET_GPU_CAP:
                await self._set_cap(node, action.target)
            elif action.kind in (
                ActionKind.SUSPEND_JOB,
                ActionKind.RESUME_JOB,
                ActionKind.REQUEUE_JOB,
            ):
                try:
                    await self._job_action(node, action)
                except CommandRejected as exc:
                    # The scheduler refused (the job ended or moved since the last poll): the
                    # next poll shows it, and the node itself did nothing wrong.
                    raise _Refused(exc.device_id, exc.message) from exc
            else:
                raise _Refused(action.device_id, f"{action.kind} is not a GPU action")
        except _Refused:
            raise  # nothing changed on the node: nothing to hold against it
        except DeviceError as exc:
            node.command_fault = f"{action.kind} failed: {exc.message}"
            node.command_fault_at = self.monotonic()
            raise
        node.command_fault = node.command_fault_at = None

    async def _set_cap(self, node: _Node, target: str) -> None:
        spec = node.spec
        node_id = spec.device_id
        try:
            watts = float(target)
        except ValueError:
            raise _Refused(node_id, f"cap must be watts, got {target!r}") from None
        if not math.isfinite(watts) or not (
            spec.min_cap_w - CAP_TOLERANCE_W <= watts <= spec.max_cap_w + CAP_TOLERANCE_W
        ):
            raise _Refused(
                node_id,
                f"cap {target} W is outside the node's range {spec.min_cap_w:g}–"
                f"{spec.max_cap_w:g} W; nothing changed",
            )
        if not node.opened:
            raise DeviceUnavailable(node_id, "GPU driver is not open yet; nothing changed")
        async with node.lock:
            uuids = [r.device_id for r in node.readings]
            if not uuids:
                raise DeviceUnavailable(node_id, "no GPU has been read yet; nothing changed")
            outcomes = await asyncio.gather(
                *(node.driver.set_power_limit(uuid, watts) for uuid in uuids),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, DeviceError):
                    raise outcome
            # Read back every GPU, not only the ones that said yes: the truth decides.
            try:
                results = await self._read(node)
            except DeviceError as exc:
                node.cap_w = spec.max_cap_w  # unknown now: assume the worst
                raise DeviceUnavailable(
                    node_id, f"cap {watts:g} W sent, but reading it back failed: {exc.message}"
                ) from exc
            self._store_readings(node, results, adopt=False)
            errors = [o for o in outcomes if isinstance(o, DeviceError)]
            wrong = [r for r in node.readings if abs(r.power_limit_w - watts) > CAP_TOLERANCE_W]
            if not errors and not wrong and not node.lost:
                node.cap_w = watts
                log.info("GPU node %s: %d GPU capped at %g W", node_id, len(uuids), watts)
                return
            if node.readings:
                node.cap_w = max(r.power_limit_w for r in node.readings)
        if errors:
            first = errors[0]
            raise type(first)(
                node_id,
                f"cap {watts:g} W failed on {len(errors)} of {len(uuids)} GPU: {first}",
            ) from first
        shown = ", ".join(f"GPU {r.index} at {r.power_limit_w:g} W" for r in wrong)
        lost = ", ".join(f"GPU {i} lost" for i in sorted(node.lost))
        raise CommandNotApplied(
            node_id, f"asked every GPU for {watts:g} W; read back {shown or lost}"
        )

    async def _job_action(self, node: _Node, action: Action) -> None:
        node_id = node.spec.device_id
        job_id = action.job_id
        if job_id is None:
            raise _Refused(node_id, f"{action.kind} needs a job id; nothing done")
        if self.jobs is None:
            raise _Refused(node_id, "no job scheduler is configured")
        known = next((j for j in self._job_readings if j.job_id == job_id), None)
        if known is None or known.node != node.spec.scheduler_node:
            where = "unknown" if known is None else f"on {known.node}"
            raise _Refused(node_id, f"job {job_id} is not on this node ({where}); nothing done")
        if action.kind is ActionKind.SUSPEND_JOB:
            await self.jobs.suspend(job_id)
            expected = {JobState.SUSPENDED}
        elif action.kind is ActionKind.RESUME_JOB:
            await self.jobs.resume(job_id)
            expected = {JobState.RUNNING, JobState.COMPLETED}
        else:
            await self.jobs.requeue(job_id, self.ai.requeue_grace_s)
            expected = {JobState.PENDING, JobState.COMPLETED}
        readings = await self.jobs.list_jobs()
        after = next((j for j in readings if j.job_id == job_id), None)
        state = None if after is None else after.state
        if state in expected:
            assert state is not None
            self._tracks[job_id] = _JobTrack(state, self.clock())  # the agent's own change
        self._store_jobs(readings)
        if state not in expected:
            raise CommandNotApplied(
                node_id,
                f"{action.kind} of job {job_id} accepted, but the scheduler shows it "
                f"{state or 'gone'}",
            )


# ---- building from config -----------------------------------------------------------------


def expand_gpu_nodes(config: AgentConfig) -> list[tuple[int, GpuNodeSpec]]:
    """Every configured node as (index of its config line, spec), expanding ``count``."""
    out = []
    for i, device_id, n in gpu_nodes(config):
        suffix = device_id[len(n.id) :]  # "" or "-001", ...: the scheduler's names follow suit
        spec = GpuNodeSpec(
            device_id=device_id,
            scheduler_node=f"{n.scheduler_node or n.id}{suffix}",
            gpus=n.gpus,
            min_cap_w=n.min_cap_w,
            max_cap_w=n.max_cap_w,
            idle_w=n.idle_w,
            host_overhead_w=n.host_overhead_w,
            circuit=n.circuit,
        )
        out.append((i, spec))
    return out


def build_gpu_fleet(
    config: AgentConfig,
    *,
    drivers: DriverRegistry | None = None,
    jobs: JobControl | None = None,
    clock: Callable[[], datetime] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    source: str = "<config>",
) -> GpuFleet:
    """A :class:`GpuFleet` for ``config.gpu_nodes`` and ``config.ai``, drivers from ``drivers``
    (the live ones by default).

    ``jobs`` replaces the configured scheduler (tests hand in a ``SlurmJobs`` for their own
    cluster). Raises :class:`ConfigError` for what config validation cannot see (a driver that
    is not available here, a cap range the card cannot do, two nodes on this host's NVML).
    """
    registry = live_drivers() if drivers is None else drivers
    problems: list[str] = []
    specs = expand_gpu_nodes(config)
    nodes: list[tuple[GpuNodeSpec, GpuControl]] = []
    real_nvml = 0
    for i, spec in specs:
        line = config.gpu_nodes[i]
        if line.driver == "nvml":
            real_nvml += 1
            if real_nvml == 2:
                problems.append(
                    f"{source}: gpu_nodes.{i}.driver: nvml reads this host's GPUs, so only one "
                    "GPU node (count 1) may use it; remote hosts need mqtt-node"
                )
                continue
        try:
            nodes.append((spec, registry.gpu(spec, line, config.control)))
        except DriverConfigError as exc:
            problems.append(f"{source}: {exc.where(f'gpu_nodes.{i}', 'driver')}: {exc}")
    if jobs is None and not problems:
        try:
            jobs = registry.scheduler(config, [spec for _, spec in specs])
        except DriverConfigError as exc:
            problems.append(f"{source}: {exc.where('ai', 'scheduler')}: {exc}")
    if problems:
        raise ConfigError(source, problems)
    return GpuFleet(
        nodes,
        jobs,
        config.ai,
        config.control,
        clock=clock or utc_now,
        monotonic=monotonic,
        fault_retry_s=config.control.fault_retry_s,
    )
