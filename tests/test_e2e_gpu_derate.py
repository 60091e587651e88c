"""GPU thermal derate end to end: the real agent, the NVML simulator and its job scheduler.

One 8-GPU H100 node (SLA, preemptible and filler jobs) and the LuxOS miners of
``tests/test_e2e_gpus.py``, with ``thermal.gpu`` at 80 °C (resume below 75 °C). A card whose air
turns hot (the simulator's temperature follows ambient + power with a short lag here) pushes
the node above its limit: the agent steps the node's cap down one step (700 → 600 W), audited
and explained in the plan, and counted in ``/metrics``. In the hysteresis band it is held there;
once the card is cool it is stepped back up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from agent.cli.demo_drivers import SimulatedGpus
from agent.control.config import parse_config
from agent.control.domain import Plan, Snapshot
from agent.journal.store import Store
from agent.runtime.loop import CycleHook
from agent.runtime.state import AgentState
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.price_server import PriceServer
from tests.site_agent import build_agent, metrics_port
from tests.test_e2e_gpus import NODE, S19, S21, Site, everything_running, gpu_site_dict
from tests.test_e2e_miners import until

MAX_C, RESUME_C, STEP_S = 80.0, 75.0, 3.0


@contextlib.asynccontextmanager
async def hot_site(tmp_path: Path, plans: list[Plan]) -> AsyncIterator[tuple[Site, Store]]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    miners = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    async with (
        miners,
        PriceServer([20.0], interval_s=3600) as server,
        Store.open(tmp_path / "journal.db") as store,
    ):
        data = gpu_site_dict(server.url)
        data["thermal"] = {"gpu": {"max_c": MAX_C, "resume_c": RESUME_C, "step_s": STEP_S}}
        config = parse_config(data)
        sims = SimulatedGpus()

        def observers(_state: AgentState) -> list[CycleHook]:
            def keep(_snap: Snapshot, plan: Plan, _results: object) -> None:
                plans.append(plan)

            return [keep]

        agent = build_agent(
            config, drivers=sims.registry(), store=store, metrics=True, observers=observers
        )
        simulation = sims.simulation
        assert simulation.scheduler is not None
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            yield Site(agent, miners, server, simulation, simulation.scheduler), store
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)


async def scrape(site: Site) -> str:
    async with httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{metrics_port(site.agent)}/metrics"
        return (await client.get(url)).text


async def test_a_hot_gpu_steps_its_node_down_one_cap_step_and_back_up_with_hysteresis(
    tmp_path: Path,
) -> None:
    plans: list[Plan] = []
    async with hot_site(tmp_path, plans) as (site, store):
        await everything_running(site)
        gpus = site.gpus.nvml[NODE].gpus
        hot = gpus[0]
        air = {"c": 30.0}
        hot.thermal_tau_s = 0.3
        hot.ambient = lambda: air["c"]
        await asyncio.sleep(0.5)
        assert hot.temperature_c < MAX_C  # 30 °C air at 700 W: about 75 °C
        assert site.agent.state.thermal_derated == {}, (
            [g.temperature_c for g in gpus],
            site.agent.coordinator.thermal.ceilings,
        )

        # A hot afternoon on that card: it runs above 80 °C, the node is stepped down one step.
        air["c"] = 60.0
        # (The loop publishes the derate to the state when the cycle that applies it ends.)
        await until(
            lambda: (
                site.caps_w() == {600.0} and site.agent.state.thermal_derated == {NODE: "gpu_node"}
            ),
            10,
            "node capped one step down, derate published",
        )
        derated_at = asyncio.get_running_loop().time()
        assert site.agent.state.thermal_derates["gpu_node"] == 1
        rows = [r for r in await store.audit_rows() if r.device_id == NODE]
        cap_rows = [r for r in rows if r.action == "set_gpu_cap:600"]
        assert cap_rows, [(r.action, r.reason) for r in rows]
        assert "thermal derate: hottest GPU" in cap_rows[-1].reason
        assert f"> {MAX_C:g} °C" in cap_rows[-1].reason
        stepped = [p for p in plans if any(a.device_id == NODE for a in p.actions)]
        assert any("thermal derate" in a.reason for p in stepped for a in p.actions)
        assert any("thermal derate: 0 miner(s), 1 GPU node(s)" in p.summary for p in plans)
        text = await scrape(site)
        assert 'site_agent_thermal_derate_actions_total{kind="gpu_node"} 1.0' in text
        assert 'site_agent_thermal_derated_devices{kind="gpu_node"} 1.0' in text

        # In the hysteresis band (between 75 and 80 °C at the 600 W cap): held, well past
        # step_s, neither lower nor back up.
        air["c"] = 77.5 - 45.0 * hot.power_w / 700.0
        await until(lambda: RESUME_C < hot.temperature_c < MAX_C, 5, "card in the band")
        while asyncio.get_running_loop().time() < derated_at + 2.5 * STEP_S:
            assert site.caps_w() == {600.0}
            assert RESUME_C < hot.temperature_c < MAX_C
            await asyncio.sleep(0.1)
        assert site.agent.state.thermal_derates["gpu_node"] == 1

        # Cool again: below 75 °C it is stepped back up to the top, and the derate lifted.
        air["c"] = 30.0
        await until(
            lambda: site.caps_w() == {700.0} and site.agent.state.thermal_derated == {},
            2 * STEP_S + 10,
            "cap restored, derate lifted",
        )
        assert site.agent.state.thermal_derates["gpu_node"] == 1  # one step-down in all
        text = await scrape(site)
        assert 'site_agent_thermal_derated_devices{kind="gpu_node"} 0.0' in text
        assert any(r.action == "set_gpu_cap:700" for r in await store.audit_rows())
