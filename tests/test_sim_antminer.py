"""Unmodified pyasic 0.79 against the stock Antminer simulator: identify, read, control, faults."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from pyasic import get_miner, settings
from pyasic.config import MiningModeConfig
from pyasic.miners.antminer.bmminer.X19.S19 import BMMinerS19jPro
from pyasic.miners.antminer.bmminer.X21.S21 import BMMinerS21
from pyasic.network import MinerNetwork

from simulators.antminer import (
    MODE_LOW,
    AntminerFleet,
    AntminerSpec,
    antminer_specs,
    low_power_profile,
)
from simulators.common import serve_control
from simulators.luxos import control_request
from simulators.luxos_model import S19J_PRO, ManualClock, Timing
from tests.loopback import NET, ip, subnet
from tests.servers import PORT_80, await_listening, connect_as_it_closes, started_or_skip

ROOT = Path(__file__).resolve().parent.parent
BASE = ip(140, 1)
S19 = ip(140, 1)
S21_ADDR = ip(140, 2)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleet(clock: ManualClock) -> AsyncIterator[AntminerFleet]:
    f = AntminerFleet(antminer_specs(10, BASE), clock=clock, timing=Timing(10.0, 2.0, 1.0))
    async with started_or_skip(f, PORT_80):
        yield f


@pytest.fixture
def short_web_timeout() -> Iterator[None]:
    """pyasic's web POST timeout (a global setting) lowered so slow answers are quick to test."""
    before = settings.get("api_function_timeout", 5)
    settings.update("api_function_timeout", 1)
    try:
        yield
    finally:
        settings.update("api_function_timeout", before)


async def test_get_miner_identifies_stock_firmware_and_model(fleet: AntminerFleet) -> None:
    s19 = await get_miner(S19)
    s21 = await get_miner(S21_ADDR)
    assert isinstance(s19, BMMinerS19jPro)
    assert isinstance(s21, BMMinerS21)


async def test_subnet_scan_finds_exactly_the_simulated_miners(fleet: AntminerFleet) -> None:
    found = await MinerNetwork.from_subnet(subnet(140, 28)).scan()
    assert sorted(str(m.ip) for m in found) == sorted(fleet.addresses)
    assert all(isinstance(m, BMMinerS19jPro | BMMinerS21) for m in found)


async def test_get_data_matches_true_state_and_has_no_power_reading(
    fleet: AntminerFleet,
) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    data = await miner.get_data()
    truth = fleet.truth(S19)
    assert data.model == "S19j Pro"
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(truth["hashrate_ths"], rel=1e-3)
    assert data.expected_hashrate is not None
    assert float(data.expected_hashrate) == pytest.approx(104.0)
    assert data.wattage is None  # stock firmware has no power reading
    assert data.wattage_limit is None
    assert data.is_mining is True
    assert len(data.hashboards) == 3
    board_temps = sorted(h.temp for h in data.hashboards if h.temp is not None)
    chip_temps = sorted(h.chip_temp for h in data.hashboards if h.chip_temp is not None)
    assert board_temps[1] == pytest.approx(float(str(truth["pcb_c"])) + 1, abs=1.0)
    # Stock chip sensors read their PCB sensor + 5 °C, as in the recording.
    assert chip_temps[1] == pytest.approx(float(str(truth["pcb_c"])) + 1 + 5, abs=1.0)
    assert sum(float(h.hashrate or 0) for h in data.hashboards) == pytest.approx(104.0, rel=1e-3)
    assert all(h.chips == S19J_PRO.chips_per_board for h in data.hashboards)
    assert len(data.fans) == 4
    assert all(f.speed and f.speed > 1000 for f in data.fans)
    # Derived from the address (127.NET.140.1), as the simulator documents.
    assert data.mac == f"02:42:4D:{NET:02X}:8C:01"
    assert data.serial_number == f"SIM{NET:03d}140001"
    assert data.hostname == "Antminer"
    assert data.fw_ver == "Tue Dec  6 16:12:30 CST 2022"
    assert [p.url is not None for p in data.pools] == [True, True, True]


