"""Fault kinds of the stock Antminer and Whatsminer simulators, one test per kind over both.

Each test injects one fault kind (``hang``, ``slow``, ``garbage``, ``error``, ``ignore``,
``reboot``) and checks what unmodified pyasic 0.79 sees; a :class:`Family` row holds what
differs between the firmwares: their listening ports, the reading that proves a healthy answer,
the error text, and the checks only one firmware has (the Antminer web API, Whatsminer tokens).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pyasic import APIError, get_miner
from pyasic.config import MiningModeConfig
from pyasic.miners.backends.btminer import BTMinerV2

from simulators.antminer import AntminerFleet, antminer_specs
from simulators.common import SimFleet
from simulators.luxos_model import ManualClock, Timing
from simulators.whatsminer import WhatsminerFleet, whatsminer_specs
from tests.loopback import ip
from tests.servers import PORT_80, await_listening, started_or_skip

# pyasic's token code calls passlib in a way passlib deprecates (the Whatsminer rows); under
# -W error that would turn every privileged command into an exception.
pytestmark = pytest.mark.filterwarnings(
    "ignore:passing settings to md5_crypt.hash:DeprecationWarning"
)

Miner = Any  # a pyasic miner object (pyasic's classes are untyped)
Check = Callable[[Miner, Any], Awaitable[None]]
# One read of one API, and what proves its reply correct on the first (idle, default) miner.
Read = tuple[Callable[[Miner], Awaitable[Any]], Callable[[Any], bool]]


async def _nothing(miner: Miner, fleet: Any) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """What one firmware's simulator answers under each fault, as pyasic sees it."""

    name: str
    address: str
    fleet: Callable[[], SimFleet[Any]]
    ports: tuple[int, ...]
    reads: tuple[Read, ...]  # every API the firmware serves, the RPC first
    garbage_match: str | None  # pyasic's error text for a garbled RPC reply
    error_match: str  # pyasic's error text for the firmware's error status
    stop_under_error: bool  # what pyasic's stop_mining() reports to an erroring miner
    ignored: Callable[[Miner, Any], Awaitable[None]]  # commands answered OK, then the truth
    garbled: Check = _nothing  # more checks under "garbage"
    errored: Check = _nothing  # more checks under "error"
    before_reboot: Check = _nothing  # a change the reboot must undo
    rebooted: Check = _nothing  # more checks once the miner is back


def _antminer_fleet() -> SimFleet[Any]:
    specs = antminer_specs(10, ip(140, 1))
    return AntminerFleet(specs, clock=ManualClock(), timing=Timing(10.0, 2.0, 1.0))


def _whatsminer_fleet() -> SimFleet[Any]:
    specs = whatsminer_specs(10, ip(150, 1))
    return WhatsminerFleet(specs, clock=ManualClock(), timing=Timing(10.0, 2.0, 1.0))


async def _antminer_ignored(miner: Miner, fleet: Any) -> None:
    reply = await miner.web.set_miner_conf({"miner-mode": 1})
    assert reply == {"stats": "success", "code": "M000", "msg": "OK!"}
    assert await miner.stop_mining() is True
    ep = fleet.miners[miner.ip]
    assert (ep.work_mode, ep.state.sleeping, ep.conf_writes) == (0, False, 0)


async def _antminer_web_refuses(miner: Miner, fleet: Any) -> None:
    assert (await miner.web.get_miner_conf())["success"] is False


async def _antminer_web_garbled(miner: Miner, fleet: Any) -> None:
    reply = await miner.web.get_miner_conf()
    assert reply["success"] is False
    assert "HTTP error" in reply["message"]


async def _antminer_sleeps(miner: Miner, fleet: Any) -> None:
    assert await miner.stop_mining()


async def _antminer_mines_normally(miner: Miner, fleet: Any) -> None:
    assert fleet.truth(miner.ip)["work_mode"] == 0
    assert (await miner.get_config()).mining_mode == MiningModeConfig.normal()


async def _whatsminer_ignored(miner: Miner, fleet: Any) -> None:
    assert await miner.stop_mining() is True
    assert await miner.set_power_limit(2000) is True
    truth = fleet.truth(miner.ip)
    assert (truth["sleeping"], truth["power_limit_w"], truth["privileged_ok"]) == (False, 3800, 0)


async def _whatsminer_garbled(miner: Miner, fleet: Any) -> None:
    assert await miner.stop_mining() is False


async def _whatsminer_limits(miner: Miner, fleet: Any) -> None:
    assert await miner.set_power_limit(2500)


