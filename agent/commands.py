"""Core sub-commands: ``check-config``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agent.config import ConfigError, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate site config files; print every error")
    p.add_argument("files", nargs="+", help="site YAML files")
    p.set_defaults(func=check_config)


def check_config(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            failed += 1
            for line in exc.problems:
                print(line, file=sys.stderr)
            continue
        miners = len(cfg.expanded_miners())
        gpus = sum(n.gpus * n.count for n in cfg.gpu_nodes)
        print(f"{path}: ok (site {cfg.site.id}, {miners} miners, {gpus} GPUs)")
    return 1 if failed else 0
