"""``site-agent demo``: a simulated site and the real agent in one command (see demo_site)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

# The same file as agent.cli.demo_site.DEFAULT_CONFIG, spelled here so --help loads nothing.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo-site.yaml"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a simulated site with the agent on a real ERCOT day")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="demo site YAML")
    p.add_argument(
        "--duration", type=float, default=90.0, help="seconds of wall time for the whole day"
    )
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from agent.cli.common import bounded_args
    from agent.cli.demo_site import run_demo

    if not bounded_args([(args.duration, 1.0, 7 * 86400.0, "--duration")]):
        return 2
    return asyncio.run(run_demo(args.config, args.duration))
