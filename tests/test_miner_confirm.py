"""The miner fleet reads a commanded miner once at once: its command is confirmed in telemetry
without waiting for the next poll of the whole fleet, and a failed confirming read changes
nothing (a real LuxOS simulator behind pyasic)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from agent.control.config import AgentConfig, parse_config
from agent.control.domain import SLEEP, Action, ActionKind
from agent.runtime.miner_fleet import MinerFleet
from agent.runtime.wiring import build_miners
from drivers.miners.base import MinerMode
from simulators.luxos import LuxosFleet, fleet_specs
from simulators.luxos_model import S19J_PRO, Fault, FaultKind, Timing
from tests.loopback import ip

ADDRESSES = [ip(191, 1), ip(191, 2)]
TIMING = Timing(wake_ramp_s=0.2, sleep_ramp_s=0.1, profile_ramp_s=0.1)


@pytest.fixture
async def lux() -> AsyncIterator[LuxosFleet]:
    async with LuxosFleet(fleet_specs(2, ADDRESSES[0], models=("s19jpro",)), timing=TIMING) as f:
        yield f


def site() -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "confirm", "interconnect_limit_kw": 40},
            # A poll every hour: nothing but the confirming read can read the miner in this test.
            "control": {"poll_interval_s": 3600, "device_timeout_s": 2},
            "economics": {"hashprice": {"usd_per_ph_day": 55}},
            "metrics": {"enabled": False, "port": 0},
            "prices": {"realtime": {"type": "constant", "value": 40.0}},
            "miner_models": {"S19jPro": S19J_PRO.site_config()},
            "miners": [
                {"id": f"lux-{k}", "address": a, "model": "S19jPro", "firmware": "luxos"}
                for k, a in enumerate(ADDRESSES)
            ],
        }
    )


def sleep_action(device_id: str) -> Action:
    return Action(device_id, ActionKind.SLEEP, SLEEP, "test: shed", -3000.0)


async def test_a_command_is_confirmed_by_its_own_read_not_the_next_poll(lux: LuxosFleet) -> None:
    config = site()
    fleet = MinerFleet(config, build_miners(config))
    assert await fleet.poll() is None
    polled_at = fleet.slots["lux-0"].read_at
    other_at = fleet.slots["lux-1"].read_at
    await fleet.apply(sleep_action("lux-0"))
    assert "lux-0" in fleet.pending()
    deadline = time.monotonic() + 10.0
    while "lux-0" in fleet.pending():
        assert time.monotonic() < deadline, "the sleep was not confirmed without a poll"
        await asyncio.sleep(0.02)
    slot = fleet.slots["lux-0"]
    assert slot.reading is not None
    assert slot.reading.mode is MinerMode.SLEEPING
    assert slot.read_at is not None
    assert polled_at is not None
    assert slot.read_at > polled_at
    assert lux.miners[ADDRESSES[0]].sleeping
    # Only the commanded miner was read again; verify() now has nothing left to report.
    assert fleet.slots["lux-1"].read_at == other_at
    assert fleet.verify() == []
    assert not fleet.faults()


async def test_a_failed_confirming_read_changes_nothing(lux: LuxosFleet) -> None:
    config = site()
    fleet = MinerFleet(config, build_miners(config))
    assert await fleet.poll() is None
    await fleet.apply(sleep_action("lux-1"))
    # The confirming read is scheduled, not yet sent: the miner answers garbage from now on.
    lux.set_fault(ADDRESSES[1], Fault(FaultKind.GARBAGE))
    deadline = time.monotonic() + 10.0
    while fleet._confirming:
        assert time.monotonic() < deadline, "the confirming read never finished"
        await asyncio.sleep(0.02)
    slot = fleet.slots["lux-1"]
    # Still pending (not confirmed, not failed), no failure counted towards a fault, and the
    # reading the fleet holds is the poll's, from before the command.
    assert "lux-1" in fleet.pending()
    assert slot.consecutive_failures == 0
    assert slot.last_error is None
    assert slot.reading is not None
    assert slot.reading.mode is MinerMode.MINING
    assert fleet.verify() == []
    assert not fleet.faults()
    # A poll still reads it and counts the failure, as before.
    assert await fleet.poll() == "1 miner(s) not answering"
    assert slot.consecutive_failures == 1
