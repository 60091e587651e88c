"""Core sub-commands: ``check-config``, ``run``, ``plan`` (dry run) and ``sim``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, load_config
from drivers.errors import AgentError
from drivers.inputs import arg_number


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate site config files; print every error")
    p.add_argument("files", nargs="+", help="site YAML files")
    p.set_defaults(func=check_config)

    p = sub.add_parser("run", help="run the agent (the daemon systemd starts)")
    p.add_argument("--config", type=Path, required=True, help="site YAML")
    p.set_defaults(func=run)

    p = sub.add_parser("plan", help="poll once and print the plan the policy would make")
    p.add_argument("--config", type=Path, required=True, help="site YAML")
    p.add_argument("--dry-run", action="store_true", default=True, help="never actuate (default)")
    p.set_defaults(func=plan)

    p = sub.add_parser("sim", help="run simulated LuxOS miners on loopback")
    p.add_argument(
        "--miners",
        type=arg_number(1, 100_000, "--miners", integer=True),
        default=10,
        help="how many miners",
    )
    p.add_argument("--base", default="127.1.0.1", help="first loopback address")
    p.add_argument(
        "--control-port",
        type=arg_number(0, 65535, "--control-port", integer=True),
        default=0,
        help="JSON control port (0: any)",
    )
    p.set_defaults(func=sim)


def _load(path: Path) -> AgentConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def check_config(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        cfg = _load(Path(path))
        if cfg is None:
            failed += 1
            continue
        miners = len(cfg.expanded_miners())
        gpus = sum(n.gpus * n.count for n in cfg.gpu_nodes)
        print(f"{path}: ok (site {cfg.site.id}, {miners} miners, {gpus} GPUs)")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    from agent.daemon import serve
    from agent.logs import setup_logging
    from agent.store import secrets_in

    cfg = _load(args.config)
    if cfg is None:
        return 2
    setup_logging(secrets=secrets_in(cfg))
    try:
        asyncio.run(serve(cfg, args.config))
    except AgentError as exc:
        print(f"site-agent cannot run: {exc}", file=sys.stderr)
        return 2
    return 0


def plan(args: argparse.Namespace) -> int:
    from agent.runtime import Agent
    from agent.wiring import build_components

    cfg = _load(args.config)
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
        from agent.policy import decide

        snapshot = agent.coordinator.snapshot()
        result = decide(snapshot, cfg, snapshot.at)
        print(result.summary)
        for action in result.actions:
            print(f"  {action.device_id}: {action.kind.value} -> {action.target}: {action.reason}")
        return 0

    return asyncio.run(once())


def sim(args: argparse.Namespace) -> int:
    from simulators.luxos import run_fleet_cli

    argv = ["--miners", str(args.miners), "--base", args.base]
    if args.control_port:
        argv += ["--control-port", str(args.control_port)]
    return asyncio.run(run_fleet_cli(argv))
