"""End to end with GPUs: LuxOS miners, simulated GPU nodes and the simulated job scheduler,
under the real runtime (coordinator, policy, actuator, GPU fleet) fed by the HTTP price server.

The site: three S19j Pro and three S21 (LuxOS simulators that pyasic talks to over TCP) and one
8-GPU H100 node on the NVML stand-in running an SLA job (2 GPUs), a preemptible job (4) and a
filler job (2). Assertions are on the simulators' truth: the miners' state, the scheduler's job
states, the simulated GPUs' limits, utilization and power.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from agent.cli.demo_drivers import GpuSimulation, SimulatedGpus
from agent.control.config import parse_config
from agent.control.domain import ActiveEvent
from agent.runtime.loop import Agent
from drivers.grid.base import GridEvent, ProgramKind
from simulators.jobs import RUNNING, SUSPENDED, SimScheduler
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.price_server import PriceServer
from tests.loopback import ip
from tests.site_agent import build_agent, metrics_port
from tests.test_e2e_miners import asleep, site_dict, true_site_w, truth, until

HOST_W = 500.0
NODE = "gpu"
# In this process's loopback /16 (see tests/test_e2e_miners.py), apart from that module's miners.
S19 = [ip(2, i) for i in (1, 2, 3)]
S21 = [ip(3, i) for i in (1, 2, 3)]


@dataclass
class Site:
    agent: Agent
    miners: LuxosFleet
    prices: PriceServer
    gpus: GpuSimulation
    scheduler: SimScheduler

    def job(self, job_class: str) -> str:
        return next(j.job_id for j in self.scheduler.jobs() if j.job_class == job_class)

    def state(self, job_class: str) -> str:
        return self.scheduler.job(self.job(job_class)).state

    def caps_w(self) -> set[float]:
        return {g.power_limit_w for g in self.gpus.nvml[NODE].gpus}

    def true_w(self) -> float:
        """What a meter at the interconnect would read (host overhead is not simulated)."""
        return true_site_w(self.miners) + self.gpus.gpu_power_w() + HOST_W

    def gpu_actions(self) -> int:
        kinds = ("set_gpu_cap", "suspend_job", "resume_job", "requeue_job")
        return sum(n for (kind, _), n in self.agent.state.actions.items() if kind in kinds)


def gpu_site_dict(price_url: str, *, preemptible_usd: float = 1.0) -> dict[str, Any]:
    data = site_dict(price_url)
    data["miners"] = [
        {"id": "s19", "address": S19[0], "model": "S19jPro", "count": 3},
        {"id": "s21", "address": S21[0], "model": "S21", "count": 3},
    ]
    data["gpu_nodes"] = [{"id": NODE, "gpus": 8, "host_overhead_w": HOST_W}]
    data["ai"] = {
        "sla": {"usd_per_gpu_hour": 2.5, "penalty_usd": 500},
        # A spot-priced preemptible contract: at the card's 200 W minimum it earns
        # 1.0 x 0.49 $/h for 130 W above idle, ~3,770 $/MWh; above that it is suspended.
        # Frequent checkpoints keep the work a suspension loses small: with dwell times of
        # seconds, minutes of work without a checkpoint would be worth keeping at any price.
        "preemptible": {"usd_per_gpu_hour": preemptible_usd, "checkpoint_interval_s": 0.2},
        "filler": {"usd_per_gpu_hour": 0.6, "checkpoint_interval_s": 0.2},
        "scheduler": "sim",
        "sim_jobs": [
            {"job_class": "sla", "gpus": 2},
            {"job_class": "preemptible", "gpus": 4},
            {"job_class": "filler", "gpus": 2},
        ],
    }
    return data


@contextlib.asynccontextmanager
async def running_site(price: float) -> AsyncIterator[Site]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    miners = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    server = PriceServer([price], interval_s=3600)
    async with miners, server:
        config = parse_config(gpu_site_dict(server.url))
        sims = SimulatedGpus()
        agent = build_agent(config, drivers=sims.registry(), metrics=True)
        simulation = sims.simulation
        assert simulation.scheduler is not None
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            yield Site(agent, miners, server, simulation, simulation.scheduler)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)


def emergency(site: Site, event_id: str, max_site_kw: float) -> None:
    now = datetime.now(UTC)
    event = GridEvent(
        event_id=event_id,
        source="test",
        program="ercot-eea",
        kind=ProgramKind.EMERGENCY,
        start=now - timedelta(seconds=1),
        end=now + timedelta(hours=1),
        max_site_kw=max_site_kw,
    )
    site.agent.coordinator.events.clear()
    site.agent.coordinator.events[event_id] = ActiveEvent(event, baseline_w=site.true_w())
    site.agent.wake_control.set()


async def everything_running(site: Site) -> None:
    await until(
        lambda: all(truth(site.miners, a)["profile"] == "+1" for a in S19 + S21),
        10,
        "all miners at +1",
    )
    assert {site.state(c) for c in ("sla", "preemptible", "filler")} == {RUNNING}
    assert site.caps_w() == {700.0}


async def test_price_tiers_shed_miners_first_then_cap_and_suspend_jobs_sla_kept() -> None:
    async with running_site(20.0) as site:
        await everything_running(site)
        # 200 $/MWh: above every miner's breakeven (S21 at -2: ~139), below every AI step
        # (the node's top cap step is worth ~360 $/MWh): miners sleep, GPUs are untouched.
        site.prices.prices[0] = 200.0
        await until(lambda: all(asleep(site.miners, a) for a in S19 + S21), 10, "miners asleep")
        await asyncio.sleep(1.0)  # a few more cycles
        assert {site.state(c) for c in ("sla", "preemptible", "filler")} == {RUNNING}
        assert site.caps_w() == {700.0}
        assert site.gpu_actions() == 0
        busy_w = site.gpus.gpu_power_w()
        # A spike to 10,000 $/MWh, above the preemptible and filler values even at the lowest
        # cap: both are suspended, the SLA job keeps running, the GPUs are capped.
        site.prices.prices[0] = 10_000.0
        await until(
            lambda: site.state("preemptible") == SUSPENDED and site.state("filler") == SUSPENDED,
            10,
            "preemptible and filler suspended",
        )
        await until(lambda: site.caps_w() == {200.0}, 10, "GPUs capped at 200 W")
        assert site.state("sla") == RUNNING
        nvml = site.gpus.nvml[NODE]
        for job_class in ("preemptible", "filler"):
            for i in site.scheduler.job(site.job(job_class)).gpu_indices:
                assert nvml.gpus[i].utilization_pct == 0
                assert nvml.gpus[i].power_w == 70.0  # idle: the process is stopped
        sla_gpus = site.scheduler.job(site.job("sla")).gpu_indices
        assert all(nvml.gpus[i].utilization_pct == 95 for i in sla_gpus)
        assert site.gpus.gpu_power_w() < busy_w / 2
        # The simulators change as the commands land; the agent counts each once confirmed.
        counts = site.agent.state.actions
        await until(
            lambda: counts[("suspend_job", "ok")] == 2 and counts[("set_gpu_cap", "ok")] >= 1,
            5,
            "suspends and caps confirmed",
        )
        assert site.agent.state.faults == {}
        # Cheap again: everything comes back (after the minimum off time) at full power.
        site.prices.prices[0] = 20.0
        await until(
            lambda: {site.state(c) for c in ("preemptible", "filler")} == {RUNNING},
            10,
            "jobs resumed",
        )
        await until(lambda: site.caps_w() == {700.0}, 10, "caps back at 700 W")
        await until(lambda: not any(asleep(site.miners, a) for a in S19 + S21), 10, "awake")


async def test_mandatory_event_sheds_miners_then_preemptible_jobs_and_sla_last() -> None:
    async with running_site(20.0) as site:
        await everything_running(site)
        # Floors: miners asleep ~0.19 kW, host 0.5 kW, eight idle GPUs 0.56 kW: ~1.25 kW.
        # The SLA job at the 200 W minimum cap adds 0.26 kW, the preemptible one 0.52 kW.
        # 1.9 kW fits the SLA job but not the preemptible one beside it.
        emergency(site, "eea-1", 1.9)
        await until(lambda: site.true_w() <= 1900, 10, "site under 1.9 kW")
        await until(lambda: site.state("preemptible") == SUSPENDED, 10, "preemptible suspended")
        assert all(asleep(site.miners, a) for a in S19 + S21)
        assert site.state("filler") == SUSPENDED
        assert site.state("sla") == RUNNING  # shed last: still running
        plan = site.agent.state.plan
        assert plan is not None
        assert plan.planned_power_w <= 1900
        await asyncio.sleep(0.8)
        assert site.state("sla") == RUNNING
        assert site.true_w() <= 1900
        # 1.4 kW is below the SLA job at its lowest cap: now it goes too.
        emergency(site, "eea-2", 1.4)
        await until(lambda: site.state("sla") == SUSPENDED, 10, "SLA job suspended")
        await until(lambda: site.true_w() <= 1400, 10, "site under 1.4 kW")
        nvml = site.gpus.nvml[NODE]
        assert all(g.utilization_pct == 0 for g in nvml.gpus)
        await until(lambda: site.agent.state.actions[("suspend_job", "ok")] == 3, 15, "confirmed")
        assert site.agent.state.faults == {}


async def test_gpu_off_the_bus_is_a_fault_on_metrics_and_limits_still_hold() -> None:
    async with running_site(20.0) as site:
        await everything_running(site)
        site.gpus.nvml[NODE].gpus[7].fall_off_bus()

        def node_fault() -> str | None:
            snap = site.agent.state.snapshot
            return None if snap is None else snap.gpu_nodes[0].fault

        await until(lambda: (node_fault() or "").startswith("GPU 7 lost"), 10, "node faulted")
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{metrics_port(site.agent)}/metrics"
            text = (await client.get(url)).text
        assert f'site_agent_device_faulted{{device="{NODE}"}} 1.0' in text
        assert 'site_agent_devices_faulted{kind="gpu_node"} 1.0' in text
        assert 'site_agent_gpu_power_watts{UUID="' in text  # the other seven still report
        # A grid event at 10 kW: the faulted node is left alone and counted at its worst case
        # (the lost card at its 700 W cap), so the miners give up what the limit needs.
        actions_before = site.gpu_actions()
        emergency(site, "eea-3", 10.0)
        await until(lambda: site.true_w() <= 10_000, 10, "site under 10 kW")
        await asyncio.sleep(1.0)
        assert site.true_w() <= 10_000
        assert site.gpu_actions() == actions_before  # nothing commanded to the faulted node
        assert {site.state(c) for c in ("sla", "preemptible", "filler")} == {RUNNING}
        assert any(not asleep(site.miners, a) for a in S21)  # only as much shed as needed
