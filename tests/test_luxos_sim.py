"""Unmodified pyasic against the LuxOS simulator, the simulator's physics, control port and CLI."""

from __future__ import annotations

import asyncio
import json
import math
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
from simulators.luxos_model import (
    PROFILE_DRAW_RATIO,
    S19J_PRO,
    S21,
    ManualClock,
    MinerState,
    Timing,
)
from simulators.luxos_replies import MINER_VERSION
from tests.loopback import ip, subnet
from tests.servers import connect_as_it_closes

# What each model draws on its default profile: 0.885 x the profile's nominal Watts.
S19_W = round(3068 * PROFILE_DRAW_RATIO)
S21_W = round(3500 * PROFILE_DRAW_RATIO)

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
    assert data.wattage == S21_W  # the real firmware reads about 0.885 x the profile's Watts
    assert data.wattage_limit == 3500  # the profile's nominal Watts
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(200.0, rel=1e-3)
    # Settled at 3.1 kW with the fan loop holding the boards under LuxOS's 55 °C target.
    # pyasic reads the two middle sensors (intake) as the board and the outer two (exhaust)
    # as the chips, as on the recorded miner ("47-34-34-47").
    state = fleet.miners[ip(120, 2)]
    board_temps = sorted(h.temp for h in data.hashboards if h.temp is not None)
    chip_temps = sorted(h.chip_temp for h in data.hashboards if h.chip_temp is not None)
    assert len(board_temps) == len(chip_temps) == 3
    assert board_temps[-1] == round(state.inlet_c())
    assert chip_temps[-1] == round(state.pcb_c())
    assert 45 <= chip_temps[-1] < S21.target_c
    assert data.fw_ver == MINER_VERSION
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
    assert half.wattage == pytest.approx((28 + S19_W) / 2, abs=1)
    assert half.hashrate is not None
    # The chain rates are since-start averages: at mid-ramp they trail the current rate.
    assert float(half.hashrate) == pytest.approx(104.0 / 4, rel=0.02)
    clock.advance(5.0)
    full = await miner.get_data()
    assert full.wattage == S19_W


async def test_set_power_limit_picks_highest_profile_at_or_below(
    fleet: LuxosFleet, clock: ManualClock
) -> None:
    miner = await get_miner(ip(120, 1))
    assert miner is not None
    assert await miner.set_power_limit(3000)
    state = fleet.miners[ip(120, 1)]
    chosen = max((p for p in S19J_PRO.profiles if p.power_w <= 3000), key=lambda p: p.power_w)
    assert chosen.name == "565MHz"  # one 25 MHz step under the default
    assert state.profile == chosen.name
    assert state.atm_enabled  # pyasic paused ATM around profileset and restored it
    clock.advance(1.0)
    data = await miner.get_data()
    assert data.wattage == round(chosen.power_w * PROFILE_DRAW_RATIO)
    assert data.wattage_limit == chosen.power_w


async def test_multicommand_and_error_status_shapes(fleet: LuxosFleet) -> None:
    miner = await get_miner(ip(120, 1))
    assert miner is not None
    data = await miner.rpc.send_command("power+config")
    assert set(data) == {"power", "config", "id"}
    assert data["power"][0]["POWER"][0]["Watts"] == S19_W
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
    assert reply["POWER"][0]["Watts"] == S19_W


@pytest.mark.parametrize("moment", ["accept-task", "transport-pending"])
@pytest.mark.parametrize("how", ["reboot", "stop"])
async def test_a_connection_accepted_as_the_miner_goes_down_is_dropped(
    fleet: LuxosFleet, how: str, moment: str
) -> None:
    """asyncio accepts in a task of its own: a client that connects just before the listener
    closes gets its transport after ``close()`` ran. A miner that is down must not answer it,
    and no socket may outlive the close (the soak once failed on exactly that: two "unclosed
    transport" warnings from a miner rebooting as the run ended, the transports CPython 3.11
    half-builds when a server closes under a scheduled accept)."""
    miner = fleet.endpoint(ip(120, 4))

    async def close() -> None:
        if how == "reboot":
            miner.close()  # what a reboot does first
        else:
            await fleet.stop()
            # The stop returned only once the late connection was dropped and let go of.
            assert miner.connections.settled, "a connection outlived the fleet's stop"

    await connect_as_it_closes(
        miner.address, 4028, b'{"command": "power"}', miner.connections, close, moment
    )


