"""A real Prometheus scrapes the agent's /metrics; every Grafana dashboard query returns data.

The agent side is the real collector and HTTP server on the test's event loop, fed a
hand-built AgentState; Prometheus (Debian package ``prometheus``) scrapes it every second and
evaluates configs/alerts.yml.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.outputs.metrics import MetricsServer, build_registry, start_metrics_server
from agent.runtime.state import AgentState
from tests.sample_state import sample_config, sample_state
from tests.servers import Prometheus
from tests.test_prometheus_dashboard import PENDING_METRICS, queried_metrics

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# What Grafana would put in place of its variables for "All" over the last minutes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "1m",
    "${instance}": ".*",
    "$instance": ".*",
}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every target of every panel, variables substituted."""
    dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {expr}"
            out.append((f"{panel['title']}/{target['refId']}", expr))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"])
            assert m, var["definition"]
            out.append((f"variable {var['name']}", m.group(1)))
    return out


@pytest.fixture
async def agent_endpoint() -> AsyncIterator[tuple[AgentState, MetricsServer]]:
    state = sample_state()
    server = await start_metrics_server(build_registry(state, sample_config()), "127.0.0.1", 0)
    try:
        yield state, server
    finally:
        await server.close()


async def query(prom: Prometheus, promql: str) -> list[dict[str, Any]]:
    # Blocking HTTP in a thread: the scraped endpoint lives on this event loop.
    return await asyncio.to_thread(prom.query, promql)


async def wait_for_data(prom: Prometheus, promql: str, timeout_s: float = 30) -> list[Any]:
    """Poll until ``promql`` returns a series (Prometheus has no push to wait on)."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = await query(prom, promql)
            if result:
                return result
            await asyncio.sleep(0.3)


async def test_real_prometheus_scrapes_the_agent_and_every_dashboard_query_has_data(
    tmp_path: Path, agent_endpoint: tuple[AgentState, MetricsServer]
) -> None:
    state, server = agent_endpoint
    target = f"127.0.0.1:{server.port}"
    prom = Prometheus(
        tmp_path, [target], scrape_interval_s=0.5, rule_files=(CONFIGS / "alerts.yml",)
    )
    await asyncio.to_thread(prom.start)
    try:
        # Enough scrapes for rate()/increase() windows to hold two samples or more.
        await wait_for_data(prom, 'count_over_time(up{job="site-agent"}[1m]) >= 3', 30)

        up = await query(prom, 'up{job="site-agent"}')
        assert up[0]["metric"]["instance"] == target
        assert up[0]["value"][1] == "1"
        power = await query(prom, "site_agent_site_power_watts")
        assert float(power[0]["value"][1]) == 18_898.0

        # A change in AgentState shows in the next scrape: the collector reads it live.
        state.actions[("sleep", "failed")] += 4
        await wait_for_data(prom, 'site_agent_actions_total{result="failed"} == 4')

        empty = []
        pending = []
        queries = dashboard_queries()
        assert len(queries) >= 30
        for name, promql in queries:
            # A query Prometheus cannot parse fails here, pending or not.
            result = await query(prom, promql)
            if queried_metrics(promql) & set(PENDING_METRICS):
                pending.append(name)  # no data until the agent exports the metric
            elif not result:
                empty.append(f"{name}: {promql}")
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
        print(f"{len(pending)} dashboard queries pending (meter, cooling, derates):", pending)

        # The alert rules evaluate against the real series: 1 of 4 miners faulted is above
        # the 5% share, so that alert is pending (its `for` has not elapsed); the site is
        # far below its interconnect limit, so that one is not.
        faults = await wait_for_data(prom, 'ALERTS{alertname="SiteAgentDeviceFaults"}')
        assert faults[0]["metric"]["kind"] == "miner"
        assert faults[0]["metric"]["alertstate"] == "pending"
        assert not await query(prom, 'ALERTS{alertname="SiteAgentAboveInterconnectLimit"}')
    finally:
        await asyncio.to_thread(prom.stop)
