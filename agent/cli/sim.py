"""``site-agent sim``: simulated miners on loopback, for trying the agent without rigs."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("sim", help="run simulated LuxOS miners on loopback")
    p.add_argument("--miners", type=int, default=10, help="how many miners")
    p.add_argument("--base", default="127.1.0.1", help="first loopback address")
    p.add_argument("--control-port", type=int, default=0, help="JSON control port (0: any)")
    p.set_defaults(func=sim)


def sim(args: argparse.Namespace) -> int:
    from agent.cli.common import bounded_args
    from simulators.luxos import run_fleet_cli

    if not bounded_args(
        [(args.miners, 1, 100_000, "--miners"), (args.control_port, 0, 65535, "--control-port")]
    ):
        return 2
    argv = ["--miners", str(args.miners), "--base", args.base]
    if args.control_port:
        argv += ["--control-port", str(args.control_port)]
    return asyncio.run(run_fleet_cli(argv))
