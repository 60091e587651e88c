"""One miner driver, every family it can reach here: LuxOS and Braiins OS+ through pyasic.

Each family is driven against its simulator over real sockets with unmodified pyasic:
identification (``firmware: auto`` and subnet scan), a reading, sleep, wake, the family's power
control mapped onto the site ladder, every fault kind, and each family's quirk: LuxOS and
Braiins OS+ here, and the stock Antminer and Whatsminer simulators from the ``families`` work
(the Antminer's web API needs port 80, so root).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from drivers.errors import (
    AuthFailed,
    BadReply,
    CommandNotApplied,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    SessionHeld,
    Unsupported,
)
from drivers.miners.base import MinerCapability, MinerMode, MinerProfile
from drivers.miners.pyasic_driver import Family, PyasicMiner, scan_subnet
from simulators.antminer import AntminerFleet, antminer_specs
from simulators.braiins import BraiinsFleet, power_range
from simulators.luxos import LuxosFleet, fleet_specs
from simulators.luxos_model import (
    S19J_PRO,
    TARGET_DRAW_RATIO,
    FaultKind,
    ManualClock,
    Timing,
)
from simulators.whatsminer import WhatsminerFleet, whatsminer_specs
from tests.loopback import ip, subnet

# pyasic's btminer token code calls passlib in a way passlib deprecates: under -W error that
# would become pyasic's "False" (outside tests it is a warning).
pytestmark = pytest.mark.filterwarnings(
    "ignore:passing settings to md5_crypt.hash:DeprecationWarning"
)

LUX = ip(151, 1)  # S19j Pro on LuxOS
BOS = ip(152, 1)  # S19j Pro on Braiins OS+
BOS_S21 = ip(152, 2)
TIMEOUT_S = 1.0
# The site ladder of an S19j Pro as a config gives it (names as LuxOS has them; powers drawn).
LADDER = tuple(
    MinerProfile(str(p["name"]), float(p["power_w"]), float(p["hashrate_ths"]))
    for p in S19J_PRO.site_config()["profiles"]  # type: ignore[attr-defined]
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleets(clock: ManualClock) -> AsyncIterator[tuple[LuxosFleet, BraiinsFleet]]:
    timing = Timing(wake_ramp_s=10.0, sleep_ramp_s=1.0, profile_ramp_s=1.0)
    async with (
        LuxosFleet(fleet_specs(2, LUX), clock=clock, timing=timing) as lux,
        BraiinsFleet(fleet_specs(2, BOS), clock=clock, timing=timing, password="pw") as bos,
    ):
        yield lux, bos


@pytest.fixture
def semaphore() -> asyncio.Semaphore:
    return asyncio.Semaphore(16)


def driver(
    address: str,
    semaphore: asyncio.Semaphore,
    firmware: str = "auto",
    *,
    password: str = "pw",
    device_id: str | None = None,
) -> PyasicMiner:
    return PyasicMiner.for_firmware(
        address,
        firmware,
        semaphore,
        device_id=device_id or f"m-{address}",
        timeout_s=TIMEOUT_S,
        ladder=LADDER,
        credentials=("root", password),
    )


# --- identification ----------------------------------------------------------------------


async def test_auto_identifies_each_family_and_its_capability(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    lux, bos = driver(LUX, semaphore), driver(BOS, semaphore)
    assert lux.family is Family.AUTO
    lux_r, bos_r = await lux.read(), await bos.read()
    assert (lux.family, bos.family) == (Family.LUXOS, Family.BRAIINS)
    assert lux_r.capability is MinerCapability.PROFILES
    assert bos_r.capability is MinerCapability.POWER_TARGET
    assert (lux_r.firmware, bos_r.firmware) == ("luxos", "braiins")
    assert lux_r.model == bos_r.model == "S19j Pro"


async def test_scan_finds_both_families(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    found = await scan_subnet(subnet(152, 29), semaphore)
    assert [m.address for m in found] == [BOS, BOS_S21]
    assert {m.family for m in found} == {Family.BRAIINS}
    found = await scan_subnet(subnet(151, 29), semaphore)
    assert {m.family for m in found} == {Family.LUXOS}


# --- Braiins OS+: a continuous power target ------------------------------------------------


async def test_braiins_reading_maps_the_target_onto_the_ladder(
    fleets: tuple[LuxosFleet, BraiinsFleet], clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    _, bos = fleets
    m = driver(BOS, semaphore, "braiins")
    r = await m.read()
    default_w = power_range("s19jpro").default_w
    assert r.power_w == round(default_w * TARGET_DRAW_RATIO)
    assert r.hashrate_ths == pytest.approx(104.0)
    assert r.mode is MinerMode.MINING
    assert r.profiles == LADDER
    assert r.profile == f"{default_w}W"  # booted on a target that is not a ladder point
    assert not r.power_estimated
    assert r.temperature_c is not None
    assert len(r.fans_rpm) == 4

    low = LADDER[0]
    await m.set_profile(low.name)
    assert bos.miners[BOS].power_target_w == round(low.power_w)
    clock.advance(1.0)
    r = await m.read()
    assert r.profile == low.name
    assert r.power_w == pytest.approx(low.power_w * TARGET_DRAW_RATIO, abs=1)


async def test_braiins_sleep_and_wake_are_measured(
    fleets: tuple[LuxosFleet, BraiinsFleet], clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    _, bos = fleets
    m = driver(BOS, semaphore, "braiins")
    await m.sleep()
    assert bos.miners[BOS].sleeping
    clock.advance(1.0)
    asleep = await m.read()
    assert asleep.mode is MinerMode.SLEEPING
    assert asleep.power_w == S19J_PRO.standby_w
    await m.wake()
    clock.advance(4.0)
    assert (await m.read()).mode is MinerMode.WAKING
    clock.advance(6.0)
    assert (await m.read()).mode is MinerMode.MINING


async def test_braiins_token_forgotten_by_a_reboot_is_renewed_transparently(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    _, bos = fleets
    m = driver(BOS, semaphore, "braiins")
    await m.sleep()  # logs in: the token is kept for the next commands
    token = bos.endpoint(BOS).token
    assert token
    await m.wake()
    assert bos.endpoint(BOS).token == token  # reused, no second login
    bos.set_fault(BOS, FaultKind.REBOOT, 0.2)
    ep = bos.endpoint(BOS)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if ep.fault.kind is FaultKind.NONE and ep.grpc_server is not None:
            break
    assert bos.endpoint(BOS).token == ""  # the reboot forgot it
    await m.sleep()  # UNAUTHENTICATED, then a fresh login and the call again
    assert bos.miners[BOS].sleeping
    assert bos.endpoint(BOS).token not in ("", token)


async def test_braiins_out_of_range_target_is_refused_with_the_firmware_message(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    _, bos = fleets
    m = driver(BOS, semaphore, "braiins")
    r = power_range("s19jpro")
    with pytest.raises(CommandRejected) as caught:
        await m.set_power_limit(r.max_w + 500)
    assert (
        f"power target [{r.max_w + 500}W] is not in allowed range [{r.min_w}, {r.max_w}]"
        in caught.value.message
    )
    assert bos.miners[BOS].power_target_w == r.default_w  # nothing changed
    assert await m.set_power_limit(2500) == "2500W"
    assert bos.miners[BOS].power_target_w == 2500


async def test_braiins_wrong_credentials_are_auth_failed(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    m = driver(BOS, semaphore, "braiins", password="wrong")
    with pytest.raises(AuthFailed, match="Invalid username or password"):
        await m.sleep()
    assert not fleets[1].miners[BOS].sleeping
    # Readings come from the cgminer API on 4028, which has no login (as on the firmware).
    assert (await m.read()).mode is MinerMode.MINING


async def test_braiins_ignored_target_is_not_applied(
    fleets: tuple[LuxosFleet, BraiinsFleet], clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    _, bos = fleets
    m = driver(BOS, semaphore, "braiins")
    bos.set_fault(BOS, FaultKind.IGNORE)
    await m.set_profile(LADDER[0].name)  # the firmware says yes...
    clock.advance(2.0)
    r = await m.read()
    assert r.profile != LADDER[0].name  # ...and the reading shows it did nothing
    assert bos.miners[BOS].power_target_w == power_range("s19jpro").default_w


# --- faults, per family ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["luxos", "braiins"])
@pytest.mark.parametrize(
    ("fault", "delay_s", "error"),
    [
        (FaultKind.HANG, 0.0, DeviceTimeout),
        (FaultKind.SLOW, 2.0, DeviceTimeout),
        (FaultKind.GARBAGE, 0.0, BadReply),
        (FaultKind.ERROR, 0.0, CommandRejected),
        (FaultKind.REBOOT, 1.0, DeviceUnavailable),
    ],
)
@pytest.mark.parametrize("operation", ["read", "sleep", "set_profile"])
async def test_every_fault_is_the_project_error_within_the_timeout(
    fleets: tuple[LuxosFleet, BraiinsFleet],
    semaphore: asyncio.Semaphore,
    family: str,
    fault: FaultKind,
    delay_s: float,
    error: type[DeviceError],
    operation: str,
) -> None:
    lux, bos = fleets
    address, fleet = (LUX, lux) if family == "luxos" else (BOS, bos)
    m = driver(address, semaphore, family, device_id="row-7")
    fleet.set_fault(address, fault, delay_s)
    await asyncio.sleep(0.05)  # a reboot closes the listeners from a task
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": m.read,
        "sleep": m.sleep,
        "set_profile": lambda: m.set_profile("default"),
    }
    t0 = time.perf_counter()
    with pytest.raises(error) as caught:
        await calls[operation]()
    assert time.perf_counter() - t0 < 2 * TIMEOUT_S + 0.5
    assert caught.value.device_id == "row-7"
    assert not fleet.miners[address].sleeping


@pytest.mark.parametrize("family", ["luxos", "braiins"])
async def test_slow_within_the_timeout_is_normal(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore, family: str
) -> None:
    lux, bos = fleets
    address, fleet = (LUX, lux) if family == "luxos" else (BOS, bos)
    fleet.set_fault(address, FaultKind.SLOW, 0.05)
    m = driver(address, semaphore, family)
    assert (await m.read()).mode is MinerMode.MINING
    await m.sleep()
    assert fleet.miners[address].sleeping


# --- LuxOS: one session holder -----------------------------------------------------------


async def _logon_as_someone_else(address: str) -> str:
    reader, writer = await asyncio.open_connection(address, 4028)
    writer.write(b'{"command": "logon"}')
    await writer.drain()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    sid = json.loads(reply)["SESSION"][0]["SessionID"]
    assert isinstance(sid, str)
    return sid


async def test_a_session_held_by_another_client_is_a_clear_bounded_fault(
    fleets: tuple[LuxosFleet, BraiinsFleet], clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    lux, _ = fleets
    theirs = await _logon_as_someone_else(LUX)  # a fleet manager holds the session
    m = PyasicMiner.for_firmware(
        LUX, "luxos", semaphore, device_id="lux-1", timeout_s=2.0, credentials=None
    )
    t0 = time.perf_counter()
    with pytest.raises(SessionHeld, match="session held by another client") as caught:
        await m.sleep()
    elapsed = time.perf_counter() - t0
    assert caught.value.device_id == "lux-1"
    assert "3 logon attempts" in caught.value.message
    assert 0.9 <= elapsed < 2.0  # three tries, half a second apart, never the whole timeout
    state = lux.miners[LUX]
    assert not state.sleeping
    assert state.session_holder() == theirs  # we never took their session
    # The holder goes idle; LuxOS drops the session after about a minute and we get ours.
    clock.advance(61.0)
    await m.sleep()
    assert state.sleeping
    assert state.session_holder() not in ("", theirs)  # ours now, until idle


async def test_the_session_is_given_back_once_idle(
    fleets: tuple[LuxosFleet, BraiinsFleet], semaphore: asyncio.Semaphore
) -> None:
    lux, _ = fleets
    state = lux.miners[LUX]
    m = PyasicMiner(
        "lux-1", None, semaphore, timeout_s=TIMEOUT_S, address=LUX, session_release_s=0.3
    )
    await m.sleep()
    ours = state.session_holder()
    assert state.sleeping
    assert ours != ""  # held through a burst of commands...
    await m.wake()
    assert state.session_holder() == ours  # ...reused, one round trip per command
    await m.read()
    assert state.session_holder() == ours  # not idle long enough yet
    await asyncio.sleep(0.35)
    await m.read()  # ...then given back alongside a poll
    assert state.session_holder() == ""
    other = PyasicMiner(
        "lux-2", None, semaphore, timeout_s=TIMEOUT_S, address=LUX, session_release_s=0
    )
    await other.sleep()
    assert state.sleeping
    assert state.session_holder() == ""  # 0: logged off right after the command
    keeper = PyasicMiner(
        "lux-3", None, semaphore, timeout_s=TIMEOUT_S, address=LUX, session_release_s=None
    )
    await keeper.wake()
    await keeper.read()
    assert state.session_holder() != ""  # None: kept until LuxOS expires it
    with pytest.raises(SessionHeld):
        await other.sleep()  # ...and until then nobody else can act
    await keeper.aclose()  # what a clean shutdown does
    await other.sleep()
    assert state.sleeping
    with pytest.raises(ValueError, match="octets"):
        PyasicMiner.for_firmware("not-an-ip", "luxos", semaphore)


async def test_luxos_profile_points_and_ignored_commands(
    fleets: tuple[LuxosFleet, BraiinsFleet], clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    lux, _ = fleets
    m = driver(LUX, semaphore, "luxos")
    await m.set_profile(LADDER[0].name)
    assert lux.miners[LUX].profile == LADDER[0].name
    clock.advance(1.0)
    r = await m.read()
    assert r.power_w == pytest.approx(LADDER[0].power_w, abs=1)
    # A miner that ignores writes "accepts" turning ATM off, then refuses the profile because
    # ATM is still on: the refusal carries the firmware's reason, and nothing moved.
    lux.set_fault(LUX, FaultKind.IGNORE)
    with pytest.raises(CommandRejected, match="ATM is enabled"):
        await m.set_profile("default")
    clock.advance(2.0)
    assert (await m.read()).profile == LADDER[0].name


# --- stock Antminer (sleep only, no power reading) and Whatsminer (power limit) -----------

STOCK = ip(153, 1)  # S19j Pro on stock Bitmain firmware
WM = ip(154, 1)  # M30S+ V40 on btminer


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a condition with a deadline (these two fleets run on the real clock: btminer
    tokens carry the miner's time)."""
    deadline = time.monotonic() + 10.0
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def stock_fleets() -> AsyncIterator[tuple[AntminerFleet, WhatsminerFleet]]:
    timing = Timing(wake_ramp_s=0.5, sleep_ramp_s=0.1, profile_ramp_s=0.1)
    antminers = AntminerFleet(antminer_specs(1, STOCK), timing=timing)
    try:
        await antminers.start()
    except PermissionError:
        pytest.skip("binding port 80 (the Antminer web API) needs root")
    try:
        async with WhatsminerFleet(whatsminer_specs(1, WM), timing=timing) as wm:
            yield antminers, wm
    finally:
        await antminers.stop()


