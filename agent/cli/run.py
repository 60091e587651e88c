"""``site-agent run``: the daemon, as systemd starts it (see :mod:`agent.cli.daemon`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the agent (the daemon systemd starts)")
    p.add_argument("--config", type=Path, required=True, help="site YAML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli.daemon import serve
    from agent.control.redaction import secrets_in
    from agent.outputs.logs import setup_logging
    from drivers.errors import AgentError

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    setup_logging(secrets=secrets_in(cfg))
    try:
        asyncio.run(serve(cfg, args.config))
    except AgentError as exc:
        print(f"site-agent cannot run: {exc}", file=sys.stderr)
        return 2
    return 0
