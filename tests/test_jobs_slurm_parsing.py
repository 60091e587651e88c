"""Slurm driver parsing without a cluster: GPU counts, class rules, squeue JSON 22.05 and 23.x."""

from __future__ import annotations

from datetime import UTC, datetime

from drivers.jobs.base import JobClass, JobState
from drivers.jobs.slurm import JobClassRules, SlurmJobs, deadline_and_work, gpu_count


def test_gpu_count_from_every_squeue_shape() -> None:
    assert gpu_count({"gres_detail": ["gpu:a100:2(IDX:0-1)", "gpu:2(IDX:2-3)"]}) == 4
    assert gpu_count({"gres_detail": [], "tres_alloc_str": "cpu=8,gres/gpu=4"}) == 4
    assert gpu_count({"tres_per_job": "gres:gpu:8"}) == 8
    assert gpu_count({"tres_per_node": "gres/gpu:h100:2", "node_count": 3}) == 6
    assert gpu_count({"tres_per_node": "gres:gpu:2"}) == 2
    assert gpu_count({"tres_per_node": "", "tres_alloc_str": "cpu=1"}) == 0


def test_class_rules_precedence() -> None:
    rules = JobClassRules(by_qos={"contract": JobClass.SLA}, by_partition={"spot": JobClass.FILLER})
    assert rules.classify("class=filler", "contract", "spot") is JobClass.FILLER
    assert rules.classify("owner=x; class=SLA", "", "") is JobClass.SLA
    assert rules.classify("class=bogus", "contract", "spot") is JobClass.SLA
    assert rules.classify("", "", "gpu,spot") is JobClass.FILLER
    assert rules.classify("", "normal", "gpu") is JobClass.PREEMPTIBLE
    assert rules.classify("", "", "sla") is JobClass.SLA  # named after a class
    only_partition = JobClassRules(sources=("partition",), default=JobClass.FILLER)
    assert only_partition.classify("class=sla", "sla", "preemptible") is JobClass.PREEMPTIBLE
    assert only_partition.classify("class=sla", "sla", "gpu") is JobClass.FILLER


def test_squeue_23_number_objects_are_read() -> None:
    raw = {
        "job_id": {"set": True, "infinite": False, "number": 42},
        "array_job_id": {"set": True, "infinite": False, "number": 0},
        "array_task_id": {"set": False, "infinite": False, "number": 0},
        "job_state": ["SUSPENDED"],
        "suspend_time": {"set": True, "infinite": False, "number": 1795398000},
        "partition": "sla",
        "tres_per_node": "gres/gpu:4",
        "node_count": {"set": True, "infinite": False, "number": 2},
        "nodes": "gpu[01-02]",
    }
    job = SlurmJobs()._parse(raw, datetime.now(UTC))
    assert job.reading.job_id == "42"
    assert job.reading.state is JobState.SUSPENDED
    assert job.reading.job_class is JobClass.SLA
    assert job.reading.gpus == 8
    assert job.suspended_at_s == 1795398000


def test_deadline_and_work_left_from_squeue_fields() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    t = now.timestamp()
    base = {"deadline": t + 6 * 3600, "time_limit": 120, "start_time": t - 600}
    # Running since 10 minutes ago, never suspended: 110 minutes of work left.
    deadline, left = deadline_and_work(base, JobState.RUNNING, now)
    assert deadline == datetime.fromtimestamp(t + 6 * 3600, tz=UTC)
    assert left == 110 * 60
    # Ran 5 minutes, suspended, resumed 2 minutes ago: 7 minutes run.
    resumed = {**base, "pre_sus_time": 300, "suspend_time": t - 120}
    assert deadline_and_work(resumed, JobState.RUNNING, now)[1] == 113 * 60
    # Suspended after 5 minutes of running: 5 minutes run, however long ago.
    assert deadline_and_work(resumed, JobState.SUSPENDED, now)[1] == 115 * 60
    assert deadline_and_work(base, JobState.PENDING, now)[1] == 120 * 60
    # Slurm 23.x number objects.
    shaped = {**base, "deadline": {"set": True, "number": t + 3600}, "time_limit": {"set": True,
              "infinite": False, "number": 60}}  # fmt: skip
    assert deadline_and_work(shaped, JobState.PENDING, now)[1] == 3600


def test_hostile_deadline_fields_are_no_deadline_and_never_raise() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    t = now.timestamp()
    for deadline in (0, -5, 10**30, float("inf"), float("nan"), "soon", True, None, {"set": False}):
        assert deadline_and_work({"deadline": deadline, "time_limit": 60}, JobState.RUNNING,
                                 now) == (None, None)  # fmt: skip
    # A deadline but no usable limit: deferrable work of unknown size is not planned.
    for limit in (None, 0, -1, 10**12, float("nan"), {"set": True, "infinite": True}):
        d, left = deadline_and_work({"deadline": t + 60, "time_limit": limit}, JobState.RUNNING,
                                    now)  # fmt: skip
        assert d is not None
        assert left is None
    # Nonsense times run never make the work left negative or infinite.
    d, left = deadline_and_work(
        {"deadline": t + 60, "time_limit": 60, "start_time": -1e300, "pre_sus_time": 1e300},
        JobState.SUSPENDED,
        now,
    )
    assert left == 0.0