def test_wake_ramp_is_linear_and_temperature_lags_power() -> None:
    clock = ManualClock()
    m = MinerState(
        "127.0.0.2",
        S21,
        clock,
        Timing(wake_ramp_s=100.0, sleep_ramp_s=0.0),
        profile_draw_ratio=PROFILE_DRAW_RATIO,
    )
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
    assert m.power_w() == pytest.approx(S21.standby_w + 0.25 * (S21_W - S21.standby_w), abs=1)
    assert m.hashrate_ths() == pytest.approx(50.0)
    clock.advance(100.0)
    assert m.power_w() == pytest.approx(3500 * PROFILE_DRAW_RATIO)
    assert m.hashrate_ths() == 200
    assert m.chip_c() == m.pcb_c()  # LuxOS reports board sensors as chip temperatures


def test_reset_restores_default_profile_and_mining() -> None:
    clock = ManualClock()
    m = MinerState("127.0.0.2", S19J_PRO, clock, profile_draw_ratio=PROFILE_DRAW_RATIO)
    m.set_profile(S19J_PRO.site_bottom)
    m.sleep()
    m.reset()
    assert (m.profile, m.sleeping) == ("default", False)
    assert m.power_w() == pytest.approx(3068 * PROFILE_DRAW_RATIO)


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


def test_atm_steps_down_when_hot_and_back_up_when_cool() -> None:
    clock = ManualClock()
    m = MinerState("127.0.0.3", S19J_PRO, clock, Timing(atm_step_s=60.0))
    m.set_profile(S19J_PRO.site_top)
    clock.advance(600.0)
    m.atm_tick()
    assert m.profile == S19J_PRO.site_top  # 25 C air: the boards stay under LuxOS's 65 C hot
    m.ambient_c = 45.0  # a hot aisle
    names = [p.name for p in S19J_PRO.profiles]
    for _ in range(20):
        clock.advance(60.0)
        m.atm_tick()
    hot_profile = m.profile
    assert names.index(hot_profile) < names.index(S19J_PRO.site_top)  # ATM stepped down alone
    assert m.user_profile == S19J_PRO.site_top  # ...below what was chosen
    assert m.pcb_c() < S19J_PRO.dangerous_c
    m.ambient_c = 25.0
    for _ in range(40):
        clock.advance(60.0)
        m.atm_tick()
    assert m.profile == S19J_PRO.site_top  # and back up to it, never above
    m.atm_enabled = False
    m.ambient_c = 45.0
    for _ in range(10):
        clock.advance(60.0)
        m.atm_tick()
    assert m.profile == S19J_PRO.site_top  # ATM off: nothing moves


def test_one_session_holder_that_expires_when_idle() -> None:
    clock = ManualClock()
    m = MinerState("127.0.0.4", S21, clock, Timing(session_idle_s=60.0))
    m.session_id = "abc"
    m.touch_session()
    clock.advance(59.0)
    assert m.session_holder() == "abc"
    m.touch_session()  # every use refreshes it
    clock.advance(59.0)
    assert m.session_holder() == "abc"
    clock.advance(2.0)
    assert m.session_holder() == ""


async def test_control_port_sets_the_ambient_air(fleet: LuxosFleet) -> None:
    server = await serve_control(fleet, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await control_request(port, {"op": "ambient", "address": ip(120, 4), "ambient_c": 40})
        assert ok == {"ok": True}
        assert fleet.miners[ip(120, 4)].ambient_c == 40.0
        bad = await control_request(
            port, {"op": "ambient", "address": ip(120, 4), "ambient_c": "NaN"}
        )
        assert not bad["ok"]
        assert fleet.miners[ip(120, 4)].ambient_c == 40.0
    finally:
        server.close()
        await server.wait_closed()