async def test_stock_antminer_is_sleep_only_with_an_estimated_power(
    stock_fleets: tuple[AntminerFleet, WhatsminerFleet], semaphore: asyncio.Semaphore
) -> None:
    antminers, _ = stock_fleets
    m = driver(STOCK, semaphore, password="root")
    r = await m.read()
    assert m.family is Family.ANTMINER
    assert r.capability is MinerCapability.SLEEP_ONLY
    assert r.power_estimated  # the firmware reports no power...
    default = next(p for p in LADDER if p.name == "default")
    assert r.hashrate_ths == pytest.approx(default.hashrate_ths)
    assert r.power_w == pytest.approx(default.power_w)  # ...so it is the ladder at that rate
    assert r.mode is MinerMode.MINING
    with pytest.raises(Unsupported, match="can only sleep or run"):
        await m.set_profile(LADDER[0].name)
    with pytest.raises(Unsupported, match="no power limit"):
        await m.set_power_limit(2000)
    await m.sleep()
    assert antminers.truth(STOCK)["sleeping"]
    await eventually(lambda: _mode_is(m, MinerMode.SLEEPING), "asleep")
    await m.wake()
    await eventually(lambda: _mode_is(m, MinerMode.MINING), "mining again")


async def _mode_is(m: PyasicMiner, mode: MinerMode) -> bool:
    return (await m.read()).mode is mode


