"""The simulated job scheduler on simulated GPUs, and the job-control driver over it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drivers.errors import CommandRejected, DeviceUnavailable
from drivers.jobs.base import JobClass, JobControl, JobState
from drivers.jobs.sim import SimJobs
from simulators.jobs import (
    COMPLETED,
    PENDING,
    RUNNING,
    SUSPENDED,
    BadJobState,
    NoSuchJob,
    SchedulerDown,
    SimScheduler,
)
from simulators.nvml import H100_SXM, SimNvml


class Clock:
    """Seconds that move only when the test says so (shared by GPUs and scheduler)."""

    def __init__(self) -> None:
        self.now_s = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nvml(clock: Clock) -> SimNvml:
    return SimNvml([H100_SXM] * 4, clock=clock)


@pytest.fixture
def scheduler(nvml: SimNvml, clock: Clock) -> SimScheduler:
    return SimScheduler({"node-a": nvml.gpus}, clock=clock, requeue_delay_s=30)


def test_placed_job_drives_its_gpus_and_suspension_idles_them(
    scheduler: SimScheduler, nvml: SimNvml
) -> None:
    job_id = scheduler.submit(job_class="preemptible", gpus=2, utilization_pct=90)
    job = scheduler.job(job_id)
    assert (job.state, job.node, job.gpu_indices) == (RUNNING, "node-a", (0, 1))
    busy, free = nvml.gpus[0], nvml.gpus[2]
    assert busy.power_w == pytest.approx(70 + 630 * 0.9)
    assert free.power_w == pytest.approx(70)
    assert busy.process_list()[0].pid == job.pids[0]
    scheduler.suspend(job_id)
    assert scheduler.job(job_id).state == SUSPENDED
    assert busy.utilization_pct == 0
    assert busy.power_w == pytest.approx(70)
    assert busy.memory_used_mib > 0  # a suspended process keeps its GPU memory
    scheduler.resume(job_id)
    assert busy.utilization_pct == 90


def test_work_follows_the_cap_and_checkpoints_every_interval(
    scheduler: SimScheduler, nvml: SimNvml, clock: Clock
) -> None:
    job_id = scheduler.submit(
        job_class="preemptible", gpus=1, utilization_pct=100, checkpoint_interval_s=600
    )
    clock.now_s += 500
    assert scheduler.job(job_id).work_done_gpu_s == pytest.approx(500)
    assert scheduler.job(job_id).last_checkpoint_at is None
    nvml.gpus[0].power_limit_w = 350  # half the power: three quarters of the work
    clock.now_s += 200
    job = scheduler.job(job_id)
    assert job.work_done_gpu_s == pytest.approx(500 + 200 * 0.75)
    assert job.last_checkpoint_at == pytest.approx(clock.now_s - 100)
    assert job.work_saved_gpu_s == pytest.approx(500 + 100 * 0.75)
    # Suspended time does no work and does not count towards the next checkpoint.
    scheduler.suspend(job_id)
    clock.now_s += 10_000
    assert scheduler.job(job_id).work_done_gpu_s == pytest.approx(650)


def test_requeue_without_grace_loses_work_since_checkpoint_and_frees_gpus(
    scheduler: SimScheduler, nvml: SimNvml, clock: Clock
) -> None:
    first = scheduler.submit(
        job_class="preemptible", gpus=4, utilization_pct=100, checkpoint_interval_s=100
    )
    waiting = scheduler.submit(job_class="filler", gpus=2)
    assert scheduler.job(waiting).state == PENDING  # no room yet
    clock.now_s += 150
    scheduler.requeue(first, grace_s=0)
    job = scheduler.job(first)
    assert job.state == PENDING
    assert job.work_done_gpu_s == pytest.approx(400)  # 4 GPU x 100 s at the checkpoint
    assert job.work_lost_gpu_s == pytest.approx(200)
    assert job.preemptions == 1
    # The freed GPUs go to the waiting job at once; the preempted one waits its delay.
    assert scheduler.job(waiting).state == RUNNING
    assert nvml.gpus[3].utilization_pct == 0
    clock.now_s += 30
    assert scheduler.job(first).state == PENDING  # still no room: the filler holds 2 of 4
    scheduler.cancel(waiting)
    assert scheduler.job(first).state == RUNNING


def test_requeue_with_grace_checkpoints_first(scheduler: SimScheduler, clock: Clock) -> None:
    job_id = scheduler.submit(job_class="preemptible", gpus=1, utilization_pct=100)
    clock.now_s += 120
    scheduler.requeue(job_id, grace_s=30)
    job = scheduler.job(job_id)
    assert job.work_lost_gpu_s == 0
    assert job.work_saved_gpu_s == pytest.approx(120)
    assert job.last_checkpoint_at == clock.now_s


def test_job_with_a_work_target_completes_and_frees_its_gpus(
    scheduler: SimScheduler, nvml: SimNvml, clock: Clock
) -> None:
    job_id = scheduler.submit(job_class="sla", gpus=1, utilization_pct=100, work_target_gpu_s=60)
    clock.now_s += 61
    assert scheduler.job(job_id).state == COMPLETED
    assert nvml.gpus[0].process_list() == []


def test_bad_requests_are_refused_and_change_nothing(scheduler: SimScheduler) -> None:
    with pytest.raises(BadJobState, match="unknown job class 'urgent'"):
        scheduler.submit(job_class="urgent", gpus=1)
    with pytest.raises(BadJobState, match="no node has more than 4"):
        scheduler.submit(job_class="sla", gpus=5)
    with pytest.raises(BadJobState, match="unknown node 'node-z'"):
        scheduler.submit(job_class="sla", gpus=1, node="node-z")
    assert scheduler.jobs() == ()
    with pytest.raises(NoSuchJob):
        scheduler.suspend("99")
    job_id = scheduler.submit(job_class="filler", gpus=4)
    pending = scheduler.submit(job_class="filler", gpus=1)
    with pytest.raises(BadJobState, match="only a running job can be suspended"):
        scheduler.suspend(pending)
    with pytest.raises(BadJobState, match="only a suspended job can be resumed"):
        scheduler.resume(pending)
    assert scheduler.job(job_id).state == RUNNING


async def test_driver_maps_jobs_and_errors(scheduler: SimScheduler, clock: Clock) -> None:
    jobs = SimJobs(scheduler)
    assert isinstance(jobs, JobControl)
    sla = scheduler.submit(job_class="sla", gpus=2, checkpoint_interval_s=60)
    pre = scheduler.submit(job_class="preemptible", gpus=2)
    clock.now_s += 90
    readings = {r.job_id: r for r in await jobs.list_jobs()}
    assert readings[sla].job_class is JobClass.SLA
    assert readings[sla].state is JobState.RUNNING
    assert readings[sla].node == "node-a"
    assert readings[sla].gpus == 2
    assert readings[sla].last_checkpoint_at == datetime.fromtimestamp(clock.now_s - 30, UTC)
    assert readings[pre].last_checkpoint_at is None
    await jobs.suspend(pre)
    assert scheduler.job(pre).state == SUSPENDED
    await jobs.resume(pre)
    assert scheduler.job(pre).state == RUNNING
    with pytest.raises(CommandRejected, match="no such job") as err:
        await jobs.suspend("404")
    assert err.value.device_id == "404"
    await jobs.requeue(pre, 0)
    with pytest.raises(CommandRejected, match="only a suspended job can be resumed"):
        await jobs.resume(pre)
    scheduler.go_down()
    with pytest.raises(DeviceUnavailable, match="simulated scheduler down"):
        await jobs.list_jobs()
    with pytest.raises(SchedulerDown):
        scheduler.jobs()
    scheduler.come_back()
    assert len(await jobs.list_jobs()) == 2


def test_ignored_commands_are_accepted_without_effect(scheduler: SimScheduler) -> None:
    job_id = scheduler.submit(job_class="preemptible", gpus=1)
    scheduler.ignore_commands(job_id)
    scheduler.suspend(job_id)
    assert scheduler.job(job_id).state == RUNNING
    scheduler.ignore_commands(job_id, False)
    scheduler.suspend(job_id)
    assert scheduler.job(job_id).state == SUSPENDED
