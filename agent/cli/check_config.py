"""``site-agent check-config``: validate site config files and print every error."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate site config files; print every error")
    p.add_argument("files", nargs="+", help="site YAML files")
    p.set_defaults(func=check_config)


def check_config(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        cfg = load_or_report(Path(path))
        if cfg is None:
            failed += 1
            continue
        miners = len(cfg.expanded_miners())
        gpus = sum(n.gpus * n.count for n in cfg.gpu_nodes)
        print(f"{path}: ok (site {cfg.site.id}, {miners} miners, {gpus} GPUs)")
    return 1 if failed else 0
