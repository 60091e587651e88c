"""Unmodified pyasic against the Braiins OS+ simulator: identification, data, control, faults."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from pyasic import APIError, get_miner
from pyasic.miners.antminer.bosminer.X19.S19 import BOSMinerS19jPro
from pyasic.miners.antminer.bosminer.X21.S21 import BOSMinerS21
from pyasic.network import MinerNetwork
from pyasic.web.braiins_os.proto.braiins.bos.v1 import (
    ActionsServiceStub,
    GetMinerStatsRequest,
    MinerServiceStub,
    PauseMiningRequest,
)

from simulators.braiins import GRPC_PORT, BraiinsFleet, power_range
from simulators.luxos import control_request, fleet_specs, serve_control
from simulators.luxos_model import TARGET_DRAW_RATIO, FaultKind, ManualClock, Timing
from tests.loopback import ip, subnet
from tests.servers import accept_task_pending

ROOT = Path(__file__).resolve().parent.parent
BASE = ip(141, 1)
S19 = ip(141, 1)  # round-robin models: odd hosts S19j Pro, even hosts S21
S21 = ip(141, 2)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleet(clock: ManualClock) -> AsyncIterator[BraiinsFleet]:
    async with BraiinsFleet(fleet_specs(4, BASE), clock=clock, timing=Timing(10.0, 2.0, 1.0)) as f:
        yield f


async def test_get_miner_identifies_braiins_os_plus_and_the_model(fleet: BraiinsFleet) -> None:
    assert isinstance(await get_miner(S19), BOSMinerS19jPro)
    assert isinstance(await get_miner(S21), BOSMinerS21)


async def test_subnet_scan_finds_exactly_the_simulated_miners(fleet: BraiinsFleet) -> None:
    found = await MinerNetwork.from_subnet(subnet(141, 29)).scan()
    assert sorted(str(m.ip) for m in found) == sorted(fleet.addresses)
    assert all(type(m).__name__.startswith("BOSMiner") for m in found)


async def test_get_data_reads_approximated_consumption_and_the_target(
    fleet: BraiinsFleet,
) -> None:
    miner = await get_miner(S21)
    assert miner is not None
    data = await miner.get_data()
    default_w = power_range("s21").default_w
    assert data.wattage == round(default_w * TARGET_DRAW_RATIO)
    assert data.wattage_limit == default_w
    assert data.hashrate is not None
    assert float(data.hashrate) == pytest.approx(200.0, rel=1e-3)
    assert data.is_mining
    assert data.fw_ver == "26.04"
    assert len(data.hashboards) == 3
    assert all(h.temp is not None and 40 < h.temp < 60 for h in data.hashboards)
    assert len(data.fans) == 4
    assert data.pools
    assert data.pools[0].user == "site.worker"


async def test_pause_and_resume_follow_the_physics(fleet: BraiinsFleet, clock: ManualClock) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    assert await miner.stop_mining()
    assert fleet.miners[S19].sleeping
    clock.advance(2.0)
    data = await miner.get_data()
    assert data.wattage == fleet.miners[S19].model.standby_w
    assert data.is_mining is False
    assert await miner.resume_mining()
    clock.advance(10.0)
    assert (await miner.get_data()).is_mining


async def test_power_target_in_range_is_applied_and_out_of_range_refused(
    fleet: BraiinsFleet, clock: ManualClock
) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    assert await miner.set_power_limit(2000)
    assert fleet.miners[S19].power_target_w == 2000
    clock.advance(1.0)
    assert (await miner.get_data()).wattage == round(2000 * TARGET_DRAW_RATIO)
    # Out of range: pyasic says only False; the firmware's status and message are underneath.
    assert not await miner.set_power_limit(100)
    with pytest.raises(APIError) as caught:
        await miner.web.set_power_target(100)
    cause = caught.value.__cause__
    assert isinstance(cause, GRPCError)
    assert cause.status is Status.INVALID_ARGUMENT
    r = power_range("s19jpro")
    assert cause.message == f"power target [100W] is not in allowed range [{r.min_w}, {r.max_w}]"
    assert fleet.miners[S19].power_target_w == 2000  # unchanged


async def test_every_call_but_login_needs_the_token(fleet: BraiinsFleet) -> None:
    async with Channel(S19, GRPC_PORT) as channel:
        with pytest.raises(GRPCError) as caught:
            await MinerServiceStub(channel).get_miner_stats(GetMinerStatsRequest())
        assert caught.value.status is Status.UNAUTHENTICATED
        with pytest.raises(GRPCError):
            await ActionsServiceStub(channel).pause_mining(
                PauseMiningRequest(), metadata=[("authorization", "forged")]
            )
    assert not fleet.miners[S19].sleeping


async def test_wrong_password_is_refused(clock: ManualClock) -> None:
    async with BraiinsFleet(fleet_specs(1, ip(142, 1)), clock=clock, password="s3cret") as f:
        miner = await get_miner(ip(142, 1))
        assert miner is not None
        # pyasic logs in as root/root, and its login runs outside its own error wrapping:
        # the refusal arrives as grpclib's error, not as pyasic's APIError or False.
        with pytest.raises(GRPCError) as caught:
            await miner.stop_mining()
        assert caught.value.status is Status.UNAUTHENTICATED
        assert not f.miners[ip(142, 1)].sleeping
        miner.web.pwd = "s3cret"
        assert await miner.stop_mining()
        assert f.miners[ip(142, 1)].sleeping


async def _rpc(address: str, command: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(address, 4028)
    try:
        writer.write(command)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("kind", "grpc_status"),
    [
        (FaultKind.HANG, None),
        (FaultKind.SLOW, None),
        (FaultKind.GARBAGE, Status.UNKNOWN),
        (FaultKind.ERROR, Status.INTERNAL),
    ],
)
async def test_faults_on_both_ports(
    fleet: BraiinsFleet, kind: FaultKind, grpc_status: Status | None
) -> None:
    fleet.set_fault(S21, kind, 2.0)
    t0 = time.perf_counter()
    async with Channel(S21, GRPC_PORT) as channel:
        if grpc_status is None:  # hang and slow (2 s): nothing within a second
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await MinerServiceStub(channel).get_miner_stats(GetMinerStatsRequest())
        else:
            with pytest.raises(GRPCError) as caught:
                await MinerServiceStub(channel).get_miner_stats(GetMinerStatsRequest())
            assert caught.value.status is grpc_status
    if grpc_status is None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await _rpc(S21, b'{"command":"summary"}')
    elif kind is FaultKind.GARBAGE:
        with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
            json.loads(await _rpc(S21, b'{"command":"summary"}'))
    else:
        reply = json.loads(await _rpc(S21, b'{"command":"summary"}'))
        assert reply["STATUS"][0]["STATUS"] == "E"
    assert time.perf_counter() - t0 < 3.0
    fleet.set_fault(S21, FaultKind.NONE)
    reply = json.loads(await _rpc(S21, b'{"command":"summary"}'))
    assert reply["SUMMARY"][0]["MHS 1m"] > 0


async def test_ignore_fault_answers_success_and_changes_nothing(fleet: BraiinsFleet) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    fleet.set_fault(S19, FaultKind.IGNORE)
    assert await miner.stop_mining()
    assert not fleet.miners[S19].sleeping


async def test_reboot_closes_both_ports_then_boots_on_the_default_target(
    fleet: BraiinsFleet,
) -> None:
    miner = await get_miner(S19)
    assert miner is not None
    assert await miner.set_power_limit(2000)
    fleet.set_fault(S19, FaultKind.REBOOT, 0.3)
    await asyncio.sleep(0.05)
    with pytest.raises(APIError):
        await miner.web.get_miner_stats()
    deadline = time.monotonic() + 5
    while True:
        try:
            stats = await miner.web.get_miner_stats()
            break
        except APIError:
            assert time.monotonic() < deadline, "the miner never came back"
            await asyncio.sleep(0.1)
    assert stats["powerStats"]["approximatedConsumption"]["watt"] == round(
        power_range("s19jpro").default_w * TARGET_DRAW_RATIO
    )


async def test_control_port_drives_the_braiins_fleet(fleet: BraiinsFleet) -> None:
    server = await serve_control(fleet, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await control_request(port, {"op": "fault", "address": S21, "fault": "error"})
        assert ok == {"ok": True}
        state = await control_request(port, {"op": "state", "address": S21})
        assert isinstance(state["state"], dict)
        assert state["state"]["fault"] == "error"
        assert state["state"]["power_target_w"] == power_range("s21").default_w
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_grpc_connection_accepted_as_the_miner_goes_down_leaks_no_socket(
    fleet: BraiinsFleet,
) -> None:
    """grpclib's listener has asyncio's accept race too (see the LuxOS simulator's test): a
    client accepted just before a reboot closes the gRPC server must not leave a half-built
    transport holding its socket (grpclib, unlike the RPC listener, keeps an idle connection
    until its client leaves, as it does for any connection)."""
    address = ip(141, 3)
    miner = fleet.endpoint(address)
    loop = asyncio.get_running_loop()
    client = socket.create_connection((address, GRPC_PORT), timeout=10)
    try:
        deadline = loop.time() + 10.0
        while not accept_task_pending():
            assert loop.time() < deadline, "asyncio never accepted the connection"
            await asyncio.sleep(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            closing = miner.close()  # what a reboot does first
            assert closing is not None
            await closing
            gc.collect()  # a half-built transport would warn here
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert leaked == []
    finally:
        client.close()


def test_site_agent_sim_serves_a_mixed_fleet_pyasic_tells_apart() -> None:
    if os.geteuid() != 0:
        pytest.skip("the stock Antminer's web API needs port 80 (root)")
    mix = "luxos=2,antminer=1,braiins=2,whatsminer=1"
    with subprocess.Popen(
        [sys.executable, "-m", "agent.cli.main", "sim", "--mix", mix, "--base", ip(145, 1)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            rows = [json.loads(proc.stdout.readline()) for _ in range(7)]
            families = [r.get("firmware") for r in rows[:6]]
            assert families == ["luxos", "luxos", "antminer", "braiins", "braiins", "whatsminer"]
            assert rows[6]["event"] == "ready"
            assert rows[6]["miners"] == 6

            async def identify() -> list[str]:
                found = await asyncio.gather(*(get_miner(r["address"]) for r in rows[:6]))
                return [type(m).__mro__[1].__name__ for m in found]

            backends = asyncio.run(identify())
            assert backends[0] == backends[1] == "LUXMiner"
            assert backends[2] == "AntminerModern"
            assert backends[3] == backends[4] == "BOSer"
            assert backends[5].startswith("BTMiner")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


def test_site_agent_sim_refuses_a_bad_mix() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli.main", "sim", "--mix", "luxos=2,vnish=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "'vnish=3' is not FAMILY=COUNT" in done.stderr
    assert "Traceback" not in done.stderr
