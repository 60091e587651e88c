"""The ``site-agent`` command line: one sub-command per job, each defined in its own module.

A module joins the CLI by exposing ``register(subparsers)``, which adds its sub-parser and sets
``func`` (a callable taking the parsed namespace and returning the exit code). Logging is
configured here and only here (style.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute sub-commands. Each exposes register(subparsers).
# Each module imports only the standard library at its top, so that building the parser (and
# ``--help``) costs next to nothing; vendor libraries load inside the command that runs.
COMMAND_MODULES = (
    "agent.cli.check_config",
    "agent.cli.run",
    "agent.cli.node",
    "agent.cli.plan",
    "agent.cli.sim",
    "agent.cli.demo",
    "agent.cli.override",
    "agent.cli.journal",
    "agent.cli.backtest",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="site-agent",
        description="Control agent for hybrid data centers: miners, GPUs and the grid.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
