"""The GPU fleet built from config, against simulated GPUs (NVML stand-in) and the simulated
scheduler: views, caps read back, job actions confirmed, faults, config errors, metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.cli.demo_drivers import GpuSimulation, build_simulated_gpu_fleet
from agent.control.config import AgentConfig, ConfigError, parse_config
from agent.control.domain import Action, ActionKind, Snapshot
from agent.outputs.metrics import build_registry
from agent.runtime.fleet import Fleet
from agent.runtime.gpu_fleet import GpuFleet, build_gpu_fleet
from agent.runtime.state import AgentState
from drivers.errors import AuthFailed, CommandNotApplied, CommandRejected
from drivers.jobs.base import JobClass, JobState
from drivers.jobs.local import LocalJobs
from simulators.jobs import RUNNING, SUSPENDED
from tests.test_e2e_miners import until
from tests.test_jobs_local import gone, proc_state


class Mono:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def config(**overrides: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "site": {"id": "t", "interconnect_limit_kw": 100},
        "control": {"min_on_s": 60, "min_off_s": 120, "device_timeout_s": 2},
        "gpu_nodes": [{"id": "gpu", "gpus": 8, "count": 2, "host_overhead_w": 1200}],
        "ai": {
            "sla": {"usd_per_gpu_hour": 3.0, "penalty_usd": 900},
            "preemptible": {"usd_per_gpu_hour": 2.0, "checkpoint_interval_s": 600},
            "filler": {"usd_per_gpu_hour": 0.5},
            "sim_jobs": [
                {"job_class": "sla", "gpus": 2, "node": "gpu-001"},
                {"job_class": "preemptible", "gpus": 4, "count": 2},
                {"job_class": "filler", "gpus": 2, "count": 2},
            ],
        },
        "prices": {"realtime": {"type": "constant", "value": 30}},
    }
    data.update(overrides)
    return parse_config(data)


@pytest.fixture
def mono() -> Mono:
    return Mono()


@pytest.fixture
async def site(mono: Mono) -> AsyncIterator[GpuFleet]:
    fleet = build(config(), monotonic=mono)
    try:
        yield fleet
    finally:
        await fleet.aclose()


_SIMULATIONS: dict[int, GpuSimulation] = {}  # id(fleet) -> what its simulated drivers run


def build(cfg: AgentConfig, **kwargs: Any) -> GpuFleet:
    """The fleet with the simulated drivers registered (as the demo does)."""
    fleet, simulation = build_simulated_gpu_fleet(cfg, **kwargs)
    _SIMULATIONS[id(fleet)] = simulation
    return fleet


def sim(site: GpuFleet) -> GpuSimulation:
    return _SIMULATIONS[id(site)]


def job_of(site: GpuFleet, job_class: str, node: str = "gpu-001") -> str:
    scheduler = sim(site).scheduler
    assert scheduler is not None
    return next(j.job_id for j in scheduler.jobs() if j.job_class == job_class and j.node == node)


async def test_views_before_and_after_the_first_poll(site: GpuFleet) -> None:
    fleet: Fleet = site  # the protocol the runtime takes (mypy checks wiring too)
    assert fleet is site
    now = datetime.now(UTC)
    before = site.node_views(now)
    assert [v.device_id for v in before] == ["gpu-001", "gpu-002"]
    # Never read: unknown state (the policy counts it at nameplate), cap assumed at maximum.
    assert all(v.measured_power_w is None and v.reading_age_s == float("inf") for v in before)
    assert all(v.cap_w == 700 for v in before)
    assert all(v.temperature_c is None for v in before)
    await site.poll()
    views = {v.device_id: v for v in site.node_views(now)}
    first = views["gpu-001"]
    assert first.fault is None
    assert first.cap_w == 700.0
    assert (first.gpu_count, first.min_cap_w, first.max_cap_w, first.idle_w) == (8, 200, 700, 70)
    nvml = sim(site).nvml["gpu-001"]
    true_gpu_w = sum(g.power_w for g in nvml.gpus)
    assert first.measured_power_w == pytest.approx(true_gpu_w + 1200, abs=0.01)
    # SLA (2) + preemptible (4) + filler (2) fill the first node; the second gets the rest.
    by_class = {j.job_class: j for j in first.jobs}
    assert set(by_class) == {JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER}
    assert by_class[JobClass.SLA].usd_per_gpu_hour == 3.0
    assert by_class[JobClass.SLA].penalty_usd == 900
    assert by_class[JobClass.PREEMPTIBLE].usd_per_gpu_hour == 2.0
    assert by_class[JobClass.FILLER].usd_per_gpu_hour == 0.5
    assert all(j.state is JobState.RUNNING and j.node_id == "gpu-001" for j in first.jobs)
    # The agent did not start them: no dwell time protects their state.
    dated = datetime.now(UTC) - timedelta(seconds=120)
    assert all(j.commanded_since <= dated for j in first.jobs)
    second = views["gpu-002"]
    assert sorted(j.gpus for j in second.jobs) == [2, 4]
    assert set(site.readings()) == {"gpu-001", "gpu-002"}
    assert len(site.readings()["gpu-001"]) == 8
    # The thermal guard reads the node's hottest card from its view.
    hottest_c = max(r.temperature_c for r in site.readings()["gpu-001"])
    assert first.temperature_c == hottest_c


async def test_cap_is_set_on_every_gpu_and_read_back(site: GpuFleet) -> None:
    await site.poll()
    nvml = sim(site).nvml["gpu-001"]
    busy_before = sum(g.power_w for g in nvml.gpus)
    await site.apply(Action("gpu-001", ActionKind.SET_GPU_CAP, "350", "test", -2000))
    assert [g.power_limit_w for g in nvml.gpus] == [350.0] * 8
    assert sum(g.power_w for g in nvml.gpus) < busy_before
    assert [g.power_limit_w for g in sim(site).nvml["gpu-002"].gpus] == [700.0] * 8
    view = site.node_views(datetime.now(UTC))[0]
    assert view.cap_w == 350.0
    assert view.fault is None
    assert {r.power_limit_w for r in site.readings()["gpu-001"]} == {350.0}


@pytest.mark.parametrize(
    ("target", "error"),
    [("150", "outside the node's range 200–700 W"), ("nan", "outside"), ("lots", "must be watts")],
)
async def test_bad_cap_is_refused_and_changes_nothing(
    site: GpuFleet, target: str, error: str
) -> None:
    await site.poll()
    with pytest.raises(CommandRejected, match=error):
        await site.apply(Action("gpu-001", ActionKind.SET_GPU_CAP, target, "test", -1))
    assert [g.power_limit_w for g in sim(site).nvml["gpu-001"].gpus] == [700.0] * 8
    assert site.fault("gpu-001") is None
    with pytest.raises(CommandRejected, match="no such GPU node"):
        await site.apply(Action("gpu-009", ActionKind.SET_GPU_CAP, "300", "test", -1))


async def test_cap_refused_by_the_card_faults_the_node_until_retry(
    site: GpuFleet, mono: Mono
) -> None:
    await site.poll()
    sim(site).nvml["gpu-002"].privileged = False
    with pytest.raises(AuthFailed, match="failed on 8 of 8 GPU"):
        await site.apply(Action("gpu-002", ActionKind.SET_GPU_CAP, "300", "test", -1))
    fault = site.fault("gpu-002")
    assert fault is not None
    assert fault.startswith("set_gpu_cap failed: cap 300 W failed on 8 of 8 GPU")
    views = {v.device_id: v for v in site.node_views(datetime.now(UTC))}
    assert views["gpu-002"].fault == fault
    assert views["gpu-002"].cap_w == 700.0  # what the cards still run at
    mono.now_s += 301
    assert site.fault("gpu-002") is None


async def test_suspend_idles_the_jobs_gpus_and_is_confirmed(site: GpuFleet) -> None:
    await site.poll()
    job_id = job_of(site, "preemptible")
    scheduler = sim(site).scheduler
    assert scheduler is not None
    gpus = [sim(site).nvml["gpu-001"].gpus[i] for i in scheduler.job(job_id).gpu_indices]
    before = datetime.now(UTC)
    await site.apply(
        Action("gpu-001", ActionKind.SUSPEND_JOB, "suspended", "test", -2500, job_id=job_id)
    )
    assert scheduler.job(job_id).state == SUSPENDED
    assert [g.utilization_pct for g in gpus] == [0.0] * 4
    assert [g.power_w for g in gpus] == [70.0] * 4
    view = site.node_views(datetime.now(UTC))[0]
    job = next(j for j in view.jobs if j.job_id == job_id)
    assert job.state is JobState.SUSPENDED
    assert job.commanded_since >= before  # the agent's own change starts its dwell time
    await site.apply(
        Action("gpu-001", ActionKind.RESUME_JOB, "running", "test", 2500, job_id=job_id)
    )
    assert scheduler.job(job_id).state == RUNNING
    assert [g.utilization_pct for g in gpus] == [95.0] * 4


async def test_job_action_on_the_wrong_node_or_without_id_is_refused(site: GpuFleet) -> None:
    await site.poll()
    job_id = job_of(site, "sla")
    with pytest.raises(CommandRejected, match=f"job {job_id} is not on this node"):
        await site.apply(
            Action("gpu-002", ActionKind.SUSPEND_JOB, "suspended", "t", -1, job_id=job_id)
        )
    with pytest.raises(CommandRejected, match="needs a job id"):
        await site.apply(Action("gpu-001", ActionKind.SUSPEND_JOB, "suspended", "t", -1))
    scheduler = sim(site).scheduler
    assert scheduler is not None
    assert scheduler.job(job_id).state == RUNNING
    assert site.fault("gpu-002") is None


async def test_job_that_ignores_suspend_is_not_applied_and_faults_the_node(
    site: GpuFleet,
) -> None:
    await site.poll()
    job_id = job_of(site, "filler")
    scheduler = sim(site).scheduler
    assert scheduler is not None
    scheduler.ignore_commands(job_id)
    with pytest.raises(CommandNotApplied, match="the scheduler shows it running"):
        await site.apply(
            Action("gpu-001", ActionKind.SUSPEND_JOB, "suspended", "t", -1, job_id=job_id)
        )
    assert scheduler.job(job_id).state == RUNNING
    assert (site.fault("gpu-001") or "").startswith("suspend_job failed")


async def test_gpu_off_the_bus_faults_its_node_and_counts_at_the_maximum_cap(
    site: GpuFleet, mono: Mono
) -> None:
    await site.poll()
    nvml = sim(site).nvml["gpu-002"]
    nvml.gpus[3].fall_off_bus()
    await site.poll()
    view = {v.device_id: v for v in site.node_views(datetime.now(UTC))}["gpu-002"]
    assert view.fault is not None
    assert view.fault.startswith("GPU 3 lost: GPU has fallen off the bus")
    others_w = sum(g.power_w for i, g in enumerate(nvml.gpus) if i != 3)
    assert view.measured_power_w == pytest.approx(others_w + 700 + 1200, abs=0.01)
    assert [r.index for r in site.readings()["gpu-002"]] == [0, 1, 2, 4, 5, 6, 7]
    # The fault shows on /metrics, and the 7 GPUs still read keep their series.
    state = AgentState(site_id="t", started_at=datetime.now(UTC))
    state.snapshot = Snapshot(
        at=datetime.now(UTC),
        price=None,
        hashprice_usd_per_ph_day=55,
        gpu_nodes=site.node_views(datetime.now(UTC)),
    )
    state.gpu_readings = site.readings()
    registry = build_registry(state, config())
    assert registry.get_sample_value("site_agent_device_faulted", {"device": "gpu-002"}) == 1
    assert registry.get_sample_value("site_agent_devices_faulted", {"kind": "gpu_node"}) == 1
    lost_uuid = nvml.gpus[3].uuid
    labels = {
        "node": "gpu-002",
        "gpu": "3",
        "UUID": lost_uuid,
        "modelName": nvml.gpus[3].model.name,
    }
    assert registry.get_sample_value("site_agent_gpu_power_watts", labels) is None


async def test_cap_changed_outside_the_agent_is_adopted(site: GpuFleet) -> None:
    await site.poll()
    nvml = sim(site).nvml["gpu-001"]
    nvml.nvmlInit()
    for index in range(8):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        nvml.nvmlDeviceSetPowerManagementLimit(handle, 450_000)
    nvml.nvmlShutdown()
    await site.poll()
    assert site.node_views(datetime.now(UTC))[0].cap_w == 450.0


async def test_scheduler_that_stops_answering_faults_every_node(site: GpuFleet) -> None:
    await site.poll()
    scheduler = sim(site).scheduler
    assert scheduler is not None
    scheduler.go_down()
    for _ in range(3):
        await site.poll()  # the GPUs still answer: the poll itself does not fail
    views = site.node_views(datetime.now(UTC))
    assert all((v.fault or "").startswith("job scheduler unreachable") for v in views)
    assert all(len(v.jobs) == 3 for v in views[:1])  # last good job list kept
    scheduler.come_back()
    await site.poll()
    assert all(v.fault is None for v in site.node_views(datetime.now(UTC)))


async def test_per_gpu_and_per_job_class_metrics(site: GpuFleet) -> None:
    await site.poll()
    await site.apply(
        Action(
            "gpu-001",
            ActionKind.SUSPEND_JOB,
            "suspended",
            "t",
            -1,
            job_id=job_of(site, "preemptible"),
        )
    )
    await site.apply(Action("gpu-002", ActionKind.SET_GPU_CAP, "350", "t", -1))
    await site.poll()
    now = datetime.now(UTC)
    state = AgentState(site_id="t", started_at=now)
    state.snapshot = Snapshot(
        at=now, price=None, hashprice_usd_per_ph_day=55, gpu_nodes=site.node_views(now)
    )
    state.gpu_readings = site.readings()
    registry = build_registry(state, config())
    value = registry.get_sample_value
    gpu = sim(site).nvml["gpu-002"].gpus[5]
    labels = {"node": "gpu-002", "gpu": "5", "UUID": gpu.uuid, "modelName": gpu.model.name}
    assert value("site_agent_gpu_power_limit_watts", labels) == 350.0
    assert value("site_agent_gpu_power_watts", labels) == pytest.approx(gpu.power_w, abs=0.01)
    assert value("site_agent_gpu_utilization_ratio", labels) == 0.95  # the filler job
    assert value("site_agent_gpu_temperature_celsius", labels) is not None
    assert value("site_agent_gpu_node_power_cap_watts", {"node": "gpu-002"}) == 350.0
    jobs = {"job_class": "preemptible", "state": "suspended"}
    assert value("site_agent_jobs", jobs) == 1
    assert value("site_agent_jobs", {"job_class": "preemptible", "state": "running"}) == 1
    assert value("site_agent_jobs", {"job_class": "sla", "state": "running"}) == 1
    assert value("site_agent_jobs", {"job_class": "filler", "state": "running"}) == 2
    # Revenue: SLA 2 GPU x 3 $ + filler 2 x 0.5 $ at 700 W; on gpu-002 preemptible 4 x 2 $ and
    # filler 2 x 0.5 $ at 350 W (three quarters of the work).
    expected = (2 * 3.0 + 2 * 0.5) + 0.75 * (4 * 2.0 + 2 * 0.5)
    assert value("site_agent_ai_revenue_usd_per_hour") == pytest.approx(expected)
    ai_w = value("site_agent_workload_power_watts", {"workload": "ai"})
    assert ai_w == pytest.approx(sim(site).gpu_power_w() + 2 * 1200, abs=0.1)


@pytest.mark.parametrize(
    ("nodes", "ai", "problem"),
    [
        (
            [{"id": "pod", "gpus": 8, "driver": "mqtt-node"}],
            {},
            "gpu_nodes.0.driver: mqtt-node (a node agent on a remote GPU host, over MQTT) "
            "is not a gpu_nodes line: run site-agent node on that host and list it under "
            "remote_nodes.nodes",
        ),
        ([{"id": "pod", "gpus": 8, "model": "V100"}], {}, "gpu_nodes.0.model: unknown GPU"),
        (
            [{"id": "pod", "gpus": 8, "min_cap_w": 100}],
            {},
            "gpu_nodes.0: cap range 100–700 W is outside what a NVIDIA H100 80GB HBM3 allows",
        ),
        (
            [{"id": "pod", "gpus": 4}],
            {"sim_jobs": [{"job_class": "sla", "gpus": 1, "node": "nope"}]},
            "ai.sim_jobs.0.node: unknown GPU node 'nope'",
        ),
        (
            [{"id": "pod", "gpus": 4}],
            {"sim_jobs": [{"job_class": "sla", "gpus": 8}]},
            "ai.sim_jobs.0.gpus: 8 GPUs, but no node has more than 4",
        ),
        (
            [{"id": "pod", "gpus": 4, "count": 2}],
            {"scheduler": "local"},
            "ai.scheduler: local runs jobs on this host, so it needs exactly one GPU node",
        ),
        (
            [{"id": "a", "gpus": 4, "driver": "nvml"}, {"id": "b", "gpus": 4, "driver": "nvml"}],
            {"scheduler": "slurm"},
            "gpu_nodes.1.driver: nvml reads this host's GPUs, so only one GPU node",
        ),
        (
            [{"id": "a", "gpus": 4, "driver": "nvml"}],
            {"scheduler": "sim"},
            "ai.scheduler: sim runs simulated jobs on simulated GPUs, but a use real NVML",
        ),
    ],
)
def test_config_the_fleet_cannot_build_is_a_clear_error(
    nodes: list[dict[str, Any]], ai: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build(config(gpu_nodes=nodes, ai=ai), source="site.yaml")
    assert any(p.startswith(f"site.yaml: {problem}") for p in err.value.problems), (
        err.value.problems
    )


@pytest.mark.parametrize(
    ("nodes", "ai", "problem"),
    [
        (
            [{"id": "pod", "gpus": 8, "driver": "nvml-sim"}],
            {"scheduler": "slurm"},
            "gpu_nodes.0.driver: nvml-sim is simulated: only site-agent demo, site-agent sim and "
            "the tests have it; use nvml on the GPU host (available drivers: nvml)",
        ),
        (
            [{"id": "pod", "gpus": 8, "driver": "nvml"}],
            {"scheduler": "sim"},
            "ai.scheduler: sim is the simulated scheduler: only site-agent demo",
        ),
        (  # NVML reports the card itself: a model in the config would be read by nobody
            [{"id": "pod", "gpus": 8, "driver": "nvml", "model": "H100-SXM"}],
            {"scheduler": "slurm"},
            "gpu_nodes.0.model: driver nvml does not read this key; remove it",
        ),
    ],
)
def test_the_live_registry_has_no_simulated_devices(
    nodes: list[dict[str, Any]], ai: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build_gpu_fleet(config(gpu_nodes=nodes, ai=ai), source="site.yaml")
    assert [p for p in err.value.problems if p.startswith(f"site.yaml: {problem}")], (
        err.value.problems
    )


async def test_default_job_mix_and_scheduler_node_names() -> None:
    cfg = config(gpu_nodes=[{"id": "gpu", "gpus": 8, "count": 2, "scheduler_node": "hgx"}], ai={})
    site = build(cfg)
    try:
        scheduler = sim(site).scheduler
        assert scheduler is not None
        assert scheduler.nodes == ("hgx-001", "hgx-002")
        mix = sorted((j.node, j.job_class, j.gpus) for j in scheduler.jobs())
        assert mix == [
            ("hgx-001", "filler", 2),
            ("hgx-001", "preemptible", 4),
            ("hgx-001", "sla", 2),
            ("hgx-002", "filler", 2),
            ("hgx-002", "preemptible", 4),
            ("hgx-002", "sla", 2),
        ]
        await site.poll()
        views = site.node_views(datetime.now(UTC))
        assert [len(v.jobs) for v in views] == [3, 3]
    finally:
        await site.aclose()


async def test_nodes_stay_unknown_until_the_scheduler_has_listed_the_jobs(site: GpuFleet) -> None:
    scheduler = sim(site).scheduler
    assert scheduler is not None
    scheduler.go_down()
    await site.poll()  # the GPUs answer, the scheduler does not
    views = site.node_views(datetime.now(UTC))
    # Busy GPUs without their jobs would look idle to the policy: unknown state instead, which
    # the policy counts at nameplate.
    assert all(v.measured_power_w is None for v in views)
    assert all(v.reading_age_s is not None and v.reading_age_s < 1 for v in views)
    scheduler.come_back()
    await site.poll()
    assert all(v.measured_power_w is not None for v in site.node_views(datetime.now(UTC)))


async def test_local_scheduler_suspends_a_real_process_through_the_fleet() -> None:
    cfg = config(
        gpu_nodes=[{"id": "box", "gpus": 4, "scheduler_node": "box"}], ai={"scheduler": "local"}
    )
    site = build(cfg)
    jobs = site.jobs
    assert isinstance(jobs, LocalJobs)
    try:
        await site.poll()  # opens the drivers (LocalJobs is a context manager)
        await jobs.start("train-1", ["sleep", "30"], job_class=JobClass.PREEMPTIBLE, gpus=2)
        await site.poll()
        (view,) = site.node_views(datetime.now(UTC))
        assert [(j.job_id, j.gpus, j.state) for j in view.jobs] == [
            ("train-1", 2, JobState.RUNNING)
        ]
        pid = jobs.pid("train-1")
        assert pid is not None
        await site.apply(
            Action("box", ActionKind.SUSPEND_JOB, "suspended", "t", -1, job_id="train-1")
        )
        await until(lambda: proc_state(pid) == "T", 15, "process stopped")
        await site.apply(Action("box", ActionKind.RESUME_JOB, "running", "t", 1, job_id="train-1"))
        await until(lambda: proc_state(pid) in ("S", "R"), 15, "process continued")
    finally:
        await site.aclose()  # stops the job
    await until(lambda: gone(pid), 15, "job stopped with the fleet")


async def test_cap_a_card_refuses_faults_the_node_but_a_job_that_ended_does_not(
    site: GpuFleet,
) -> None:
    await site.poll()
    # One card's VBIOS allows no less than 300 W (the config says 200): NVML refuses 250 W.
    gpu = sim(site).nvml["gpu-001"].gpus[2]
    gpu.model = dataclasses.replace(gpu.model, min_limit_w=300.0)
    with pytest.raises(CommandRejected, match="outside the allowed range 300–700 W"):
        await site.apply(Action("gpu-001", ActionKind.SET_GPU_CAP, "250", "t", -1))
    assert (site.fault("gpu-001") or "").startswith("set_gpu_cap failed: cap 250 W failed on 1")
    assert site.node_views(datetime.now(UTC))[0].cap_w == 700.0  # the highest limit read back
    # A job that ends between the poll and the command is refused by the scheduler: the next
    # poll shows it, and the node is not held faulted for it.
    scheduler = sim(site).scheduler
    assert scheduler is not None
    job_id = job_of(site, "filler", node="gpu-002")
    scheduler.cancel(job_id)
    with pytest.raises(CommandRejected, match="CANCELLED"):
        await site.apply(
            Action("gpu-002", ActionKind.SUSPEND_JOB, "suspended", "t", -1, job_id=job_id)
        )
    assert site.fault("gpu-002") is None
