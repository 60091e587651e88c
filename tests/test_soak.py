"""Soak, short form: 200 miners, six hours of a real ERCOT day at 1440×, random faults.

The long form is ``bench/soak.py`` (a whole day, 300 miners). Both check after every control
cycle that planned power stays within the active limit and that the simulators' true site power
stays within it plus the stated tolerance (see ``bench/soak.py``), and at the end that every
executed action has its audit row in the journal and that memory stayed flat.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.soak import SoakSettings, run_soak
from tests.loopback import ip

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


async def test_soak_short(shared_data: Path, tmp_path: Path) -> None:
    settings = SoakSettings(
        miners=200,
        base=ip(32, 1),  # this process's loopback net: concurrent runs never collide
        hours=6.0,
        speed=1440.0,  # 15 s of wall time
        fault_every_s=0.5,
        event_every_s=4.0,
        report_s=60.0,
        # On a busy machine the 15 s may hold fewer cycles: run on (up to 2 min) for enough work.
        min_cycles=12,
    )
    csv = shared_data / "ercot" / "rtm_hub_prices_15min_2023.csv"
    summary = await run_soak(settings, csv, tmp_path)
    print(summary)  # the measured figures, for `pytest -s`
    # The run did real work: many cycles, hundreds of actions, overrides and faults.
    assert summary["cycles"] >= 8, ("cycles", summary)
    assert summary["actions"] >= 150, ("actions", summary)
    assert summary["events"] >= 2, ("events", summary)
    assert sum(summary["faults_injected"].values()) >= 15, ("faults", summary)
    assert len(summary["faults_injected"]) >= 4, ("fault kinds", summary)
    # Invariants, every cycle.
    assert summary["violations"] == 0, summary["first_violations"]
    assert summary["worst_planned_over_limit_w"] <= 1.0
    assert summary["worst_true_over_allowed_w"] <= 0.0
    # Load came back no faster than the ramp rate (plus the one cycle in flight).
    assert summary["worst_started_w_per_2s"] <= summary["ramp_allowed_w_per_2s"], ("ramp", summary)
    # Every action executed is audited in the journal.
    assert summary["audited"] == summary["actions"]
    # Memory flat: RSS after warm-up to the end, and no task left behind by the agent.
    assert summary["rss_growth_mb"] < 15.0, ("memory", summary)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == [], leftover
