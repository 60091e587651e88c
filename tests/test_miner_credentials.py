"""Login tokens kept warm: a spike's commands go out without a login first.

BOS+ (gRPC token) and Whatsminer (btminer token) drivers renew a missing or half-spent token
ahead of need (``PyasicMiner.prepare``), and the miner fleet does it in the background
(``MinerFleet.run``), a bounded number per poll interval. LuxOS never holds its one session
ahead of need (a technician would be locked out). A renewal that fails changes nothing and
never ends the task. Real simulators on loopback, unmodified pyasic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from agent.control.config import parse_config
from agent.runtime.miner_fleet import MinerFleet
from agent.runtime.wiring import build_miners
from drivers.errors import AuthFailed
from drivers.miners.pyasic_driver import Family, PyasicMiner, prepare_fleet
from simulators.braiins import BraiinsFleet
from simulators.luxos import LuxosFleet, fleet_specs
from simulators.luxos_model import S19J_PRO, Timing
from simulators.whatsminer import WhatsminerFleet, whatsminer_specs
from simulators.whatsminer_replies import M30S_PLUS_V40
from tests.loopback import ip

pytestmark = pytest.mark.filterwarnings(
    "ignore:passing settings to md5_crypt.hash:DeprecationWarning"
)

BOS = [ip(190, 1), ip(190, 2)]
WM = [ip(190, 11), ip(190, 12)]
LUX = ip(190, 21)
TIMING = Timing(wake_ramp_s=0.2, sleep_ramp_s=0.1, profile_ramp_s=0.1)


@pytest.fixture
async def sims() -> AsyncIterator[tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet]]:
    async with (
        BraiinsFleet(fleet_specs(2, BOS[0]), timing=TIMING, password="root") as bos,
        WhatsminerFleet(whatsminer_specs(2, WM[0]), timing=TIMING) as wm,
        LuxosFleet(fleet_specs(1, LUX), timing=TIMING) as lux,
    ):
        yield bos, wm, lux


def driver(address: str, firmware: str, password: str) -> PyasicMiner:
    user = "admin" if firmware == "whatsminer" else "root"
    return PyasicMiner.for_firmware(
        address,
        firmware,
        asyncio.Semaphore(8),
        timeout_s=2.0,
        credentials=(user, password),
    )


async def test_a_prepared_miner_sleeps_without_logging_in(
    sims: tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet],
) -> None:
    bos, wm, _ = sims
    b = driver(BOS[0], "braiins", "root")
    w = driver(WM[0], "whatsminer", "admin")
    await b.read()
    await w.read()
    assert b.credential_stale()
    assert w.credential_stale()

    await b.prepare()
    await w.prepare()
    assert not b.credential_stale()
    assert not w.credential_stale()
    assert bos.endpoint(BOS[0]).logins == 1
    assert len(wm.endpoint(WM[0]).tokens) == 1

    await b.prepare()  # fresh: nothing to do
    await w.prepare()
    assert bos.endpoint(BOS[0]).logins == 1
    assert len(wm.endpoint(WM[0]).tokens) == 1

    await b.sleep()
    await w.sleep()
    assert bos.miners[BOS[0]].sleeping
    assert wm.truth(WM[0])["sleeping"]
    # The commands used the renewed tokens: no login and no new token on the spike's path.
    assert bos.endpoint(BOS[0]).logins == 1
    assert len(wm.endpoint(WM[0]).tokens) == 1


async def test_a_half_spent_whatsminer_token_is_renewed(
    sims: tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet],
) -> None:
    _, wm, _ = sims
    w = driver(WM[1], "whatsminer", "admin")
    await w.read()
    await w.prepare()
    token: Any = w.pyasic_miner.rpc.token
    first = token.host_sign
    # pyasic stamps the token with the (naive) local time it was issued: 16 minutes ago now.
    token.timestamp -= timedelta(minutes=16)
    assert w.credential_stale()
    await w.prepare()
    assert not w.credential_stale()
    assert len(wm.endpoint(WM[1]).tokens) == 2
    await w.sleep()
    assert wm.truth(WM[1])["sleeping"]
    assert w.pyasic_miner.rpc.token.host_sign != first


async def test_luxos_holds_no_session_ahead_of_need(
    sims: tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet],
) -> None:
    _, _, lux = sims
    m = PyasicMiner.luxos(LUX, asyncio.Semaphore(4), timeout_s=2.0)
    await m.read()
    assert m.family is Family.LUXOS
    assert not m.credential_stale()
    await m.prepare()
    assert lux.miners[LUX].session_holder() == ""  # a technician can still log on


async def test_a_refused_login_is_an_error_and_changes_nothing(
    sims: tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet],
) -> None:
    bos, _, _ = sims
    b = driver(BOS[1], "braiins", "wrong")
    await b.read()  # the cgminer API needs no login: the miner answers
    result = await prepare_fleet([b], most=10)
    error = result[b.device_id]
    assert isinstance(error, AuthFailed)
    assert "login" in error.message
    assert b.credential_stale()  # still nothing held: the next command logs in itself
    assert bos.endpoint(BOS[1]).logins == 0
    assert not bos.miners[BOS[1]].sleeping


def site(poll_s: float) -> Any:
    whatsminer = {
        "standby_w": M30S_PLUS_V40.standby_w,
        "nameplate_w": M30S_PLUS_V40.nameplate_w,
        "profiles": [
            {"name": f"{p.power_w:.0f}W", "power_w": p.power_w, "hashrate_ths": p.hashrate_ths}
            for p in M30S_PLUS_V40.profiles
        ],
    }

    def line(i: str, address: str, model: str, user: str, pw: str) -> dict[str, Any]:
        return {
            "id": i,
            "address": address,
            "model": model,
            "firmware": "auto",
            "credentials": {"username": user, "password": pw},
        }

    return parse_config(
        {
            "site": {"id": "creds", "interconnect_limit_kw": 40},
            "control": {"poll_interval_s": poll_s, "device_timeout_s": 2},
            "economics": {"hashprice": {"usd_per_ph_day": 55}},
            "metrics": {"enabled": False, "port": 0},
            "prices": {"realtime": {"type": "constant", "value": 40.0}},
            "miner_models": {"S19jPro": S19J_PRO.site_config(), "M30S": whatsminer},
            "miners": [
                line("bos-good", BOS[0], "S19jPro", "root", "root"),
                line("bos-bad", BOS[1], "S19jPro", "root", "wrong"),
                line("wm-1", WM[0], "M30S", "admin", "admin"),
                line("wm-2", WM[1], "M30S", "admin", "admin"),
                {"id": "lux", "address": LUX, "model": "S19jPro", "firmware": "luxos"},
            ],
        }
    )


async def test_the_miner_fleet_renews_tokens_in_the_background(
    sims: tuple[BraiinsFleet, WhatsminerFleet, LuxosFleet],
) -> None:
    bos, wm, lux = sims
    config = site(poll_s=0.2)
    drivers = build_miners(config)
    fleet = MinerFleet(config, drivers)
    assert await fleet.poll() is None  # every miner answers (the cgminer APIs need no login)
    good = [drivers[d] for d in ("bos-good", "wm-1", "wm-2")]
    assert all(isinstance(d, PyasicMiner) and d.credential_stale() for d in good)

    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    deadline = time.monotonic() + 15.0
    while any(isinstance(d, PyasicMiner) and d.credential_stale() for d in good):
        assert time.monotonic() < deadline, "tokens not renewed in the background"
        assert not task.done(), task
        await asyncio.sleep(0.05)
    assert not task.done(), task  # the refused login (in the same round) ended nothing
    stop.set()
    await asyncio.wait_for(task, 10)  # a round in flight finishes before the task ends
    # The refused login was tried once, and is not tried again before fault_retry_s (300 s by
    # default): a wrong password is not hammered every round.
    assert bos.endpoint(BOS[1]).refused_logins == 1
    assert await fleet.renew_credentials() == 0
    assert bos.endpoint(BOS[1]).refused_logins == 1
    bad = drivers["bos-bad"]
    assert isinstance(bad, PyasicMiner)
    assert bad.credential_stale()
    assert bos.endpoint(BOS[0]).logins == 1
    assert bos.endpoint(BOS[1]).logins == 0
    assert [len(wm.endpoint(a).tokens) for a in WM] == [1, 1]
    assert lux.miners[LUX].session_holder() == ""
    # Nothing was actuated by the renewal.
    assert not any(bos.miners[a].sleeping for a in BOS)
    assert not any(wm.truth(a)["sleeping"] for a in WM)