async def test_stop_and_resume_through_miner_mode(fleet: AntminerFleet, clock: ManualClock) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    assert await miner.stop_mining()
    ep = fleet.miners[S19]
    assert ep.work_mode == 1
    assert ep.state.sleeping
    clock.advance(2.0)
    asleep = await miner.get_data()
    assert asleep.hashrate is not None
    assert float(asleep.hashrate) == 0.0
    assert asleep.is_mining is False
    cfg = await miner.get_config()
    assert cfg.mining_mode == MiningModeConfig.sleep()

    assert await miner.resume_mining()
    assert ep.work_mode == 0
    clock.advance(5.0)  # half the wake ramp
    half = await miner.get_data()
    assert half.hashrate is not None
    assert float(half.hashrate) == pytest.approx(52.0, rel=1e-3)
    clock.advance(5.0)
    awake = await miner.get_data()
    assert awake.is_mining is True
    assert awake.hashrate is not None
    assert float(awake.hashrate) == pytest.approx(104.0, rel=1e-3)


async def test_low_power_mode_is_the_only_power_control(
    fleet: AntminerFleet, clock: ManualClock
) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    # Stock firmware has no power target: pyasic's set_power_limit says so and changes nothing.
    assert await miner.set_power_limit(2000) is False
    assert fleet.miners[S19].work_mode == 0
    cfg = await miner.get_config()
    cfg.mining_mode = MiningModeConfig.low()
    await miner.send_config(cfg)
    ep = fleet.miners[S19]
    assert ep.work_mode == MODE_LOW
    low = S19J_PRO.profile(low_power_profile(S19J_PRO))
    clock.advance(1.0)
    assert fleet.truth(S19)["power_w"] == low.power_w
    data = await miner.get_data()
    assert data.is_mining is True
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(low.hashrate_ths, rel=1e-3)
    assert (await miner.get_config()).mining_mode == MiningModeConfig.low()


async def test_slow_set_miner_conf_times_out_in_pyasic_but_applies(
    fleet: AntminerFleet, short_web_timeout: None
) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    fleet.set_conf_delay(S19, 3.0)
    started = time.monotonic()
    reply = await miner.web.set_miner_conf({"miner-mode": 1})
    waited = time.monotonic() - started
    # pyasic gives up after its web timeout and reports failure ...
    assert reply["success"] is False
    assert 0.9 <= waited < 3.0
    # ... yet the firmware saved the config and is going to sleep, as real stock firmware does.
    assert fleet.miners[S19].state.sleeping
    # And stop_mining() reports True whatever the answer was: only telemetry can confirm.
    fleet.set_fault(S19, "reboot", 0.0)
    await await_listening(S19, 80)
    assert await miner.stop_mining() is True


async def test_bad_set_miner_conf_is_refused_and_changes_nothing(fleet: AntminerFleet) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    for bad in ({"miner-mode": 7}, {"miner-mode": True}, {"pools": "x"}, {"pools": [1]}):
        reply = await miner.web.set_miner_conf(bad)
        assert reply == {"stats": "error", "code": "M001", "msg": reply["msg"]}
    assert fleet.miners[S19].conf_writes == 0
    assert not fleet.miners[S19].state.sleeping


async def test_digest_auth_is_enforced_with_the_configured_password(clock: ManualClock) -> None:
    spec = AntminerSpec(ip(142, 1), password="s3cret")
    fleet = AntminerFleet([spec], clock=clock)
    try:
        await fleet.start()
    except PermissionError:
        pytest.skip("binding port 80 (the Antminer web API) needs root")
    try:
        url = f"http://{ip(142, 1)}/cgi-bin/get_system_info.cgi"
        async with httpx.AsyncClient(timeout=5) as client:
            anon = await client.get(url)
            assert anon.status_code == 401
            assert 'realm="antMiner Configuration"' in anon.headers["www-authenticate"]
            wrong = await client.get(url, auth=httpx.DigestAuth("root", "root"))
            assert wrong.status_code == 401
            right = await client.get(url, auth=httpx.DigestAuth("root", "s3cret"))
            assert right.status_code == 200
            assert right.json()["minertype"] == "Antminer S19j Pro"
        # pyasic with its default password sees no model from the web, but still from the RPC.
        miner = await get_miner(ip(142, 1))
        assert isinstance(miner, BMMinerS19jPro)
        data = await miner.get_data()
        assert data.serial_number is None
    finally:
        await fleet.stop()


