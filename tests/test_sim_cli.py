"""Every miner simulator's command line, one test over the four families.

``python -m simulators.<family>`` prints one JSON line per miner and a ``ready`` line with the
control port, answers that port, stops cleanly on SIGTERM, and refuses bad arguments with exit
status 2 and a message naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulators.braiins import GRPC_PORT
from simulators.luxos import control_request
from tests.loopback import ip

ROOT = Path(__file__).resolve().parent.parent

Row = dict[str, object]


@dataclass(frozen=True)
class Cli:
    """One family's simulator command and what only it prints."""

    module: str
    third: int  # the third octet of its addresses in this test
    miners: int
    args: tuple[str, ...] = ()
    needs_root: bool = False  # the Antminer web API listens on port 80
    rows: Callable[[list[Row]], None] = lambda rows: None  # checks of the miner lines
    state: Callable[[Row], None] = lambda state: None  # checks of the second miner's state


def _luxos_rows(rows: list[Row]) -> None:
    assert [r["model"] for r in rows] == ["s19jpro", "s21", "s19jpro"]


def _braiins_rows(rows: list[Row]) -> None:
    assert all(r["grpc_port"] == GRPC_PORT and r["firmware"] == "braiins" for r in rows)


def _antminer_rows(rows: list[Row]) -> None:
    assert all(r["family"] == "antminer" and r["web_port"] == 80 for r in rows)


def _antminer_state(state: Row) -> None:
    assert state["conf_delay_s"] == 20.0


def _whatsminer_rows(rows: list[Row]) -> None:
    assert [r["model"] for r in rows] == ["m30s+v40", "m60svk30", "m30s+v40"]


CLIS = [
    Cli("simulators.luxos", 122, 3, rows=_luxos_rows),
    Cli("simulators.braiins", 143, 2, rows=_braiins_rows),
    Cli(
        "simulators.antminer",
        144,
        3,
        ("--conf-delay-s", "20"),
        needs_root=True,
        rows=_antminer_rows,
        state=_antminer_state,
    ),
    Cli("simulators.whatsminer", 154, 3, rows=_whatsminer_rows),
]


@pytest.mark.parametrize("cli", CLIS, ids=lambda c: c.module.split(".")[1])
def test_cli_prints_every_miner_serves_control_and_stops_on_sigterm(cli: Cli) -> None:
    if cli.needs_root and os.geteuid() != 0:
        pytest.skip("binding port 80 (the Antminer web API) needs root")
    base = ip(cli.third, 1)
    command = [sys.executable, "-m", cli.module, "--miners", str(cli.miners), "--base", base]
    with subprocess.Popen(
        [*command, *cli.args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        try:
            lines = [json.loads(proc.stdout.readline()) for _ in range(cli.miners + 1)]
            rows, ready = lines[:-1], lines[-1]
            expected = [ip(cli.third, k) for k in range(1, cli.miners + 1)]
            assert [r["address"] for r in rows] == expected
            assert all(r["port"] == 4028 for r in rows)
            cli.rows(rows)
            assert (ready["event"], ready["miners"]) == ("ready", cli.miners)
            assert ready["control_port"] > 0
            request: dict[str, object] = {"op": "state", "address": ip(cli.third, 2)}
            answer = asyncio.run(control_request(ready["control_port"], request))
            state = answer["state"]
            assert isinstance(state, dict)
            assert state["address"] == ip(cli.third, 2)
            assert state["fault"] == "none"
            cli.state(state)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("simulators.luxos", ["--base", "192.168.1.1"], "not in 127.0.0.0/8"),
        ("simulators.antminer", ["--base", "10.0.0.1"], "not in 127.0.0.0/8"),
        ("simulators.antminer", ["--models", "s9"], "unknown model"),
        ("simulators.antminer", ["--conf-delay-s", "nan"], "conf_delay_s must be finite"),
        ("simulators.whatsminer", ["--models", "m99"], "unknown model"),
        ("simulators.whatsminer", ["--wake-ramp-s", "inf"], "wake-ramp-s must be finite"),
    ],
)
def test_cli_rejects_bad_arguments(module: str, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--miners", "2", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 2, args
    assert message in done.stderr
