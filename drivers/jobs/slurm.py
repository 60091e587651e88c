"""Slurm job control through the Slurm command-line tools (``squeue``, ``scontrol``, ``scancel``).

Jobs are listed with ``squeue --json`` (Slurm >= 21.08; Debian bookworm's 22.05 emits OpenAPI
v0.0.38, where ``job_state`` is a string; 23.x makes it a list, and both are read). Note that
22.05 ``squeue --json`` exits 0 even when the controller is unreachable and reports the failure
in the ``errors`` array, so that array is checked. A job's class comes from its comment
(``class=sla``), its QOS or its partition, by configurable rules; its GPU count from
``gres_detail`` (allocated) or ``tres_per_node``/``tres_per_job`` (requested).

Every command runs as an asyncio subprocess with a timeout, and every command first looks the
job up with ``squeue``: ``scontrol`` answers an unknown job and an unreachable controller with
the same "Unexpected message received", so the lookup is what turns those into a clear
``CommandRejected`` (no such job) or ``DeviceUnavailable`` (scheduler down) with nothing done.

Requeue (preemption) gives the job a chance to checkpoint: a suspended job is resumed first (a
stopped process cannot handle a signal), the grace signal (SIGUSR1 by default) goes to the batch
script and its children (``scancel --signal=USR1 --full``), and after ``grace_s`` (or as soon as
the job exits) ``scontrol requeue`` puts it back in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from drivers.errors import (
    AuthFailed,
    BadReply,
    CommandRejected,
    DeviceTimeout,
    DeviceUnavailable,
)
from drivers.inputs import InputRejected, load_json
from drivers.jobs.base import JobClass, JobReading, JobState

log = logging.getLogger(__name__)

SCHEDULER_ID = "slurm"
_JOB_ID = re.compile(r"^\d+(_\d+)?$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-\[\],]*$")
_SIGNAL = re.compile(r"^(SIG)?[A-Z0-9]+$")

_STATES = {
    "RUNNING": JobState.RUNNING,
    "CONFIGURING": JobState.RUNNING,
    "SUSPENDED": JobState.SUSPENDED,
    "PENDING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "COMPLETING": JobState.COMPLETED,
    "COMPLETED": JobState.COMPLETED,
}
# Anything else (FAILED, CANCELLED, TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, ...) ended
# without finishing its work.

_UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Could not establish a configuration source",
    "Zero Bytes were transmitted",
    "Failed while looking for jobs",
    "slurm_load_",
)


ClassSource = Literal["comment", "qos", "partition"]


@dataclass(frozen=True, slots=True)
class JobClassRules:
    """How a Slurm job's class is found: ``sources`` are tried in order, first match wins.

    * ``comment``: a ``class=<name>`` token in the job comment (key configurable), e.g.
      ``sbatch --comment="class=sla"``;
    * ``qos`` / ``partition``: the ``by_qos`` / ``by_partition`` maps, or else a QOS or
      partition named exactly after a class (``sla``, ``preemptible``, ``filler``).

    Nothing matches: ``default``. ``JobClassRules(sources=("partition",))`` reads only the
    partition, as ``class_from: partition`` in the site config means.
    """

    sources: tuple[ClassSource, ...] = ("comment", "qos", "partition")
    comment_key: str = "class"
    by_qos: Mapping[str, JobClass] = field(default_factory=dict)
    by_partition: Mapping[str, JobClass] = field(default_factory=dict)
    default: JobClass = JobClass.PREEMPTIBLE

    def classify(self, comment: str, qos: str, partition: str) -> JobClass:
        for source in self.sources:
            found = None
            if source == "comment":
                found = self._from_comment(comment)
            elif source == "qos":
                found = _lookup(self.by_qos, qos)
            else:
                # A pending job may list several partitions ("batch,debug").
                for part in partition.split(","):
                    found = found or _lookup(self.by_partition, part)
            if found is not None:
                return found
        return self.default

    def _from_comment(self, comment: str) -> JobClass | None:
        for token in re.split(r"[\s,;]+", comment.strip()):
            key, sep, value = token.partition("=")
            if sep and key == self.comment_key:
                try:
                    return JobClass(value.lower())
                except ValueError:
                    log.warning("job comment names unknown class %r; using the other rules", value)
        return None


def _lookup(mapping: Mapping[str, JobClass], name: str) -> JobClass | None:
    if name in mapping:
        return mapping[name]
    try:
        return JobClass(name.lower()) if name else None
    except ValueError:
        return None


def _number(value: Any) -> int | float | None:
    """A number from squeue JSON: plain in 22.05, ``{"set": true, "number": N}`` in 23.x+."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


