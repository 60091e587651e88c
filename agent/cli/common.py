"""Helpers every command shares: load a site config and print its problems, one per line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.control.config import AgentConfig


def load_or_report(path: Path) -> AgentConfig | None:
    """The config at ``path``, or None after printing each problem (file, key, expectation)."""
    from agent.control.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None
