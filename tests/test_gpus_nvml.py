"""The NVML driver against the NVML simulator (and real pynvml where no GPU exists)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pynvml
import pytest

from drivers.errors import (
    AuthFailed,
    CommandRejected,
    DeviceTimeout,
    DeviceUnavailable,
)
from drivers.gpus.base import GpuControl
from drivers.gpus.nvml import NvmlGpus
from simulators import nvml as sim
from simulators.nvml import A10G, A100_SXM4_80GB, H100_SXM, TESLA_T4, SimNvml


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def nvml(clock: FakeClock) -> SimNvml:
    return SimNvml([H100_SXM, A100_SXM4_80GB, A10G, TESLA_T4], clock=clock)


@pytest.fixture
async def gpus(nvml: SimNvml) -> AsyncIterator[NvmlGpus]:
    async with NvmlGpus(nvml, call_timeout_s=0.5) as driver:
        yield driver


async def test_reads_every_field_of_every_model(gpus: NvmlGpus, nvml: SimNvml) -> None:
    assert isinstance(gpus, GpuControl)
    h100 = nvml.gpus[0]
    h100.attach(pid=4242, memory_mib=30_000, utilization_pct=100)
    readings = await gpus.read_all()
    assert [r.name for r in readings] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA A10G",
        "Tesla T4",
    ]
    assert [(r.min_limit_w, r.max_limit_w, r.default_limit_w) for r in readings] == [
        (200.0, 700.0, 700.0),
        (100.0, 500.0, 500.0),
        (100.0, 300.0, 300.0),
        (60.0, 70.0, 70.0),
    ]
    first = readings[0]
    assert first.device_id == h100.uuid
    assert first.device_id.startswith("GPU-")
    assert first.index == 0
    assert first.power_limit_w == 700.0
    assert first.power_w == pytest.approx(700.0)  # fully busy: runs at its cap
    assert first.utilization_pct == 100.0
    assert first.memory_used_mib == pytest.approx(30_000, abs=1)
    assert first.memory_total_mib == 81559
    assert first.process_pids == (4242,)
    assert first.temperature_c == 30.0  # no time has passed since it was ambient
    assert first.energy_j == 0.0
    idle = readings[3]
    assert idle.power_w == pytest.approx(26.8)
    assert idle.utilization_pct == 0.0
    assert idle.process_pids == ()
    assert len({r.device_id for r in readings}) == 4


async def test_energy_and_temperature_follow_power_over_time(
    gpus: NvmlGpus, nvml: SimNvml, clock: FakeClock
) -> None:
    gpu = nvml.gpus[0]
    gpu.set_load(100)
    clock.now_s += 10
    reading = (await gpus.read_all())[0]
    assert reading.energy_j == pytest.approx(7000.0)  # 700 W for 10 s
    t10 = reading.temperature_c
    clock.now_s += 300  # ten time constants: settled at ambient + 45 K
    reading = (await gpus.read_all())[0]
    assert 30.0 < t10 < reading.temperature_c
    assert reading.temperature_c == pytest.approx(75.0, abs=0.5)
    assert reading.energy_j == pytest.approx(700.0 * 310)


async def test_cap_in_range_lowers_power_and_throughput_along_the_curve(
    gpus: NvmlGpus, nvml: SimNvml
) -> None:
    gpu = nvml.gpus[0]
    gpu.set_load(100)
    await gpus.set_power_limit(gpu.uuid, 350)
    reading = await gpus.read(gpu.uuid)
    assert reading.power_limit_w == 350.0
    assert reading.power_w == pytest.approx(350.0)
    assert gpu.throughput_fraction == pytest.approx(0.75)  # 1 - (1 - 0.5)^2
    await gpus.set_power_limit(gpu.uuid, 200)  # the lower edge is allowed
    assert (await gpus.read(gpu.uuid)).power_w <= 200.0


async def test_half_busy_gpu_draws_between_idle_and_cap(gpus: NvmlGpus, nvml: SimNvml) -> None:
    gpu = nvml.gpus[1]
    gpu.set_load(50)
    reading = await gpus.read(gpu.uuid)
    assert reading.power_w == pytest.approx(67.0 + (500.0 - 67.0) * 0.5)


@pytest.mark.parametrize("watts", [199.0, 700.5, 0.0, -5.0, 10_000.0])
async def test_cap_out_of_range_is_refused_before_nvml_is_asked(
    gpus: NvmlGpus, nvml: SimNvml, watts: float
) -> None:
    gpu = nvml.gpus[0]
    with pytest.raises(CommandRejected, match=r"outside the allowed range 200–700 W") as err:
        await gpus.set_power_limit(gpu.uuid, watts)
    assert err.value.device_id == gpu.uuid
    assert "nvmlDeviceSetPowerManagementLimit" not in nvml.calls
    assert gpu.power_limit_w == 700.0


@pytest.mark.parametrize("watts", [math.nan, math.inf])
async def test_non_finite_cap_is_refused(gpus: NvmlGpus, nvml: SimNvml, watts: float) -> None:
    with pytest.raises(CommandRejected, match="finite number"):
        await gpus.set_power_limit(nvml.gpus[0].uuid, watts)
    assert "nvmlDeviceSetPowerManagementLimit" not in nvml.calls


def test_simulator_rejects_out_of_range_limit_like_a_real_card(nvml: SimNvml) -> None:
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(3)
    with pytest.raises(sim.NVMLError_InvalidArgument) as err:
        nvml.nvmlDeviceSetPowerManagementLimit(handle, 75_000)
    assert err.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert str(err.value) == str(pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT))
    assert isinstance(sim.NVMLError(sim.NVML_ERROR_GPU_IS_LOST), sim.NVMLError_GpuIsLost)


def test_models_by_config_or_nvml_name() -> None:
    assert sim.model_named("H100-SXM") is H100_SXM
    assert sim.model_named("Tesla T4") is TESLA_T4
    assert sim.model_named("NVIDIA A100-SXM4-80GB") is A100_SXM4_80GB
    assert sim.model_named("a10g") is A10G
    with pytest.raises(ValueError, match="unknown GPU model 'V100'"):
        sim.model_named("V100")


async def test_suspended_job_drops_utilization_and_power(gpus: NvmlGpus, nvml: SimNvml) -> None:
    gpu = nvml.gpu(nvml.gpus[0].uuid)
    gpu.attach(pid=7, memory_mib=1000, utilization_pct=90)
    busy = await gpus.read(gpu.uuid)
    gpu.suspend(7)
    idle = await gpus.read(gpu.uuid)
    assert busy.power_w == pytest.approx(70 + 630 * 0.9)
    assert idle.utilization_pct == 0.0
    assert idle.power_w == pytest.approx(70.0)
    assert idle.memory_used_mib == pytest.approx(1000, abs=1)  # memory stays allocated
    assert idle.process_pids == (7,)
    gpu.resume(7)
    assert (await gpus.read(gpu.uuid)).utilization_pct == 90.0


def test_simulator_codes_match_pynvml() -> None:
    for name in dir(sim):
        if name.startswith("NVML_ERROR_") or name == "NVML_TEMPERATURE_GPU":
            assert getattr(sim, name) == getattr(pynvml, name), name
        if name.startswith("NVMLError_"):
            assert hasattr(pynvml, name), name


async def test_unknown_uuid_is_a_clear_error(gpus: NvmlGpus) -> None:
    with pytest.raises(DeviceUnavailable, match="no such GPU") as err:
        await gpus.set_power_limit("GPU-00000000-0000-0000-0000-000000000000", 300)
    assert err.value.device_id == "GPU-00000000-0000-0000-0000-000000000000"


async def test_non_root_gets_a_clear_permission_error(clock: FakeClock) -> None:
    nvml = SimNvml([H100_SXM], clock=clock, privileged=False)
    async with NvmlGpus(nvml) as gpus:
        with pytest.raises(AuthFailed, match="run as root"):
            await gpus.set_power_limit(nvml.gpus[0].uuid, 300)
    assert nvml.gpus[0].power_limit_w == 700.0


async def test_gpu_off_the_bus_is_unavailable_with_its_id(gpus: NvmlGpus, nvml: SimNvml) -> None:
    lost = nvml.gpus[2]
    lost.fall_off_bus()
    with pytest.raises(DeviceUnavailable, match="fallen off the bus") as err:
        await gpus.read_all()
    assert err.value.device_id == "gpu2"
    with pytest.raises(DeviceUnavailable, match="fallen off the bus") as err:
        await gpus.set_power_limit(lost.uuid, 150)
    assert err.value.device_id == lost.uuid
    assert lost.power_limit_w == 300.0
    # The other GPUs still answer.
    assert (await gpus.read(nvml.gpus[0].uuid)).name == "NVIDIA H100 80GB HBM3"
    each = await gpus.read_each()
    assert [type(r).__name__ for r in each] == [
        "GpuReading",
        "GpuReading",
        "DeviceUnavailable",
        "GpuReading",
    ]


async def test_hung_call_times_out_and_hung_threads_are_bounded(nvml: SimNvml) -> None:
    stuck = nvml.gpus[0]
    stuck.hang()
    try:
        async with NvmlGpus(nvml, call_timeout_s=0.2, max_outstanding=2) as gpus:
            started = time.monotonic()
            with pytest.raises(DeviceTimeout, match=r"no answer from NVML within 0.2 s"):
                await gpus.read(stuck.uuid)
            assert time.monotonic() - started < 0.5
            with pytest.raises(DeviceTimeout):
                await gpus.set_power_limit(stuck.uuid, 300)
            # Both worker slots are now held by hung threads: no third thread is started.
            calls_before = len(nvml.calls)
            with pytest.raises(DeviceTimeout, match="still hung"):
                await gpus.read(nvml.gpus[1].uuid)
            assert len(nvml.calls) == calls_before
            stuck.release()
            await asyncio.sleep(0.05)
            # Released threads give their slots back; the driver works again.
            assert (await gpus.read(nvml.gpus[1].uuid)).name == "NVIDIA A100-SXM4-80GB"
    finally:
        stuck.release()


async def test_lifecycle_inits_and_shuts_down_once(nvml: SimNvml) -> None:
    driver = NvmlGpus(nvml)
    with pytest.raises(DeviceUnavailable, match="not open"):
        await driver.read_all()
    async with driver:
        assert nvml.init_count == 1
        with pytest.raises(RuntimeError, match="entered twice"):
            await driver.__aenter__()
    assert nvml.init_count == 0
    assert nvml.calls.count("nvmlShutdown") == 1


async def test_missing_driver_is_unavailable(clock: FakeClock) -> None:
    with pytest.raises(DeviceUnavailable, match="kernel driver is not loaded"):
        async with NvmlGpus(SimNvml(clock=clock, driver_loaded=False)):
            pass


async def test_real_pynvml_without_a_gpu_is_a_clear_error() -> None:
    """The default module is the real pynvml; on a host without libnvidia-ml it says so."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has a working NVIDIA driver")
    with pytest.raises(DeviceUnavailable, match=r"libnvidia-ml\.so was not found|driver"):
        async with NvmlGpus():
            pass


@pytest.mark.gpu
async def test_real_gpu_read_only() -> None:
    """Read-only check on a real GPU: never sets a limit, clock or setting."""
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no usable NVIDIA driver here: {exc}")
    async with NvmlGpus() as gpus:
        readings = await gpus.read_all()
    assert readings
    for r in readings:
        assert r.device_id.startswith(("GPU-", "MIG-"))
        assert 0 < r.min_limit_w <= r.power_limit_w <= r.max_limit_w
        assert 0 <= r.power_w <= r.max_limit_w * 1.2
        assert r.memory_total_mib > 0
