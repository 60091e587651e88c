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
        await agent.coordinator.refresh_horizon()
        snapshot = agent.coordinator.snapshot()
        result = decide(snapshot, cfg, snapshot.at)
        print(result.summary)
        state = agent.state
        if state.planner_status is not None:
            print(
                f"horizon plan: {state.planner_status} in {state.planner_solve_s or 0.0:.3f} s"
                f" ({state.planner_reason})"
            )
        horizon = snapshot.horizon
        if horizon is not None:
            for block in horizon.block_ids:
                band = horizon.band(block, snapshot.at)
                if band is not None:
                    print(
                        f"  {block}: {band.units_on} awake in the plan; curtail above "
                        f"{band.curtail_above_usd_per_mwh:,.1f}, restore below "
                        f"{band.restore_below_usd_per_mwh:,.1f} $/MWh"
                    )
        for action in result.actions:
            print(f"  {action.device_id}: {action.kind.value} -> {action.target}: {action.reason}")
        return 0

    return asyncio.run(once())