async def _whatsminer_forgot_tokens(miner: Miner, fleet: Any) -> None:
    assert fleet.truth(miner.ip)["power_limit_w"] == 3800
    # The miner forgot its tokens; pyasic keeps its cached one for 30 minutes and fails ...
    assert await miner.stop_mining() is False
    # ... until the client drops it and asks for a new one.
    assert isinstance(miner, BTMinerV2)
    miner.rpc.token = None
    assert await miner.stop_mining() is True


ANTMINER = Family(
    name="antminer",
    address=ip(140, 1),
    fleet=_antminer_fleet,
    ports=(4028, 80),
    reads=(
        (lambda m: m.rpc.summary(), lambda r: r["SUMMARY"][0]["GHS 5s"] == pytest.approx(104000.0)),
        (lambda m: m.web.get_miner_conf(), lambda r: r["bitmain-work-mode"] == "0"),
    ),
    garbage_match=None,  # pyasic's message names the bytes it could not read
    error_match="Access denied",
    stop_under_error=True,  # pyasic does not look at the web API's answer
    ignored=_antminer_ignored,
    garbled=_antminer_web_garbled,
    errored=_antminer_web_refuses,
    before_reboot=_antminer_sleeps,
    rebooted=_antminer_mines_normally,
)
WHATSMINER = Family(
    name="whatsminer",
    address=ip(150, 1),
    fleet=_whatsminer_fleet,
    ports=(4028,),
    reads=((lambda m: m.rpc.summary(), lambda r: r["SUMMARY"][0]["Power"] == 3400),),
    garbage_match="Decode Error",
    error_match="Permission denied",
    stop_under_error=False,
    ignored=_whatsminer_ignored,
    garbled=_whatsminer_garbled,
    before_reboot=_whatsminer_limits,
    rebooted=_whatsminer_forgot_tokens,
)


@pytest.fixture(params=[ANTMINER, WHATSMINER], ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> Family:
    value: Family = request.param
    return value


@pytest.fixture
async def fleet(family: Family) -> AsyncIterator[SimFleet[Any]]:
    f = family.fleet()
    async with started_or_skip(f, PORT_80):
        yield f


async def _miner(family: Family) -> Miner:
    miner = await get_miner(family.address)
    assert miner is not None
    return miner


# pyasic's RPC transport does not close its socket when a call is cancelled by a timeout, so the
# garbage collector reports the leak; that is pyasic's defect (a driver needs its own transport).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_hang_times_out_on_every_api(family: Family, fleet: SimFleet[Any]) -> None:
    miner = await _miner(family)
    fleet.set_fault(family.address, "hang")
    for read, _ in family.reads:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read(miner), 1.0)
    fleet.set_fault(family.address, "none")
    for read, correct in family.reads:
        assert correct(await read(miner))


async def test_slow_answers_correctly_after_the_delay(family: Family, fleet: SimFleet[Any]) -> None:
    miner = await _miner(family)
    fleet.set_fault(family.address, "slow", 0.4)
    started = time.monotonic()
    for read, correct in family.reads:
        assert correct(await read(miner))
    assert time.monotonic() - started >= 0.4 * len(family.reads)


async def test_garbage_becomes_an_error(family: Family, fleet: SimFleet[Any]) -> None:
    miner = await _miner(family)
    fleet.set_fault(family.address, "garbage")
    with pytest.raises(APIError, match=family.garbage_match):
        await miner.rpc.summary()
    await family.garbled(miner, fleet)


async def test_error_answers_the_firmwares_error_status(
    family: Family, fleet: SimFleet[Any]
) -> None:
    miner = await _miner(family)
    fleet.set_fault(family.address, "error")
    with pytest.raises(APIError, match=family.error_match):
        await miner.rpc.summary()
    await family.errored(miner, fleet)
    assert await miner.stop_mining() is family.stop_under_error
    assert not fleet.miners[family.address].state.sleeping


async def test_ignore_answers_ok_and_changes_nothing(family: Family, fleet: SimFleet[Any]) -> None:
    miner = await _miner(family)
    fleet.set_fault(family.address, "ignore")
    await family.ignored(miner, fleet)


async def test_reboot_drops_every_port_then_returns_in_boot_state(
    family: Family, fleet: SimFleet[Any]
) -> None:
    miner = await _miner(family)
    await family.before_reboot(miner, fleet)
    fleet.set_fault(family.address, "reboot", 0.5)
    for port in family.ports:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(family.address, port)
    # pyasic's RPC turns a refused connection into an empty reply ("no data"), not an error.
    assert await miner.rpc.summary() == {}
    for port in family.ports:
        await await_listening(family.address, port)
    truth = fleet.truth(family.address)
    assert (truth["sleeping"], truth["fault"]) == (False, "none")
    await family.rebooted(miner, fleet)
