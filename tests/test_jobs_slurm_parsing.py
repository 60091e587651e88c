"""Slurm driver parsing without a cluster: GPU counts, class rules, squeue JSON 22.05 and 23.x."""

from __future__ import annotations

from datetime import UTC, datetime

from drivers.jobs.base import JobClass, JobState
from drivers.jobs.slurm import JobClassRules, SlurmJobs, gpu_count


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
