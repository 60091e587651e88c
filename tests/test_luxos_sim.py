"""Unmodified pyasic against the LuxOS simulator, the simulator's physics, control port and CLI."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyasic import APIError, get_miner
from pyasic.miners.antminer.luxos.X19.S19 import LUXMinerS19jPro
from pyasic.miners.antminer.luxos.X21.S21 import LUXMinerS21
from pyasic.network import MinerNetwork

from simulators.luxos import (
    LuxosFleet,
    control_request,
    fleet_addresses,
    fleet_specs,
    serve_control,
)
from simulators.luxos_model import S19J_PRO, S21, ManualClock, MinerState, Timing
from tests.loopback import ip, subnet

ROOT = Path(__file__).resolve().parent.parent
BASE = ip(120, 1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleet(clock: ManualClock) -> AsyncIterator[LuxosFleet]:
    async with LuxosFleet(fleet_specs(10, BASE), clock=clock, timing=Timing(10.0, 2.0, 1.0)) as f:
        yield f


async def test_get_miner_identifies_both_models(fleet: LuxosFleet) -> None:
    s19 = await get_miner(ip(120, 1))
    s21 = await get_miner(ip(120, 2))
    assert isinstance(s19, LUXMinerS19jPro)
    assert isinstance(s21, LUXMinerS21)


async def test_subnet_scan_finds_exactly_the_simulated_miners(fleet: LuxosFleet) -> None:
    # The /28 has 14 hosts; miners sit on .1-.10, .11-.14 refuse.
    found = await MinerNetwork.from_subnet(subnet(120, 28)).scan()
    assert sorted(str(m.ip) for m in found) == sorted(fleet.addresses)


async def test_get_data_reports_power_hashrate_temperatures_and_model(
    fleet: LuxosFleet,
) -> None:
    miner = await get_miner(ip(120, 2))
    assert miner is not None
    data = await miner.get_data()
    assert data.model == "S21"
    assert data.wattage == 3500
    assert data.wattage_limit == 3500
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(200.0, rel=1e-3)
    # Settled at 3.5 kW: PCB 25 + 12 °C/kW x 3.5 = 67 °C, boards skewed by ±1 °C.
    board_temps = sorted(h.temp for h in data.hashboards if h.temp is not None)
    assert len(board_temps) == 3
    assert board_temps[1] == pytest.approx(67.0, abs=1.0)
    assert data.fw_ver == "2024.11.18.223311-bf2f6d3c"
    assert len(data.fans) == 4


async def test_stop_and_resume_change_true_state_and_readings(
    fleet: LuxosFleet, clock: ManualClock
) -> None:
    miner = await get_miner(ip(120, 1))
    assert miner is not None
    assert await miner.stop_mining()
    assert fleet.miners[ip(120, 1)].sleeping
    clock.advance(2.0)  # the sleep ramp
    data = await miner.get_data()
    assert data.wattage == S19J_PRO.standby_w
    assert data.hashrate is not None
    assert float(data.hashrate) == 0.0

    assert await miner.resume_mining()
    clock.advance(5.0)  # half of the 10 s wake ramp
    half = await miner.get_data()
    assert half.wattage == pytest.approx((28 + 3068) / 2, abs=1)
    clock.advance(5.0)
    full = await miner.get_data()
    assert full.wattage == 3068


async def test_set_power_limit_picks_highest_profile_at_or_below(
    fleet: LuxosFleet, clock: ManualClock
) -> None:
    miner = await get_miner(ip(120, 1))
    assert miner is not None
    assert await miner.set_power_limit(3000)
    state = fleet.miners[ip(120, 1)]
    assert state.profile == "-1"
    assert state.atm_enabled  # pyasic paused ATM around profileset and restored it
    clock.advance(1.0)
    data = await miner.get_data()
    assert data.wattage == 2760
    assert data.wattage_limit == 2760


async def test_multicommand_and_error_status_shapes(fleet: LuxosFleet) -> None:
    miner = await get_miner(ip(120, 1))
    assert miner is not None
    data = await miner.rpc.send_command("power+config")
    assert set(data) == {"power", "config", "id"}
    assert data["power"][0]["POWER"][0]["Watts"] == 3068
    assert data["config"][0]["STATUS"][0]["STATUS"] == "S"
    with pytest.raises(APIError, match="Invalid command"):
        await miner.rpc.send_command("frobnicate")
    with pytest.raises(APIError, match="Invalid session"):
        await miner.rpc.send_command("curtail", "not-a-session", "sleep")
    assert not fleet.miners[ip(120, 1)].sleeping


async def test_connection_closed_without_request_is_tolerated(fleet: LuxosFleet) -> None:
    for _ in range(3):
        _, writer = await asyncio.open_connection(ip(120, 3), 4028)
        writer.close()
        await writer.wait_closed()
    reader, writer = await asyncio.open_connection(ip(120, 3), 4028)
    writer.write(b'{"command": "power"}')
    await writer.drain()
    reply = json.loads((await reader.read()).rstrip(b"\x00"))
    writer.close()
    assert reply["POWER"][0]["Watts"] == 3068


def test_wake_ramp_is_linear_and_temperature_lags_power() -> None:
    clock = ManualClock()
    m = MinerState("127.0.0.2", S21, clock, Timing(wake_ramp_s=100.0, sleep_ramp_s=0.0))
    hot = m.pcb_c()
    m.sleep()
    assert m.power_w() == S21.standby_w
    # First-order lag: after one time constant the gap to the new steady state shrinks to 1/e.
    steady_cold = S21.ambient_c + S21.pcb_rise_c_per_kw * S21.standby_w / 1000
    clock.advance(S21.thermal_tau_s)
    expected = steady_cold + (hot - steady_cold) / math.e
    assert m.pcb_c() == pytest.approx(expected, abs=0.01)
    m.wake()
    clock.advance(25.0)
    assert m.power_w() == pytest.approx(S21.standby_w + 0.25 * (3500 - S21.standby_w))
    assert m.hashrate_ths() == pytest.approx(50.0)
    clock.advance(100.0)
    assert m.power_w() == 3500
    assert m.hashrate_ths() == 200
    assert m.chip_c() > m.pcb_c()


def test_reset_restores_default_profile_and_mining() -> None:
    clock = ManualClock()
    m = MinerState("127.0.0.2", S19J_PRO, clock)
    m.set_profile("-2")
    m.sleep()
    m.reset()
    assert (m.profile, m.sleeping, m.power_w()) == ("default", False, 3068)


def test_fleet_addresses_skip_network_and_broadcast_octets_and_stay_on_loopback() -> None:
    assert fleet_addresses(3, "127.5.0.254") == ["127.5.0.254", "127.5.1.1", "127.5.1.2"]
    with pytest.raises(ValueError, match="loopback"):
        fleet_addresses(1, "10.0.0.1")
    with pytest.raises(ValueError, match="unknown model"):
        fleet_specs(1, models=["s9"])


async def test_control_port_sets_faults_and_reports_truth(fleet: LuxosFleet) -> None:
    server = await serve_control(fleet, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await control_request(port, {"op": "fault", "address": ip(120, 4), "fault": "error"})
        assert ok == {"ok": True}
        state = await control_request(port, {"op": "state", "address": ip(120, 4)})
        assert state["ok"]
        assert isinstance(state["state"], dict)
        assert state["state"]["fault"] == "error"
        # A bad request changes nothing, and says why.
        bad = await control_request(
            port, {"op": "fault", "addresses": [ip(120, 5), "127.99.0.1"], "fault": "hang"}
        )
        assert not bad["ok"]
        assert "127.99.0.1" in str(bad["error"])
        assert fleet.truth(ip(120, 5))["fault"] == "none"
        unknown = await control_request(port, {"op": "fault", "address": ip(120, 5)})
        assert not unknown["ok"]
        listing = await control_request(port, {"op": "list"})
        assert listing["miners"] == fleet.addresses
    finally:
        server.close()
        await server.wait_closed()


def test_cli_prints_every_address_and_stops_on_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "simulators.luxos", "--miners", "3", "--base", ip(122, 1)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            rows = [json.loads(proc.stdout.readline()) for _ in range(4)]
            addresses = [r.get("address") for r in rows[:3]]
            assert addresses == [ip(122, 1), ip(122, 2), ip(122, 3)]
            assert rows[3]["event"] == "ready"
            assert rows[3]["miners"] == 3
            assert rows[3]["control_port"] > 0
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0


def test_cli_rejects_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulators.luxos", "--miners", "2", "--base", "192.168.1.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 2
    assert "not in 127.0.0.0/8" in done.stderr
