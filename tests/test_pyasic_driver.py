"""The pyasic miner driver against the LuxOS simulator: readings, commands, faults, fleets."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pyasic import settings as pyasic_settings
from pyasic.miners.backends.btminer import BTMinerV2

from drivers.errors import (
    BadReply,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
)
from drivers.miners.base import (
    MinerMode,
    MinerPowerProfile,
    MinerReading,
    MinerSleepWake,
    MinerTelemetry,
)
from drivers.miners.pyasic_driver import (
    MISFITS_BEFORE_REIDENTIFY,
    Family,
    PyasicMiner,
    discover,
    read_fleet,
    scan_subnet,
    sleep_fleet,
)
from simulators.luxos import LuxosFleet, fleet_specs
from simulators.luxos_model import (
    PROFILE_DRAW_RATIO,
    S19J_PRO,
    FaultKind,
    ManualClock,
    Timing,
)
from simulators.luxos_model import S21 as S21_MODEL
from tests.loopback import ip, subnet

# What each model draws on its default profile (0.885 x the nominal Watts), rounded as LuxOS.
S19_W = round(3068 * PROFILE_DRAW_RATIO)
S21_W = round(3500 * PROFILE_DRAW_RATIO)

ROOT = Path(__file__).resolve().parent.parent
S19 = ip(130, 1)  # round-robin models: odd hosts S19j Pro, even hosts S21
S21 = ip(130, 2)
TIMEOUT_S = 0.5


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def fleet(clock: ManualClock) -> AsyncIterator[LuxosFleet]:
    async with LuxosFleet(
        fleet_specs(8, ip(130, 1)), clock=clock, timing=Timing(10.0, 1.0, 1.0)
    ) as f:
        yield f


@pytest.fixture
def semaphore() -> asyncio.Semaphore:
    return asyncio.Semaphore(16)


def miner(address: str, semaphore: asyncio.Semaphore, device_id: str | None = None) -> PyasicMiner:
    return PyasicMiner.luxos(
        address, semaphore, device_id=device_id or f"m-{address}", timeout_s=TIMEOUT_S
    )


async def test_discover_by_address_identifies_models_and_reports_missing(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    found = await discover(
        {"rack1-a": S19, "rack1-b": S21, "ghost": ip(139, 9)},
        semaphore,
        identify_timeout_s=5.0,
    )
    a, b, ghost = found["rack1-a"], found["rack1-b"], found["ghost"]
    assert isinstance(a, PyasicMiner)
    assert isinstance(b, PyasicMiner)
    assert (await a.read()).model == "S19j Pro"
    assert (await b.read()).model == "S21"
    assert isinstance(ghost, DeviceUnavailable)
    assert ghost.device_id == "ghost"


async def test_scan_subnet_finds_all_and_restores_pyasic_global(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    before = pyasic_settings.get("network_scan_semaphore")
    found = await scan_subnet(subnet(130, 28), semaphore, scan_concurrency=4)
    assert [m.address for m in found] == fleet.addresses
    assert pyasic_settings.get("network_scan_semaphore") == before


async def test_read_reports_measured_values_and_derived_mode(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S21, semaphore)
    assert isinstance(m, MinerTelemetry)
    assert isinstance(m, MinerSleepWake)
    assert isinstance(m, MinerPowerProfile)
    r = await m.read()
    assert r.device_id == f"m-{S21}"
    assert r.address == S21
    assert r.power_w == S21_W
    # "GHS 5s", not pyasic's hashrate getter (None on LuxOS) nor the lagging chain rates.
    assert r.hashrate_ths == pytest.approx(200.0)
    assert r.mode is MinerMode.MINING
    assert r.profile == "default"
    assert [p.name for p in r.profiles] == [p.name for p in S21_MODEL.profiles]
    assert len(r.profiles) == 25
    assert r.profiles[0].power_w == S21_MODEL.profiles[0].power_w
    assert r.temperature_c is not None
    assert r.temperature_c == pytest.approx(fleet.miners[S21].chip_c(), abs=4.0)
    assert len(r.fans_rpm) == 4


async def test_sleep_and_wake_follow_the_simulated_physics(
    fleet: LuxosFleet, clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S19, semaphore)
    await m.sleep()
    assert fleet.miners[S19].sleeping
    clock.advance(1.0)
    asleep = await m.read()
    assert asleep.mode is MinerMode.SLEEPING
    assert asleep.power_w == 28
    assert asleep.hashrate_ths == 0.0
    clock.advance(120.0)  # two thermal time constants asleep: the boards cool
    cold = await m.read()

    await m.wake()
    clock.advance(4.0)  # 40 % into the 10 s wake ramp
    waking = await m.read()
    assert waking.mode is MinerMode.WAKING
    assert 28 < waking.power_w < S19_W
    clock.advance(6.0)
    assert (await m.read()).mode is MinerMode.MINING
    # Temperatures follow power: the wake made the chips warmer than they were asleep.
    clock.advance(120.0)
    warm = await m.read()
    assert warm.temperature_c is not None
    assert cold.temperature_c is not None
    assert warm.temperature_c > cold.temperature_c + 10


async def test_set_profile_and_power_limit_change_the_operating_point(
    fleet: LuxosFleet, clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S19, semaphore)
    low = S19J_PRO.profile(S19J_PRO.site_bottom)
    await m.set_profile(low.name)
    state = fleet.miners[S19]
    assert state.profile == low.name
    assert state.atm_enabled
    clock.advance(1.0)
    r = await m.read()
    assert r.profile == low.name
    assert r.power_w == round(low.power_w * PROFILE_DRAW_RATIO)
    assert r.hashrate_ths == pytest.approx(low.hashrate_ths)

    assert await m.set_power_limit(3100) == "default"
    assert state.profile == "default"


async def test_bad_profile_or_limit_is_rejected_and_changes_nothing(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S19, semaphore)
    with pytest.raises(CommandRejected, match="unknown profile 'turbo'"):
        await m.set_profile("turbo")
    with pytest.raises(CommandRejected, match="no profile at or below 500 W"):
        await m.set_power_limit(500)
    state = fleet.miners[S19]
    assert (state.profile, state.atm_enabled, state.sleeping) == ("default", True, False)


@pytest.mark.parametrize(
    ("fault", "delay_s", "error"),
    [
        (FaultKind.HANG, 0.0, DeviceTimeout),
        (FaultKind.SLOW, 2.0, DeviceTimeout),
        (FaultKind.GARBAGE, 0.0, BadReply),
        (FaultKind.ERROR, 0.0, CommandRejected),
    ],
)
@pytest.mark.parametrize("operation", ["read", "sleep", "set_profile"])
async def test_each_fault_maps_to_the_project_error_within_the_timeout(
    fleet: LuxosFleet,
    semaphore: asyncio.Semaphore,
    fault: FaultKind,
    delay_s: float,
    error: type[DeviceError],
    operation: str,
) -> None:
    m = miner(S21, semaphore, device_id="rack2-s21")
    fleet.set_fault(S21, fault, delay_s)
    t0 = time.perf_counter()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "read": m.read,
        "sleep": m.sleep,
        "set_profile": lambda: m.set_profile(S21_MODEL.site_bottom),
    }
    call = calls[operation]
    with pytest.raises(error) as caught:
        await call()
    elapsed = time.perf_counter() - t0
    assert caught.value.device_id == "rack2-s21"
    assert "rack2-s21" in str(caught.value)
    assert caught.value.__cause__ is not None
    # One exchange at most runs into the timeout before the call gives up.
    assert elapsed < 2 * TIMEOUT_S
    assert not fleet.miners[S21].sleeping


async def test_slow_answer_within_the_timeout_is_a_normal_reading(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    fleet.set_fault(S21, FaultKind.SLOW, 0.1)
    assert (await miner(S21, semaphore).read()).power_w == S21_W


async def test_refused_connection_is_device_unavailable(semaphore: asyncio.Semaphore) -> None:
    address = ip(139, 1)
    with pytest.raises(DeviceUnavailable, match=rf"m-{re.escape(address)}: .*Connect call failed"):
        await miner(address, semaphore).read()


async def test_ignored_command_is_visible_in_telemetry(
    fleet: LuxosFleet, clock: ManualClock, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S19, semaphore)
    fleet.set_fault(S19, FaultKind.IGNORE)
    await m.sleep()  # the miner says yes...
    clock.advance(5.0)
    r = await m.read()
    assert r.mode is MinerMode.MINING  # ...and keeps mining
    assert r.power_w == S19_W
    assert not fleet.miners[S19].sleeping


async def test_reboot_is_unavailable_then_back_in_default_state_with_new_session(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    m = miner(S19, semaphore)
    await m.set_profile(S19J_PRO.site_bottom)
    fleet.set_fault(S19, FaultKind.REBOOT, 0.2)
    with pytest.raises(DeviceUnavailable):
        await m.read()
    await asyncio.sleep(0.3)
    r = await m.read()
    assert r.profile == "default"
    # Our session died with the reboot; the driver opens a new one transparently.
    await m.sleep()
    assert fleet.miners[S19].sleeping


async def test_read_fleet_returns_readings_and_errors_without_waiting_on_hangs(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    miners = [miner(a, semaphore) for a in fleet.addresses]
    fleet.set_fault(ip(130, 3), FaultKind.HANG)
    fleet.set_fault(ip(130, 4), FaultKind.GARBAGE)
    t0 = time.perf_counter()
    results = await read_fleet(miners)
    assert time.perf_counter() - t0 < 2 * TIMEOUT_S
    assert isinstance(results[f"m-{ip(130, 3)}"], DeviceTimeout)
    assert isinstance(results[f"m-{ip(130, 4)}"], BadReply)
    readings = [r for r in results.values() if isinstance(r, MinerReading)]
    assert len(readings) == 6
    assert sum(r.power_w for r in readings) == 3 * S19_W + 3 * S21_W


async def test_the_shared_semaphore_bounds_concurrency(fleet: LuxosFleet) -> None:
    # Two slots, four hung miners: the hangs queue behind each other in pairs.
    one_slot_pair = asyncio.Semaphore(2)
    hung = fleet.addresses[:4]
    for a in hung:
        fleet.set_fault(a, FaultKind.HANG)
    t0 = time.perf_counter()
    results = await read_fleet([miner(a, one_slot_pair) for a in hung])
    elapsed = time.perf_counter() - t0
    assert all(isinstance(r, DeviceTimeout) for r in results.values())
    assert 2 * TIMEOUT_S <= elapsed < 2 * TIMEOUT_S + 0.5


async def test_sleep_fleet_reports_per_miner_results(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore
) -> None:
    fleet.set_fault(ip(130, 2), FaultKind.ERROR)
    results = await sleep_fleet([miner(a, semaphore) for a in fleet.addresses])
    assert isinstance(results[f"m-{ip(130, 2)}"], CommandRejected)
    assert sum(r is None for r in results.values()) == 7
    assert sum(s.sleeping for s in fleet.miners.values()) == 7


def family(m: PyasicMiner) -> Family:
    """The driver's family now (a call, so mypy does not narrow it across the awaits)."""
    return m.family