# A deadline further out than this, or a time limit longer, is no promise to plan around.
MAX_DEADLINE_AHEAD_S = 366 * 86400.0


def deadline_and_work(
    raw: Mapping[str, Any], state: JobState, now: datetime
) -> tuple[datetime | None, float | None]:
    """A job's deadline (``sbatch --deadline``) and the running it still needs: its ``--time``
    limit less the time it has run (Slurm does not count time suspended). (None, None) without
    a deadline; (deadline, None) without a limit, since its work left is then unknown.

    Slurm reports ``start_time``, ``suspend_time`` (the last suspend *or* resume) and
    ``pre_sus_time`` (time run before the last suspend), all in seconds."""
    deadline_s = _number(raw.get("deadline"))
    now_s = now.timestamp()
    if (
        deadline_s is None
        or not math.isfinite(deadline_s)
        or deadline_s <= 0
        or deadline_s - now_s > MAX_DEADLINE_AHEAD_S
    ):
        return None, None
    deadline = datetime.fromtimestamp(float(deadline_s), tz=UTC)
    limit_min = _number(raw.get("time_limit"))
    if limit_min is None or not 0 < limit_min * 60.0 <= MAX_DEADLINE_AHEAD_S:
        return deadline, None
    start = _number(raw.get("start_time")) or 0.0
    last_switch = _number(raw.get("suspend_time")) or 0.0
    before = _number(raw.get("pre_sus_time")) or 0.0
    if state is JobState.RUNNING:
        run_s = before + now_s - last_switch if last_switch >= start > 0 else now_s - start
    elif state is JobState.SUSPENDED:
        run_s = before
    else:
        run_s = 0.0
    run_s = min(max(run_s, 0.0), MAX_DEADLINE_AHEAD_S) if math.isfinite(run_s) else 0.0
    return deadline, max(limit_min * 60.0 - run_s, 0.0)


# slurmd suspends a step with SIGTSTP, waits, then SIGSTOP; a resume that reaches it within that
# window is lost and the job stays stopped (seen with 22.05: resume 0.5 s after suspend left
# the processes in state T for good; 1.5 s worked). So a resume waits until the suspend is this
# old; ``suspend_time`` has one-second resolution, hence the margin.
SUSPEND_SETTLE_S = 2.5


@dataclass(frozen=True, slots=True)
class _Job:
    reading: JobReading
    requeueable: bool
    raw_state: str
    suspended_at_s: float | None  # Unix time of the last suspend, if suspended


