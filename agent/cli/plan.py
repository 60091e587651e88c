"""``site-agent plan``: poll once and print the plan the policy would make, actuating nothing."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from agent.cli.common import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="poll once and print the plan the policy would make")
    p.add_argument("--config", type=Path, required=True, help="site YAML")
    p.add_argument("--dry-run", action="store_true", default=True, help="never actuate (default)")
    p.set_defaults(func=plan)


def plan(args: argparse.Namespace) -> int:
    from agent.control.policy import decide
    from agent.runtime.coordinator import utc_now
    from agent.runtime.loop import Agent
    from agent.runtime.state import AgentState
    from agent.runtime.wiring import build_components

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2

    async def once() -> int:
        state = AgentState(site_id=cfg.site.id, started_at=utc_now())
        agent = Agent(cfg, build_components(cfg, state), state=state)
        coordinator = agent.coordinator
        for fleet in agent.fleets:
            stop = asyncio.Event()
            opened = asyncio.create_task(fleet.run(stop))  # opens drivers; closes them at stop
            try:
                await coordinator.poll_fleet(fleet)
            finally:
                stop.set()
                await opened
            fleet.adopt_observed()
        await coordinator.poll_price()
        snapshot = coordinator.snapshot()
        result = decide(snapshot, cfg, snapshot.at)
        print(result.summary)
        for action in result.actions:
            print(f"  {action.device_id}: {action.kind.value} -> {action.target}: {action.reason}")
        return 0

    return asyncio.run(once())
