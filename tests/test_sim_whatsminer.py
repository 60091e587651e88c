"""Unmodified pyasic 0.79 against the Whatsminer simulator: identify, read, control, faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyasic import APIError, get_miner
from pyasic.config import MiningModeConfig
from pyasic.miners.backends.btminer import BTMinerV2
from pyasic.miners.device.models.whatsminer.M3X.M30S_Plus import M30SPlusV40
from pyasic.miners.device.models.whatsminer.M6X.M60S import M60SVK30
from pyasic.network import MinerNetwork
from pyasic.rpc.btminer import _crypt

from simulators.common import serve_control
from simulators.luxos import control_request
from simulators.luxos_model import ManualClock, Timing
from simulators.whatsminer import (
    MAX_TOKENS,
    WhatsminerFleet,
    WhatsminerSpec,
    md5_crypt,
    whatsminer_specs,
)
from simulators.whatsminer_replies import M30S_PLUS_V40
from tests.loopback import NET, ip, subnet

# pyasic's token code calls passlib in a way passlib deprecates; under -W error that would turn
# every privileged command into an exception. The agent does not run with -W error.
pytestmark = pytest.mark.filterwarnings(
    "ignore:passing settings to md5_crypt.hash:DeprecationWarning"
)

ROOT = Path(__file__).resolve().parent.parent
BASE = ip(150, 1)
M30 = ip(150, 1)
M60 = ip(150, 2)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleet(clock: ManualClock) -> AsyncIterator[WhatsminerFleet]:
    specs = whatsminer_specs(10, BASE)
    async with WhatsminerFleet(specs, clock=clock, timing=Timing(10.0, 2.0, 1.0)) as f:
        yield f


def test_md5_crypt_matches_the_reference_implementation() -> None:
    for password, salt in (("admin", "BQ5hoXV9"), ("", "abc"), ("x" * 40, "Zz09azAZ")):
        assert f"$1${salt}${md5_crypt(password, salt)}" == _crypt(password, f"$1${salt}$")


async def test_get_miner_identifies_btminer_v2_and_model(fleet: WhatsminerFleet) -> None:
    m30 = await get_miner(M30)
    m60 = await get_miner(M60)
    assert isinstance(m30, BTMinerV2)
    assert isinstance(m30, M30SPlusV40)
    assert isinstance(m60, BTMinerV2)
    assert isinstance(m60, M60SVK30)


async def test_subnet_scan_finds_exactly_the_simulated_miners(fleet: WhatsminerFleet) -> None:
    found = await MinerNetwork.from_subnet(subnet(150, 28)).scan()
    assert sorted(str(m.ip) for m in found) == sorted(fleet.addresses)
    assert all(isinstance(m, BTMinerV2) for m in found)


async def test_get_data_matches_true_state_with_a_power_reading(fleet: WhatsminerFleet) -> None:
    miner = await get_miner(M30)
    assert miner is not None
    data = await miner.get_data()
    truth = fleet.truth(M30)
    assert data.model == "M30S+ V40"
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(100.0, rel=1e-3)
    assert truth["hashrate_ths"] == 100.0
    assert data.expected_hashrate is not None
    assert float(data.expected_hashrate) == pytest.approx(100.0)
    assert data.wattage == truth["power_w"] == 3400
    assert data.wattage_limit == 3800
    assert data.is_mining is True
    assert len(data.hashboards) == 3
    temps = sorted(h.temp for h in data.hashboards if h.temp is not None)
    chips = sorted(h.chip_temp for h in data.hashboards if h.chip_temp is not None)
    # Boards are skewed by -1, 0, +1 °C around the true temperatures.
    assert temps[1] == pytest.approx(float(str(truth["pcb_c"])), abs=0.6)
    assert chips[1] == pytest.approx(float(str(truth["pcb_c"])) + 13, abs=0.6)
    assert sum(float(h.hashrate or 0) for h in data.hashboards) == pytest.approx(100.0, rel=1e-3)
    assert all(h.chips == M30S_PLUS_V40.chips_per_board for h in data.hashboards)
    assert [f.speed for f in data.fans] == [6480, 6450]
    assert data.env_temp == 25.0
    # Derived from the address (127.NET.150.1), as the simulator documents.
    assert data.mac == f"C4:08:28:{NET:02X}:96:01"
    assert data.serial_number == f"HSIM{NET:03d}150001"
    assert data.fw_ver == "20230803.11.REL"
    # pyasic 0.79 reads get_version's "rpc_ver"; real firmware (and this simulator) says
    # "api_ver", so the API version stays unknown.
    assert data.api_ver is None
    assert data.errors == []


async def test_stop_and_resume_through_power_off_and_on(
    fleet: WhatsminerFleet, clock: ManualClock
) -> None:
    miner = await get_miner(M30)
    assert miner is not None
    assert await miner.stop_mining()
    clock.advance(2.0)
    asleep = await miner.get_data()
    assert asleep.is_mining is False
    assert asleep.wattage == M30S_PLUS_V40.standby_w
    assert asleep.hashrate is not None
    assert float(asleep.hashrate) == 0.0
    assert (await miner.get_config()).mining_mode == MiningModeConfig.sleep()

    assert await miner.resume_mining()
    clock.advance(5.0)
    half = await miner.get_data()
    assert half.wattage == pytest.approx((22 + 3400) / 2, abs=1)
    clock.advance(5.0)
    full = await miner.get_data()
    assert (full.wattage, full.is_mining) == (3400, True)


async def test_set_power_limit_moves_power_and_hashrate_along_the_curve(
    fleet: WhatsminerFleet, clock: ManualClock
) -> None:
    miner = await get_miner(M30)
    assert miner is not None
    assert await miner.set_power_limit(3000)
    clock.advance(1.0)
    data = await miner.get_data()
    assert (data.wattage, data.wattage_limit) == (3000, 3000)
    assert data.hashrate is not None
    # Between the low (2720 W, 85 TH/s) and normal (3400 W, 100 TH/s) points.
    assert float(data.hashrate) == pytest.approx(85 + (3000 - 2720) / (3400 - 2720) * 15, rel=1e-3)
    # Below the floor the miner cannot follow: it reports the limit but draws the floor.
    assert await miner.set_power_limit(1000)
    clock.advance(1.0)
    low = await miner.get_data()
    assert (low.wattage_limit, low.wattage) == (1000, 1700)
    # A limit above the mode's power leaves the mode's power.
    assert await miner.set_power_limit(5000)
    clock.advance(1.0)
    assert (await miner.get_data()).wattage == 3400


async def test_power_pct_and_power_modes(fleet: WhatsminerFleet, clock: ManualClock) -> None:
    miner = await get_miner(M30)
    assert miner is not None
    assert isinstance(miner, BTMinerV2)
    reply = await miner.rpc.set_power_pct(80)
    assert reply["Msg"] == "API command OK"
    assert fleet.truth(M30)["power_limit_w"] == 2720
    await miner.rpc.adjust_power_limit(3800)
    cfg = await miner.get_config()
    cfg.mining_mode = MiningModeConfig.low()
    await miner.send_config(cfg)
    clock.advance(1.0)
    assert fleet.truth(M30)["power_mode"] == "low"
    assert fleet.truth(M30)["power_w"] == 2720
    assert (await miner.get_config()).mining_mode == MiningModeConfig.low()


async def test_privileged_api_refuses_bad_values_wrong_password_and_stale_tokens(
    fleet: WhatsminerFleet,
) -> None:
    miner = await get_miner(M30)
    assert miner is not None
    assert isinstance(miner, BTMinerV2)
    with pytest.raises(APIError, match="power_limit must be an integer"):
        await miner.rpc.adjust_power_limit(100000)
    with pytest.raises(APIError, match="percent must be"):
        await miner.rpc.send_privileged_command("set_power_pct", percent="150")
    assert fleet.truth(M30)["power_limit_w"] == 3800
    # Plain-text privileged commands are not accepted.
    with pytest.raises(APIError, match="invalid cmd"):
        await miner.rpc.send_command("power_off")
    assert not fleet.miners[M30].state.sleeping

    other = await get_miner(M60)
    assert isinstance(other, BTMinerV2)
    other.rpc.pwd = "not-admin"
    with pytest.raises(APIError, match="check token err"):
        await other.rpc.power_off()
    assert await other.stop_mining() is False
    assert not fleet.miners[M60].state.sleeping

    # Only the last MAX_TOKENS tokens are valid: the first one is evicted.
    first = await miner.rpc.get_token()
    for _ in range(MAX_TOKENS):
        miner.rpc.token = None
        await miner.rpc.get_token()
    miner.rpc.token = first
    with pytest.raises(APIError, match="check token err"):
        await miner.rpc.power_off()
    miner.rpc.token = None
    assert await miner.stop_mining() is True


async def test_configured_admin_password_is_required(clock: ManualClock) -> None:
    spec = WhatsminerSpec(ip(152, 1), password="hunter2")
    async with WhatsminerFleet([spec], clock=clock) as fleet:
        miner = await get_miner(ip(152, 1))
        assert isinstance(miner, BTMinerV2)
        assert await miner.stop_mining() is False
        assert not fleet.miners[ip(152, 1)].state.sleeping
        miner.rpc.pwd = "hunter2"
        miner.rpc.token = None
        assert await miner.stop_mining() is True
        assert fleet.miners[ip(152, 1)].state.sleeping


# --- control port and CLI ----------------------------------------------------------------


async def test_control_port_validates_before_changing_anything(fleet: WhatsminerFleet) -> None:
    server = await serve_control(fleet, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await control_request(
            port, {"op": "fault", "addresses": [M30], "fault": "slow", "delay_s": 1.5}
        )
        assert ok == {"ok": True}
        bad_requests: list[dict[str, object]] = [
            {"op": "fault", "addresses": [M60, "127.0.0.9"], "fault": "error"},
            {"op": "fault", "address": M60, "fault": "slow", "delay_s": 1e300},
            {"op": "fault", "address": M60, "fault": 3},
            {"op": "state", "address": None},
            {"op": "conf_delay", "address": M60, "delay_s": 1},
        ]
        for bad in bad_requests:
            reply = await control_request(port, bad)
            assert reply["ok"] is False, bad
        assert fleet.truth(M60)["fault"] == "none"
        assert (fleet.truth(M30)["fault"], fleet.truth(M30)["fault_delay_s"]) == ("slow", 1.5)
        state = await control_request(port, {"op": "state", "address": M60})
        assert isinstance(state["state"], dict)
        assert state["state"]["power_w"] == 3344.0
    finally:
        server.close()
        await server.wait_closed()
