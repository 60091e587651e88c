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
        # The meter and the weather feed too: a dry-run plan is judged where the live one is.
        meter, ambient = agent.components.meter, agent.components.ambient_source
        try:
            await agent.meter_watch.poll()
            await agent.meter_watch.poll_ambient()
        finally:
            if meter is not None:
                await meter.close()
            ambient_close = getattr(ambient, "aclose", None)
            if ambient_close is not None:
                await ambient_close()
        await coordinator.refresh_horizon()
        snapshot = coordinator.snapshot()
        result = decide(snapshot, cfg, snapshot.at)
        print(result.summary)
        if coordinator.planner_status is not None:
            print(
                f"horizon plan: {coordinator.planner_status} in "
                f"{coordinator.planner_solve_s or 0.0:.3f} s ({coordinator.planner_reason})"
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
