"""End to end with a real Slurm: the agent suspends a preemptible job on a price spike and
resumes it when the price falls, through the GPU fleet (the GPUs themselves are simulated); and
a job submitted with a deadline and a time limit waits for the cheap hours of the day-ahead
plan.

The one-node cluster of tests/slurm_server.py (munged, slurmctld, slurmd on loopback) runs a
preemptible job that checkpoints every 0.2 s and an SLA job, two GPUs each. The agent reads
prices from the real HTTP price server. Assertions are on Slurm's own job states and on the
job's processes (stopped: ``T``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.cli.demo_drivers import build_simulated_gpu_fleet
from agent.control.config import parse_config
from agent.runtime.loop import Agent, Components
from agent.runtime.wiring import build_price_source
from drivers.jobs.slurm import JobClassRules, SlurmJobs
from drivers.prices.csv_replay import DayAheadForecast, load_day_ahead_csv
from simulators.price_server import PriceServer
from tests.slurm_server import SlurmCluster
from tests.slurm_server import slurm_fixture as slurm_fixture
from tests.test_e2e_miners import until
from tests.test_jobs_slurm import CHECKPOINT_JOB, wait_job_pids, wait_procs, wait_state

pytestmark = pytest.mark.slurm


@pytest.fixture
def cluster(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    slurm.cancel_all()
    yield slurm
    slurm.cancel_all()


def config_dict(price_url: str) -> dict[str, Any]:
    return {
        "site": {"id": "slurm-e2e", "interconnect_limit_kw": 40},
        "control": {
            "interval_s": 0.25,
            "poll_interval_s": 0.3,
            "poll_jitter_s": 0.02,
            # A resume waits up to 2.5 s for slurmd to finish the suspend (drivers/jobs/slurm).
            "device_timeout_s": 8,
            "retries": 0,
            "hysteresis_usd_per_mwh": 2,
            "min_on_s": 0.5,
            "min_off_s": 1.5,
        },
        "gpu_nodes": [
            {"id": "gpu", "gpus": 4, "scheduler_node": "localhost", "host_overhead_w": 500}
        ],
        "ai": {
            "scheduler": "slurm",
            "class_from": "comment",
            "sla": {"usd_per_gpu_hour": 2.5, "penalty_usd": 500},
            "preemptible": {"usd_per_gpu_hour": 1.0},
        },
        "prices": {
            "realtime": {
                "type": "http_json",
                "url": f"{price_url}/price",
                "value_path": "data.0.price",
                "time_path": "data.0.time",
                "poll_interval_s": 0.2,
                "timeout_s": 1,
            },
            "max_age_s": 30,
        },
    }


async def test_price_spike_suspends_and_resumes_a_real_preemptible_slurm_job(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    preemptible = cluster.sbatch(
        "--comment=class=preemptible",
        "--gres=gpu:2",
        f"--wrap=exec {sys.executable} {CHECKPOINT_JOB} {tmp_path}/$SLURM_JOB_ID.ckpt 0.2",
    )
    sla = cluster.sbatch("--comment=class=sla", "--gres=gpu:2", "--wrap=sleep 300")
    await wait_state(cluster, preemptible, "RUNNING")
    await wait_state(cluster, sla, "RUNNING")
    ckpt = tmp_path / f"{preemptible}.ckpt"
    await until(ckpt.exists, 10, "the job's first checkpoint (its handlers are in place)")
    pids = await wait_job_pids(cluster, preemptible, CHECKPOINT_JOB.name)
    server = PriceServer([20.0], interval_s=3600)
    async with server:
        config = parse_config(config_dict(server.url))
        jobs = SlurmJobs(
            rules=JobClassRules(sources=("comment",)),
            env={"SLURM_CONF": str(cluster.conf)},
            checkpoint_path=str(tmp_path / "{job_id}.ckpt"),
            command_timeout_s=8,
        )
        fleet, simulation = build_simulated_gpu_fleet(config, jobs=jobs)
        nvml = simulation.nvml["gpu"]
        components = Components(fleets=[fleet], price_source=build_price_source(config))
        agent = Agent(config, components)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:

            def jobs_seen() -> bool:
                snap = agent.state.snapshot
                return snap is not None and len(snap.gpu_nodes[0].jobs) == 2

            await until(jobs_seen, 10, "both Slurm jobs in the snapshot")
            await asyncio.sleep(1.0)
            assert cluster.job_state(preemptible) == "RUNNING"  # cheap power: nothing to do
            assert agent.state.actions[("suspend_job", "ok")] == 0
            # A spike to 10,000 $/MWh beats the preemptible job even at the lowest cap.
            server.prices[0] = 10_000.0
            await wait_state(cluster, preemptible, "SUSPENDED", timeout_s=15)
            await wait_procs(pids, {"T"})
            await until(lambda: {g.power_limit_w for g in nvml.gpus} == {200.0}, 10, "capped")
            assert cluster.job_state(sla) == "RUNNING"  # no mandatory event: SLA untouched
            # Slurm can show SUSPENDED before the driver's own confirmation poll returns.
            await until(lambda: agent.state.actions[("suspend_job", "ok")] == 1, 15, "confirmed")
            # The price falls: the job is resumed (after the minimum off time) and runs on.
            server.prices[0] = 20.0
            await wait_state(cluster, preemptible, "RUNNING", timeout_s=20)
            await wait_procs(pids, {"S", "R"})
            await until(lambda: agent.state.actions[("resume_job", "ok")] == 1, 15, "audited")
            await until(lambda: {g.power_limit_w for g in nvml.gpus} == {700.0}, 10, "uncapped")
            assert cluster.job_state(sla) == "RUNNING"
            assert agent.state.actions[("suspend_job", "failed")] == 0
            assert agent.state.actions[("resume_job", "failed")] == 0
            node = agent.state.snapshot.gpu_nodes[0] if agent.state.snapshot else None
            assert node is not None
            assert node.fault is None
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)


async def test_a_deferrable_slurm_job_waits_for_the_cheap_hours_of_the_plan(
    cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A job submitted with a deadline and a time limit is deferrable: the live coordinator
    hands it to the horizon planner, whose plan puts its two hours of work into the cheap hours
    of the day-ahead forecast, so the agent suspends it now; an ordinary preemptible job beside
    it runs on at the same price."""
    deferrable = cluster.sbatch(
        "--comment=class=preemptible",
        "--gres=gpu:2",
        "--time=120",
        "--deadline=now+20hours",
        "-Jtrain",
        "--wrap=sleep 600",
    )
    ordinary = cluster.sbatch("--comment=class=preemptible", "--gres=gpu:2", "--wrap=sleep 600")
    await wait_state(cluster, deferrable, "RUNNING")
    await wait_state(cluster, ordinary, "RUNNING")
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    # The day-ahead forecast: 2,000 USD/MWh for the next six hours, then 10. Waiting saves the
    # job's 1.3 kW × 2 h about 5 USD, more than a pause costs (half a checkpoint interval of
    # its work, 0.50 USD). The real-time price, 200, is what the ordinary job sees: it earns
    # about 1,600 USD/MWh, so it runs on.
    prices = [2000.0] * 6 + [10.0] * 30
    rows = [
        f"{(hour + timedelta(hours=k)).strftime('%Y-%m-%dT%H:%M:%SZ')},{p}"
        for k, p in enumerate(prices)
    ]
    dam = tmp_path / "dam.csv"
    dam.write_text("interval_start_utc,HB_WEST\n" + "\n".join(rows) + "\n")
    server = PriceServer([200.0], interval_s=3600)
    async with server:
        config = parse_config(config_dict(server.url))
        jobs = SlurmJobs(
            rules=JobClassRules(sources=("comment",)),
            env={"SLURM_CONF": str(cluster.conf)},
            command_timeout_s=8,
        )
        fleet, _simulation = build_simulated_gpu_fleet(config, jobs=jobs)
        components = Components(
            fleets=[fleet],
            price_source=build_price_source(config),
            day_ahead=DayAheadForecast(load_day_ahead_csv(dam, "HB_WEST")),
        )
        agent = Agent(config, components)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:

            def planned() -> bool:
                plan = agent.coordinator.horizon
                return plan is not None and deferrable in plan.job_ids

            await until(planned, 30, "the deferrable job in the horizon plan")
            plan = agent.coordinator.horizon
            assert plan is not None
            k = plan.job_ids.index(deferrable)
            hours = [t for t, row in enumerate(plan.job_run) if row[k]]
            assert hours
            assert min(hours) >= 6  # the cheap hours only
            await wait_state(cluster, deferrable, "SUSPENDED", timeout_s=20)
            await until(lambda: agent.state.actions[("suspend_job", "ok")] >= 1, 15, "audited")
            assert cluster.job_state(ordinary) == "RUNNING"
            # The job's view carries its deadline and its work: 2 GPUs × under two hours.
            snap = agent.state.snapshot
            assert snap is not None
            view = next(j for n in snap.gpu_nodes for j in n.jobs if j.job_id == deferrable)
            assert view.deadline is not None
            assert 3.5 < view.remaining_gpu_h <= 4.0
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
