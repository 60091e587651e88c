"""``site-agent node``: a node agent on a GPU host or next to a partition of miners (issue 11)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.cli.common import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "node", help="run a node agent: local devices, dispatched by a controller over MQTT"
    )
    p.add_argument("--config", type=Path, required=True, help="node YAML (a site config + node:)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.cli.node_daemon import serve_node
    from agent.control.redaction import secrets_in
    from agent.outputs.logs import setup_logging
    from drivers.errors import AgentError

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    if cfg.node is None:
        print(f"{args.config}: a node agent needs a node: section (id, broker)", file=sys.stderr)
        return 2
    setup_logging(secrets=secrets_in(cfg))
    try:
        asyncio.run(serve_node(cfg, args.config))
    except AgentError as exc:
        print(f"site-agent node cannot run: {exc}", file=sys.stderr)
        return 2
    return 0
