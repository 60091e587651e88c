"""Local job control on real processes: SIGSTOP/SIGCONT, preemption with a grace period,
checkpoint times read from the job's checkpoint file."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drivers.errors import CommandRejected
from drivers.jobs.base import JobClass, JobControl, JobState
from drivers.jobs.local import LocalJobs

CHECKPOINT_JOB = Path(__file__).with_name("checkpoint_job.py")


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ('T' stopped, 'S' sleeping, 'R' running...)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie waiting for its parent)."""
    try:
        return proc_state(pid) == "Z"
    except FileNotFoundError:
        return True


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def voluntary_switches(pid: int) -> int:
    """How often ``pid`` has gone to sleep of its own accord (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


async def wait_steps(pid: int, steps: int = 3, timeout_s: float = 20.0) -> None:
    """Wait until the checkpoint job ``pid`` has counted at least ``steps`` more steps.

    Each step of ``checkpoint_job.py`` sleeps once, a voluntary context switch: ``steps + 1``
    switches after now include ``steps`` completed sleeps, each followed by its step. A fixed
    sleep in the test could pass with no step at all on a busy machine.
    """
    base = voluntary_switches(pid)
    await wait_for(lambda: voluntary_switches(pid) >= base + steps + 1, timeout_s)


async def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def jobs() -> AsyncIterator[LocalJobs]:
    async with LocalJobs(node="gpu-host-1", stop_grace_s=1.0) as local:
        yield local


async def test_suspend_and_resume_a_process_group(jobs: LocalJobs) -> None:
    assert isinstance(jobs, JobControl)
    # A shell with a child: both must stop, as a launcher's workers would.
    await jobs.start("train-1", ["sh", "-c", "sleep 300 & wait"], job_class=JobClass.PREEMPTIBLE)
    pid = jobs.pid("train-1")
    assert pid is not None
    await wait_for(lambda: len(group_pids(pid)) == 2)
    await jobs.suspend("train-1")
    await wait_for(lambda: all(proc_state(p) == "T" for p in group_pids(pid)))
    (reading,) = await jobs.list_jobs()
    assert reading.state is JobState.SUSPENDED
    assert reading.node == "gpu-host-1"
    assert reading.job_class is JobClass.PREEMPTIBLE
    await jobs.suspend("train-1")  # idempotent
    await jobs.resume("train-1")
    await wait_for(lambda: all(proc_state(p) in "SR" for p in group_pids(pid)))
    assert (await jobs.list_jobs())[0].state is JobState.RUNNING


async def test_preempt_checkpoints_within_grace_then_restart_resumes(
    jobs: LocalJobs, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    await jobs.start(
        "train-2",
        [sys.executable, str(CHECKPOINT_JOB), str(ckpt), "60"],  # no periodic save in the test
        job_class=JobClass.PREEMPTIBLE,
        checkpoint_path=ckpt,
    )
    pid = jobs.pid("train-2")
    assert pid is not None
    await wait_for(ckpt.exists)  # step 0, written once its signal handlers are in place
    assert ckpt.read_text() == "0"
    await wait_steps(pid)
    await jobs.suspend("train-2")
    await wait_for(lambda: proc_state(pid) == "T")
    before = datetime.now(UTC)
    started = time.monotonic()
    await jobs.requeue("train-2", grace_s=5.0)
    # A suspended job is continued so it can act on SIGTERM: it checkpoints and exits at once.
    assert time.monotonic() - started < 2.0
    assert gone(pid)
    (reading,) = await jobs.list_jobs()
    assert reading.state is JobState.PENDING
    assert reading.last_checkpoint_at is not None
    assert reading.last_checkpoint_at >= before.replace(microsecond=0)
    steps = int(ckpt.read_text())
    assert steps > 0  # only the SIGTERM handler saves steps > 0 here
    with pytest.raises(CommandRejected, match="pending after requeue"):
        await jobs.suspend("train-2")
    saved_ns = ckpt.stat().st_mtime_ns
    await jobs.resume("train-2")  # starts the command again; it continues from the checkpoint
    new_pid = jobs.pid("train-2")
    assert new_pid is not None
    assert new_pid != pid
    assert (await jobs.list_jobs())[0].state is JobState.RUNNING
    await wait_for(lambda: ckpt.stat().st_mtime_ns != saved_ns)  # its handlers are in place
    await wait_steps(new_pid)
    await jobs.requeue("train-2", grace_s=5.0)
    assert int(ckpt.read_text()) > steps


async def test_job_ignoring_sigterm_is_killed_after_grace(jobs: LocalJobs) -> None:
    await jobs.start(
        "stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & wait"], job_class=JobClass.FILLER
    )
    pid = jobs.pid("stubborn")
    assert pid is not None
    await wait_for(lambda: len(group_pids(pid)) == 2)
    started = time.monotonic()
    await jobs.requeue("stubborn", grace_s=0.4)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0
    await wait_for(lambda: group_pids(pid) == [])


async def test_finished_job_reports_completion_and_refuses_commands(jobs: LocalJobs) -> None:
    await jobs.start("short", ["true"], job_class=JobClass.SLA, gpus=2)
    await wait_for(lambda: jobs.pid("short") is None)
    (reading,) = await jobs.list_jobs()
    assert reading.state is JobState.COMPLETED
    assert reading.gpus == 2
    with pytest.raises(CommandRejected, match="has finished; nothing done"):
        await jobs.suspend("short")
    await jobs.start("broken", ["sh", "-c", "exit 3"], job_class=JobClass.SLA)
    await wait_for(lambda: jobs.pid("broken") is None)
    states = {r.job_id: r.state for r in await jobs.list_jobs()}
    assert states["broken"] is JobState.FAILED


async def test_bad_input_is_refused_and_starts_nothing(jobs: LocalJobs) -> None:
    with pytest.raises(CommandRejected, match="cannot start"):
        await jobs.start("x", ["/nonexistent/trainer"], job_class=JobClass.FILLER)
    with pytest.raises(CommandRejected, match="job id must be"):
        await jobs.start("../evil", ["true"], job_class=JobClass.FILLER)
    with pytest.raises(CommandRejected, match="no such local job"):
        await jobs.suspend("nope")
    with pytest.raises(CommandRejected, match="grace_s"):
        await jobs.requeue("nope", grace_s=-1)
    assert await jobs.list_jobs() == ()


async def test_leaving_the_context_stops_every_job() -> None:
    async with LocalJobs(stop_grace_s=0.5) as local:
        await local.start("a", ["sleep", "300"], job_class=JobClass.FILLER)
        await local.start("b", ["sleep", "300"], job_class=JobClass.FILLER)
        await local.suspend("b")
        pids = [local.pid("a"), local.pid("b")]
    for pid in pids:
        assert pid is not None
        assert gone(pid)