# --- faults ------------------------------------------------------------------------------


# --- control port and CLI ----------------------------------------------------------------


async def test_control_port_validates_every_field_before_changing_anything(
    fleet: AntminerFleet,
) -> None:
    server = await serve_control(fleet, 0, extra_ops=fleet.control_ops())
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await control_request(
            port, {"op": "fault", "address": S19, "fault": "slow", "delay_s": 0.25}
        )
        assert ok == {"ok": True}
        bad_requests: list[dict[str, object]] = [
            {"op": "fault", "addresses": [S21_ADDR, "127.99.0.1"], "fault": "hang"},
            {"op": "fault", "address": S21_ADDR, "fault": "melt"},
            {"op": "fault", "address": S21_ADDR, "fault": "slow", "delay_s": float("inf")},
            {"op": "fault", "address": S21_ADDR, "fault": "slow", "delay_s": -1},
            {"op": "fault", "address": S21_ADDR, "fault": "slow", "delay_s": "1"},
            {"op": "fault", "address": S21_ADDR, "fault": "slow", "delay_s": True},
            {"op": "fault", "address": S21_ADDR},
            {"op": "fault", "addresses": S21_ADDR, "fault": "hang"},
            {"op": "conf_delay", "address": S21_ADDR, "delay_s": 1e9},
            {"op": "explode"},
        ]
        for bad in bad_requests:
            reply = await control_request(port, bad)
            assert reply["ok"] is False, bad
            assert reply["error"], bad
        # NaN is not JSON: send it raw, as a hostile client would.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        nan = f'{{"op": "fault", "address": "{ip(140, 2)}", "fault": "slow", "delay_s": NaN}}\n'
        writer.write(nan.encode())
        writer.write(b"[" * 100_000 + b"\n")
        await writer.drain()
        nan_reply = json.loads(await reader.readline())
        deep_reply = json.loads(await reader.readline())
        writer.close()
        assert nan_reply["ok"] is False
        assert deep_reply["ok"] is False
        assert fleet.truth(S21_ADDR)["fault"] == "none"
        assert fleet.truth(S21_ADDR)["conf_delay_s"] == 0.2
        # The slow miner's timer was not disturbed by any of that.
        assert fleet.truth(S19)["fault"] == "slow"
        assert fleet.truth(S19)["fault_delay_s"] == 0.25
        delayed = await control_request(
            port, {"op": "conf_delay", "address": S21_ADDR, "delay_s": 20}
        )
        assert delayed == {"ok": True}
        assert fleet.truth(S21_ADDR)["conf_delay_s"] == 20.0
        states = await control_request(port, {"op": "states"})
        assert isinstance(states["states"], list)
        assert len(states["states"]) == 10
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("moment", ["accept-task", "transport-pending"])
@pytest.mark.parametrize("port", ["rpc", "web"])
async def test_a_connection_accepted_as_the_miner_reboots_is_dropped(
    fleet: AntminerFleet, port: str, moment: str
) -> None:
    """Both listeners of a stock Antminer, the CGMiner RPC and the web UI (whose protocol the
    simulator counts itself), drop a client accepted just as the miner goes down, and leave no
    socket behind (CPython 3.11's accept race; see ``simulators.common.close_listener``)."""
    miner = fleet.endpoint(ip(140, 3))
    if port == "rpc":
        at, request = miner.spec.rpc_port, b'{"command": "version"}'
    else:
        at, request = miner.spec.web_port, b"GET /cgi-bin/get_miner_conf.cgi HTTP/1.1\r\n\r\n"

    async def close() -> None:
        miner.close()  # what a reboot does first

    await connect_as_it_closes(miner.address, at, request, miner.connections, close, moment)
