"""Benchmark: what starting ``site-agent`` costs, next to a bare ``python -c pass``.

An operator who types ``site-agent curtail`` during a grid emergency should not wait for pyasic,
openleadr and the rest to load. This runs, side by side and interleaved (so a busy machine
slows them alike), ``--rounds`` times each:

* ``python -c pass`` (the floor: the interpreter alone);
* ``site-agent --help``, ``site-agent curtail --help``, ``site-agent audit --help``;
* ``site-agent curtail`` with a bad target (``--target-kw -1``): refused before anything loads
  (exit 2, the journal untouched);
* ``site-agent curtail`` that writes an override (a minimal site config, a journal in a temporary
  folder): the whole path an operator waits for, config validation and SQLite included. It has
  no target: it needs pydantic and the config models, which the ``--help`` paths never load.

The figure is CPU time (user + system, from ``getrusage`` of the finished child), which a busy
machine inflates far less than wall time. Prints one JSON line per command:
``{"figure": "cli_start_cpu_s", "command", "value" (median CPU-s), "over_bare_s",
"target_over_bare_s": 0.3, "meets_target", "wall_s" (median), "rounds"}``.
Run: ``.venv/bin/python bench/cli_start.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_OVER_BARE_S = 0.3
CONFIG = ROOT / "configs" / "example-site.yaml"


def site_agent() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("site-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli.main"]


def commands(workdir: Path) -> dict[str, tuple[list[str], int]]:
    """Label -> (argv, expected exit code)."""
    cli = site_agent()
    site = workdir / "site.yaml"
    site.write_text(
        "site: {id: bench, interconnect_limit_kw: 100}\n"
        "prices: {realtime: {type: constant, value: 30}}\n"
        f"store: {{path: {workdir / 'journal.db'}}}\n"
    )
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], 0),
        "site-agent --help": ([*cli, "--help"], 0),
        "site-agent curtail --help": ([*cli, "curtail", "--help"], 0),
        "site-agent audit --help": ([*cli, "audit", "--help"], 0),
        "site-agent curtail (bad target)": (
            [*cli, "curtail", "--config", str(CONFIG), "--target-kw", "-1", "--until", "+1h"],
            2,
        ),
        # The whole of a real override: config loaded and checked, journal opened and written.
        "site-agent curtail (written)": (
            [*cli, "curtail", "--config", str(site), "--target-kw", "100", "--until", "+1m"],
            0,
        ),
    }


def cpu_s(argv: list[str], expected: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``argv``, which must exit with ``expected``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != expected:
        raise SystemExit(
            f"{' '.join(argv)} exited {done.returncode}, expected {expected}: "
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each command")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cli-start-"))
    runs = commands(workdir)
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    wall: dict[str, list[float]] = {label: [] for label in runs}
    for argv, expected in runs.values():  # warm the page cache and .pyc files once
        cpu_s(argv, expected)
    for _ in range(args.rounds):
        for label, (argv, expected) in runs.items():
            c, w = cpu_s(argv, expected)
            cpu[label].append(c)
            wall[label].append(w)
    shutil.rmtree(workdir, ignore_errors=True)
    bare = statistics.median(cpu["python -c pass"])
    for label in runs:
        median = statistics.median(cpu[label])
        # The written override must load pydantic and the config models: reported, no target.
        target = None if label == "site-agent curtail (written)" else TARGET_OVER_BARE_S
        print(
            json.dumps(
                {
                    "figure": "cli_start_cpu_s",
                    "command": label,
                    "value": round(median, 4),
                    "unit": "cpu_s",
                    "over_bare_s": round(median - bare, 4),
                    "target_over_bare_s": target,
                    "meets_target": None if target is None else median - bare <= target,
                    "wall_s": round(statistics.median(wall[label]), 4),
                    "rounds": args.rounds,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
