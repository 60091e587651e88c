"""A real Prometheus scrapes the running agent (real loop, LuxOS simulators, price server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.control.config import AgentConfig
from agent.outputs.metrics import MetricsService
from agent.runtime.inbox import CommandInbox
from agent.runtime.state import AgentState
from tests.obs_site import S21, Outputs, running_site, until
from tests.servers import Prometheus, require_binary

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


async def test_prometheus_scrapes_the_running_agent(tmp_path: Path) -> None:
    require_binary("prometheus", "prometheus")  # skip before starting the site, not after
    services: list[MetricsService] = []

    def outputs(config: AgentConfig, state: AgentState, _inbox: CommandInbox) -> Outputs:
        services.append(MetricsService(state, config))
        return Outputs(services=services)

    async with running_site(100.0, outputs) as (agent, fleet, _server):
        metrics = services[0]
        async with asyncio.timeout(5):
            await metrics.started.wait()
        # 100 $/MWh: above the S19j Pro's breakeven (77.7), below the S21's (131).
        await until(lambda: agent.state.actions[("sleep", "ok")] == 2, 15, "S19s asleep")

        prom = Prometheus(tmp_path, [f"127.0.0.1:{metrics.port}"], scrape_interval_s=0.5)
        await asyncio.to_thread(prom.start)
        try:

            async def value(promql: str) -> float:
                async with asyncio.timeout(15):
                    while True:
                        result = await asyncio.to_thread(prom.query, promql)
                        if result:
                            return float(result[0]["value"][1])
                        await asyncio.sleep(0.3)

            assert await value('up{job="site-agent"}') == 1.0
            assert await value('site_agent_miners{state="sleeping"} == 2') == 2.0
            assert await value('site_agent_miners{state="running"}') == 2.0
            assert await value('site_agent_price_usd_per_mwh{market="realtime"}') == 100.0
            assert await value('site_agent_actions_total{kind="sleep",result="ok"}') == 2.0
            s21 = await value('site_agent_miner_power_watts{miner="s21-001"}')
            assert 3000 < s21 < 4000
            # What Prometheus holds is what the (simulated) hardware draws.
            assert s21 == pytest.approx(float(fleet.truth(S21[0])["power_w"]), rel=0.05)
            s19 = await value('site_agent_miner_power_watts{miner="s19-001"}')
            assert s19 < 100  # asleep: standby power
            site_w = await value("site_agent_site_power_watts")
            true_w = sum(float(fleet.truth(a)["power_w"]) for a in fleet.addresses)
            assert site_w == pytest.approx(true_w, rel=0.05)
            assert await value("site_agent_interconnect_limit_watts") == 40_000.0
            assert await value('site_agent_source_age_seconds{source=~"price.*"}') < 30
            # The control loop advances between scrapes.
            first = await value("site_agent_control_cycles_total")
            deadline = time.monotonic() + 30
            while await value("site_agent_control_cycles_total") <= first:
                assert time.monotonic() < deadline, "the cycle counter never advanced"
                await asyncio.sleep(0.25)
        finally:
            await asyncio.to_thread(prom.stop)
