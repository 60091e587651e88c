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
    from agent.runtime.loop import Agent
    from agent.runtime.wiring import build_components

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2

    async def once() -> int:
        components = build_components(cfg)
        agent = Agent(cfg, components)
        await agent.coordinator.poll_miners()
        await agent.coordinator.poll_price()
        fleet = components.gpu_fleet
        if fleet is not None:
            try:
                await fleet.poll()
            finally:
                aclose = getattr(fleet, "aclose", None)
                if aclose is not None:
                    await aclose()
        agent.coordinator.adopt_observed_state()
        snapshot = agent.coordinator.snapshot()
        result = decide(snapshot, cfg, snapshot.at)
        print(result.summary)
        for action in result.actions:
            print(f"  {action.device_id}: {action.kind.value} -> {action.target}: {action.reason}")
        return 0

    return asyncio.run(once())