async def test_stock_antminer_quirks_are_worked_around(
    stock_fleets: tuple[AntminerFleet, WhatsminerFleet], semaphore: asyncio.Semaphore
) -> None:
    antminers, _ = stock_fleets
    m = driver(STOCK, semaphore, "antminer", password="root")
    # An ignored set_miner_conf answers success: the driver reads the mode back.
    antminers.set_fault(STOCK, FaultKind.IGNORE)
    with pytest.raises(CommandNotApplied, match="miner-mode reads '0'"):
        await m.sleep()
    antminers.set_fault(STOCK, FaultKind.ERROR)
    with pytest.raises(CommandRejected, match="HTTP 500"):
        await m.sleep()
    antminers.set_fault(STOCK, FaultKind.NONE)
    # Real firmware answers set_miner_conf after ~20 s (it restarts bmminer): past the
    # timeout, the change is read back instead of reported as a failure.
    antminers.set_conf_delay(STOCK, 3 * TIMEOUT_S)
    await m.sleep()
    assert antminers.truth(STOCK)["sleeping"]


async def test_whatsminer_power_limit_sleep_and_wake(
    stock_fleets: tuple[AntminerFleet, WhatsminerFleet], semaphore: asyncio.Semaphore
) -> None:
    _, wm = stock_fleets
    m = PyasicMiner.for_firmware(
        WM, "auto", semaphore, timeout_s=TIMEOUT_S, credentials=("admin", "admin")
    )
    r = await m.read()
    assert m.family is Family.WHATSMINER
    assert r.capability is MinerCapability.POWER_LIMIT
    assert not r.power_estimated
    assert r.mode is MinerMode.MINING
    assert await m.set_power_limit(2800) == "2800W"

    async def limited() -> bool:
        r = await m.read()
        return r.power_w == 2800 and r.profile == "2800W"

    await eventually(limited, "drawing at the 2800 W limit")
    await m.sleep()
    await eventually(lambda: _mode_is(m, MinerMode.SLEEPING), "asleep")
    await m.wake()
    await eventually(lambda: _mode_is(m, MinerMode.MINING), "mining again")
    wrong = PyasicMiner.for_firmware(
        WM, "whatsminer", semaphore, timeout_s=TIMEOUT_S, credentials=("admin", "nope")
    )
    with pytest.raises(CommandRejected):
        await wrong.sleep()  # pyasic says False: the driver says no
    assert not wm.truth(WM)["sleeping"]


@pytest.mark.parametrize("family", ["antminer", "whatsminer"])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (FaultKind.HANG, DeviceTimeout),
        (FaultKind.SLOW, DeviceTimeout),
        # The driver reads the RPC itself (pyasic's get_data would swallow these into empty
        # fields): undecodable bytes and a STATUS "E" reply are told apart.
        (FaultKind.GARBAGE, BadReply),
        (FaultKind.ERROR, CommandRejected),
        (FaultKind.REBOOT, DeviceUnavailable),
    ],
)
async def test_stock_family_faults_on_read_are_errors_within_the_timeout(
    stock_fleets: tuple[AntminerFleet, WhatsminerFleet],
    semaphore: asyncio.Semaphore,
    family: str,
    fault: FaultKind,
    error: type[DeviceError],
) -> None:
    antminers, wm = stock_fleets
    address, fleet = (STOCK, antminers) if family == "antminer" else (WM, wm)
    m = driver(address, semaphore, family, password="root" if family == "antminer" else "admin")
    fleet.set_fault(address, fault, 2.0)
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    with pytest.raises(error):
        await m.read()
    assert time.perf_counter() - t0 < 2 * TIMEOUT_S + 0.5