class SlurmJobs:
    """``JobControl`` over a Slurm cluster, plus node drain/resume.

    ``bin_dir``: where the Slurm tools are (default: ``PATH``). ``env``: extra environment for
    them (e.g. ``SLURM_CONF``). ``checkpoint_path``: a template (``{job_id}``, ``{name}``,
    ``{cwd}``) for the file whose mtime is the job's last checkpoint, readable where the agent
    runs (a shared file system); ``None`` leaves ``last_checkpoint_at`` unknown.
    """

    def __init__(
        self,
        *,
        rules: JobClassRules | None = None,
        bin_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        command_timeout_s: float = 10.0,
        grace_signal: str = "USR1",
        checkpoint_path: str | None = None,
        poll_interval_s: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not _SIGNAL.match(grace_signal):
            raise ValueError(f"grace_signal must be a signal name like USR1, got {grace_signal!r}")
        self._rules = rules or JobClassRules()
        self._bin_dir = bin_dir
        self._env = {**os.environ, **env} if env is not None else None
        self._timeout_s = command_timeout_s
        self._grace_signal = grace_signal
        self._checkpoint_path = checkpoint_path
        self._poll_s = poll_interval_s
        self._clock = clock

    # ---- running the tools ----------------------------------------------------------------

    async def _run(self, device_id: str, *argv: str) -> str:
        """Run a Slurm tool; its stdout, or the project exception for its failure."""
        tool = str(self._bin_dir / argv[0]) if self._bin_dir is not None else argv[0]
        what = " ".join(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                tool,
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except FileNotFoundError as exc:
            raise DeviceUnavailable(
                device_id,
                f"{argv[0]} not found ({tool}): install the Slurm client tools "
                "(Debian slurm-client) or set bin_dir; nothing done",
            ) from exc
        except PermissionError as exc:
            raise DeviceUnavailable(device_id, f"cannot execute {tool}: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise DeviceTimeout(
                device_id, f"`{what}` gave no answer within {self._timeout_s} s"
            ) from None
        stdout = out.decode(errors="replace")
        stderr = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise _command_error(device_id, what, stderr or stdout.strip(), proc.returncode)
        return stdout

    # ---- reading --------------------------------------------------------------------------

    async def list_jobs(self) -> tuple[JobReading, ...]:
        """Every job the controller knows (pending, running, suspended, recently ended)."""
        return tuple(job.reading for job in await self._query())

    async def _query(self, job_id: str | None = None) -> list[_Job]:
        argv = ["squeue", "--json"]
        if job_id is not None:
            argv.append(f"--jobs={job_id}")
        device_id = job_id or SCHEDULER_ID
        text = await self._run(device_id, *argv)
        try:
            # Bounded like every input: a cluster's whole queue fits in 64 MiB many times over.
            doc = load_json(text, device_id, max_bytes=64 << 20, max_depth=64, what="squeue")
            errors = doc.get("errors") or []
            raw_jobs = doc["jobs"]
        except (InputRejected, ValueError, KeyError, AttributeError) as exc:
            raise BadReply(device_id, f"squeue --json gave no job list: {text[:200]!r}") from exc
        if errors:
            detail = "; ".join(f"{e.get('description', '')} ({e.get('error', '')})" for e in errors)
            if any(marker in detail for marker in _UNREACHABLE):
                raise DeviceUnavailable(
                    device_id, f"Slurm controller unreachable: squeue reported {detail}"
                )
            raise BadReply(device_id, f"squeue reported errors: {detail}")
        now = self._clock()
        jobs = []
        for raw in raw_jobs:
            try:
                jobs.append(self._parse(raw, now))
            except (KeyError, TypeError, ValueError) as exc:
                raise BadReply(device_id, f"malformed job in squeue output: {exc!r}") from exc
        return jobs

    def _parse(self, raw: Mapping[str, Any], now: datetime) -> _Job:
        job_id = str(_number(raw["job_id"]))
        array_job, array_task = _number(raw.get("array_job_id")), _number(raw.get("array_task_id"))
        if array_job and array_task is not None:
            job_id = f"{array_job}_{array_task}"
        state_field = raw["job_state"]
        # 22.05: "RUNNING"; 23.02+: ["RUNNING"] (possibly with flags like "REQUEUED").
        raw_state = state_field[0] if isinstance(state_field, list) else str(state_field)
        cwd = str(raw.get("current_working_directory") or "")
        name = str(raw.get("name") or "")
        nodes = str(raw.get("nodes") or "") or None
        state = _STATES.get(raw_state, JobState.FAILED)
        deadline, work_left_s = deadline_and_work(raw, state, now)
        reading = JobReading(
            job_id=job_id,
            name=name,
            job_class=self._rules.classify(
                str(raw.get("comment") or ""), str(raw.get("qos") or ""), str(raw["partition"])
            ),
            state=state,
            node=nodes,
            gpus=gpu_count(raw),
            at=now,
            last_checkpoint_at=self._checkpoint_time(job_id, name, cwd),
            deadline=deadline,
            work_left_s=work_left_s,
        )
        suspend_time = _number(raw.get("suspend_time"))
        suspended_at_s = (
            float(suspend_time)
            if reading.state is JobState.SUSPENDED and suspend_time is not None
            else None
        )
        return _Job(reading, bool(raw.get("requeue", True)), raw_state, suspended_at_s)

    def _checkpoint_time(self, job_id: str, name: str, cwd: str) -> datetime | None:
        if self._checkpoint_path is None:
            return None
        path = Path(self._checkpoint_path.format(job_id=job_id, name=name, cwd=cwd))
        try:
            return datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return None

    async def _job(self, job_id: str) -> _Job:
        if not _JOB_ID.match(job_id):
            raise CommandRejected(job_id, "not a Slurm job id (digits, or digits_digits)")
        for job in await self._query(job_id):
            if job.reading.job_id == job_id:
                return job
        raise CommandRejected(job_id, "no such Slurm job; nothing done")

    # ---- commands -------------------------------------------------------------------------

    async def suspend(self, job_id: str) -> None:
        job = await self._job(job_id)
        state = job.reading.state
        if state is JobState.SUSPENDED:
            return
        if state is not JobState.RUNNING:
            raise CommandRejected(job_id, f"cannot suspend a {job.raw_state} job; nothing done")
        await self._run(job_id, "scontrol", "suspend", job_id)
        log.info("slurm job %s suspended", job_id)

    async def resume(self, job_id: str) -> None:
        job = await self._job(job_id)
        state = job.reading.state
        if state is JobState.RUNNING:
            return
        if state is not JobState.SUSPENDED:
            raise CommandRejected(job_id, f"cannot resume a {job.raw_state} job; nothing done")
        await self._resume_settled(job)
        log.info("slurm job %s resumed", job_id)

    async def _resume_settled(self, job: _Job) -> None:
        if job.suspended_at_s is not None:
            wait_s = job.suspended_at_s + SUSPEND_SETTLE_S - self._clock().timestamp()
            if wait_s > 0:
                await asyncio.sleep(min(wait_s, SUSPEND_SETTLE_S))
        await self._run(job.reading.job_id, "scontrol", "resume", job.reading.job_id)

    async def requeue(self, job_id: str, grace_s: float) -> None:
        """Preempt: grace signal, wait up to ``grace_s`` for the job to checkpoint, requeue."""
        if grace_s < 0:
            raise CommandRejected(job_id, f"grace_s must be >= 0, got {grace_s}")
        job = await self._job(job_id)
        state = job.reading.state
        if state is JobState.PENDING:
            return  # already waiting in the queue: it draws no power
        if state not in (JobState.RUNNING, JobState.SUSPENDED):
            raise CommandRejected(job_id, f"cannot requeue a {job.raw_state} job; nothing done")
        if not job.requeueable:
            raise CommandRejected(
                job_id, "job was submitted with --no-requeue; it can only be suspended"
            )
        if grace_s > 0:
            if state is JobState.SUSPENDED:
                await self._resume_settled(job)
            await self._run(job_id, "scancel", f"--signal={self._grace_signal}", "--full", job_id)
            await self._wait_until_stopped(job_id, grace_s)
        await self._run(job_id, "scontrol", "requeue", job_id)
        log.info("slurm job %s requeued (grace %g s)", job_id, grace_s)

    async def _wait_until_stopped(self, job_id: str, grace_s: float) -> None:
        """Wait for the grace period, or less if the job exits after checkpointing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(self._poll_s, left))
            jobs = await self._query(job_id)
            if not any(j.reading.state is JobState.RUNNING for j in jobs):
                return

    async def drain_node(self, node: str, reason: str) -> None:
        """Let running jobs finish but start no new ones on ``node``."""
        _check_node(node)
        if not reason.strip():
            raise CommandRejected(node, "Slurm needs a reason to drain a node")
        await self._run(
            node, "scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}"
        )
        log.info("slurm node %s draining: %s", node, reason)

    async def resume_node(self, node: str) -> None:
        """Return a drained node to service."""
        _check_node(node)
        await self._run(node, "scontrol", "update", f"NodeName={node}", "State=RESUME")
        log.info("slurm node %s resumed", node)


def gpu_count(raw: Mapping[str, Any]) -> int:
    """GPUs of a job: allocated (``gres_detail`` per node) if running, else requested."""
    detail = raw.get("gres_detail") or []
    allocated = 0
    for entry in detail:
        # "gpu:2(IDX:0-1)" or "gpu:a100:2(IDX:0-1)"
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", str(entry))
        if m:
            allocated += int(m.group(1))
    if allocated:
        return allocated
    alloc = str(raw.get("tres_alloc_str") or "")
    m = re.search(r"gres/gpu=(\d+)", alloc)
    if m:
        return int(m.group(1))
    per_job = _requested(str(raw.get("tres_per_job") or ""))
    if per_job:
        return per_job
    nodes = _number(raw.get("node_count"))
    node_count = int(nodes) if nodes is not None and nodes > 0 else 1
    return _requested(str(raw.get("tres_per_node") or "")) * node_count


def _requested(tres: str) -> int:
    """GPUs in a request like "gres:gpu:2", "gres/gpu:a100:2" or "gpu:2"."""
    total = 0
    for item in tres.split(","):
        m = re.search(r"gpu(?::[^:,]+)?:(\d+)$", item)
        if m:
            total += int(m.group(1))
    return total


def _check_node(node: str) -> None:
    if not _NODE_NAME.match(node):
        raise CommandRejected(node, "not a Slurm node name")


def _command_error(device_id: str, what: str, text: str, rc: int | None) -> Exception:
    message = f"`{what}` failed (exit {rc}): {text[-300:]}"
    if any(marker in text for marker in _UNREACHABLE):
        return DeviceUnavailable(device_id, f"Slurm controller unreachable; {message}")
    if "Access/permission denied" in text or "Permission denied" in text:
        return AuthFailed(device_id, message)
    return CommandRejected(device_id, message)
