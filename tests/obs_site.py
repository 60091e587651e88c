"""A small real site for output tests: LuxOS simulators, the HTTP price server, the real Agent.

Four miners (two S19j Pro, two S21) on loopback addresses that unmodified pyasic talks to, a
price server, and the lead's :class:`agent.runtime.loop.Agent` with the outputs under test added as
services. The addresses lie in this process's own /16 (tests/loopback.py), so suites can run
side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.control.config import AgentConfig, parse_config
from agent.runtime.inbox import CommandInbox
from agent.runtime.loop import Agent, CycleHook
from agent.runtime.state import AgentState
from agent.runtime.wiring import build_components
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.price_server import PriceServer
from tests.loopback import ip
from tests.test_e2e_miners import until

__all__ = ["S19", "S21", "Outputs", "running_site", "site_config", "until"]

S19 = [ip(180, 1), ip(180, 2)]
S21 = [ip(181, 1), ip(181, 2)]
MODELS = {
    "S19jPro": {
        "standby_w": 28,
        "nameplate_w": 3500,
        "profiles": [{"name": "default", "power_w": 3068, "hashrate_ths": 104}],
    },
    "S21": {
        "standby_w": 35,
        "nameplate_w": 4000,
        "profiles": [{"name": "default", "power_w": 3500, "hashrate_ths": 200}],
    },
}

Service = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def site_config(price_url: str) -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "obs", "interconnect_limit_kw": 40},
            "control": {
                "interval_s": 0.25,
                "poll_interval_s": 0.2,
                "poll_jitter_s": 0.02,
                "device_timeout_s": 2,
                "retries": 1,
                "verify_after_s": 1.5,
                "min_on_s": 0.3,
                "min_off_s": 0.3,
            },
            "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 55}},
            "miner_models": MODELS,
            "miners": [
                {"id": "s19", "address": S19[0], "model": "S19jPro", "count": 2},
                {"id": "s21", "address": S21[0], "model": "S21", "count": 2},
            ],
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
            "metrics": {"port": 0},
        }
    )


@dataclass(frozen=True, slots=True)
class Outputs:
    """The outputs under test: services to run and cycle observers, built before the agent."""

    services: Sequence[Service] = ()
    observers: Sequence[CycleHook] = ()


@contextlib.asynccontextmanager
async def running_site(
    price: float, outputs: Callable[[AgentConfig, AgentState, CommandInbox], Outputs]
) -> AsyncIterator[tuple[Agent, LuxosFleet, PriceServer]]:
    """Start simulators, price server and the agent with ``outputs(config, state, inbox)``.

    The outputs read the state the agent writes, and send operator commands through the inbox
    the agent serves, as in :func:`agent.cli.daemon.serve`.
    """
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    fleet = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.2, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    server = PriceServer([price], interval_s=3600)
    async with fleet, server:
        config = site_config(server.url)
        state = AgentState(site_id=config.site.id, started_at=datetime.now(UTC))
        inbox = CommandInbox()
        wired = outputs(config, state, inbox)
        components = build_components(config, state, services=wired.services)
        agent = Agent(config, components, state=state, observers=wired.observers, inbox=inbox)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            yield agent, fleet, server
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
