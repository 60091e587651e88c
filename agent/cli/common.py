"""Helpers every command shares: load a site config and print its problems, one per line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.control.config import AgentConfig


def bounded_args(checks: list[tuple[float, float, float, str]]) -> bool:
    """Each (value, lo, hi, option) finite and in range; else print one line and say False.

    (argparse's ``float`` takes ``nan``, ``inf`` and ``1e400``; its ``int`` any size.)
    """
    from drivers.inputs import InputRejected, finite_in_range

    for value, lo, hi, what in checks:
        try:
            finite_in_range(value, lo, hi, what, source="argument")
        except InputRejected as exc:
            print(exc.message, file=sys.stderr)
            return False
    return True


def load_or_report(path: Path) -> AgentConfig | None:
    """The config at ``path``, or None after printing each problem (file, key, expectation)."""
    from agent.control.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None