async def test_a_family_pyasic_got_wrong_is_identified_again(
    fleet: LuxosFleet, semaphore: asyncio.Semaphore, caplog: pytest.LogCaptureFixture
) -> None:
    """pyasic's factory once took a LuxOS miner for a Whatsminer under load (issue 12's 10,000
    miner run). A family that came from the factory and keeps failing as that family is
    identified again; a family the config names is never second-guessed."""
    # What the factory's misidentification hands over: a Whatsminer object for a LuxOS miner.
    guessed = PyasicMiner(
        "m-guessed", BTMinerV2(S19), semaphore, timeout_s=TIMEOUT_S, identified=True
    )
    assert family(guessed) is Family.WHATSMINER
    for _ in range(MISFITS_BEFORE_REIDENTIFY):
        with pytest.raises(BadReply, match="malformed reply"):
            await guessed.read()
    assert family(guessed) is Family.AUTO
    assert "identifying the miner again" in caplog.text
    reading = await guessed.read()  # identifies first, then reads as LuxOS
    assert family(guessed) is Family.LUXOS
    assert reading.power_w == S19_W
    await guessed.sleep()
    assert fleet.miners[S19].sleeping

    configured = PyasicMiner("m-configured", BTMinerV2(S21), semaphore, timeout_s=TIMEOUT_S)
    for _ in range(MISFITS_BEFORE_REIDENTIFY + 1):
        with pytest.raises(BadReply):
            await configured.read()
    assert configured.family is Family.WHATSMINER
    assert not fleet.miners[S21].sleeping


def test_importing_the_driver_leaves_the_root_logger_alone() -> None:
    code = (
        "import logging; import drivers.miners.pyasic_driver; "
        "r = logging.getLogger(); print(len(r.handlers), r.level)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(30)]  # no handler added; WARNING is the default
