"""The NVML GPU driver: reads every GPU of this host and sets power limits through nvidia-ml-py.

The NVML module is injected (default: ``import pynvml``), so the same code runs against the real
library on a GPU host and against ``simulators.nvml.SimNvml`` in tests and demos. NVML speaks
milliwatts and millijoules; this border converts to watts and joules and turns ``NVMLError``
into the project's exceptions (``drivers.errors``), keeping the device id.

NVML calls block (they are ioctls into the kernel driver), so each unit of work runs in a worker
thread with a timeout. A Python thread cannot be killed: a call that hangs in the driver keeps its
thread for as long as it hangs. We therefore use a small private thread pool and a semaphore that
is released only when the thread really returns, so at most ``max_outstanding`` hung calls can
pile up; beyond that every call fails fast with ``DeviceTimeout`` instead of spawning threads. A
private pool (not ``asyncio.to_thread``) also keeps a hung call from blocking event-loop shutdown,
which waits for the default executor.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from drivers.errors import (
    AuthFailed,
    BadReply,
    CommandNotApplied,
    CommandRejected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    Unsupported,
)
from drivers.gpus.base import GpuReading
from drivers.inputs import InputRejected, RejectionRecorder, finite_in_range, record

# A GPU draws at most a few kW (an SXM board is 700 W, a GB200 superchip 2.7 kW).
MAX_GPU_W = 10_000.0
MAX_PROCESSES = 4096

log = logging.getLogger(__name__)

T = TypeVar("T")

HOST_DEVICE_ID = "nvml"  # the device id used for errors that concern NVML as a whole

# NVML return codes (nvml.h); identical in pynvml and the simulator.
_INVALID_ARGUMENT = 2
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_INSUFFICIENT_POWER = 8
_DRIVER_NOT_LOADED = 9
_TIMEOUT = 10
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_RESET_REQUIRED = 16
_IN_USE = 19
_NOT_READY = 27
_GPU_NOT_FOUND = 28
_UNINITIALIZED = 1

_UNAVAILABLE = {
    _UNINITIALIZED: "NVML is not initialized",
    _NOT_FOUND: "no such GPU on this host",
    _GPU_NOT_FOUND: "no such GPU on this host",
    _DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
    _LIBRARY_NOT_FOUND: "libnvidia-ml.so was not found (is the NVIDIA driver installed?)",
    _GPU_IS_LOST: "GPU has fallen off the bus; it needs a reset or a reboot",
    _RESET_REQUIRED: "GPU needs a reset",
}
_TIMEOUTS = {_TIMEOUT: "NVML timed out", _NOT_READY: "GPU is not ready"}
_REJECTED = {
    _INVALID_ARGUMENT: "invalid argument",
    _IN_USE: "GPU is in use",
    _INSUFFICIENT_POWER: "insufficient external power",
}
_UNSUPPORTED = {
    _NOT_SUPPORTED: "not supported by this GPU",
    _FUNCTION_NOT_FOUND: "not supported by this NVML version",
}


def map_nvml_error(device_id: str, what: str, exc: Exception) -> DeviceError:
    """The project exception for an ``NVMLError`` raised while doing ``what``."""
    code = getattr(exc, "value", None)
    detail = f"{what}: NVML error {code} ({exc})"
    if code in _UNAVAILABLE:
        return DeviceUnavailable(device_id, f"{_UNAVAILABLE[code]}; {detail}")
    if code in _TIMEOUTS:
        return DeviceTimeout(device_id, f"{_TIMEOUTS[code]}; {detail}")
    if code == _NO_PERMISSION:
        return AuthFailed(device_id, f"insufficient permissions (run as root); {detail}")
    if code in _REJECTED:
        return CommandRejected(device_id, f"{_REJECTED[code]}; {detail}")
    if code in _UNSUPPORTED:
        return Unsupported(device_id, f"{_UNSUPPORTED[code]}; {detail}")
    return BadReply(device_id, detail)


def _text(value: Any) -> str:
    """pynvml returns str for names and UUIDs on Python 3, but old releases returned bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlGpus:
    """``GpuControl`` over NVML. Use as an async context manager (``nvmlInit``/``nvmlShutdown``).

    ``call_timeout_s`` bounds each unit of blocking work: one GPU's full reading, or one
    power-limit change. ``max_outstanding`` bounds the worker threads, hung ones included.
    """

    def __init__(
        self,
        nvml: Any = None,
        *,
        call_timeout_s: float = 2.0,
        max_outstanding: int = 4,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rejections: RejectionRecorder | None = None,
    ) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        if call_timeout_s <= 0 or max_outstanding < 1:
            raise ValueError("call_timeout_s must be > 0 and max_outstanding >= 1")
        self._nvml = nvml
        self._timeout_s = call_timeout_s
        self._max_outstanding = max_outstanding
        self._slots = asyncio.Semaphore(max_outstanding)
        self._clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._entered = False
        self._unsupported_logged: set[tuple[str, str]] = set()
        self._rejections = rejections

    # ---- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("NvmlGpus is already open; it cannot be entered twice")
        self._pool = ThreadPoolExecutor(self._max_outstanding, thread_name_prefix="nvml")
        try:
            await self._run(HOST_DEVICE_ID, "nvmlInit", self._nvml.nvmlInit)
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered:
            return
        self._entered = False
        try:
            await self._run(HOST_DEVICE_ID, "nvmlShutdown", self._nvml.nvmlShutdown)
        except DeviceError as err:
            # Shutting down must not mask the exception that ended the block, nor fail a clean
            # exit: the process is going away and NVML frees its state with it.
            log.warning("nvmlShutdown failed: %s", err)
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                # Don't wait: a hung call would block here for ever.
                pool.shutdown(wait=False, cancel_futures=True)

    # ---- the thread border ----------------------------------------------------------------

    async def _run(self, device_id: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread within the timeout; map NVML errors."""
        if self._pool is None:
            raise DeviceUnavailable(device_id, f"{what}: NVML driver is not open (use async with)")
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise DeviceTimeout(
                device_id,
                f"{what}: {self._max_outstanding} earlier NVML calls are still hung; not "
                "starting another",
            ) from None
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        # The slot comes back when the thread returns, not when we stop waiting for it.
        future.add_done_callback(lambda _: self._slots.release())
        future.add_done_callback(_consume_result)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DeviceTimeout(
                device_id, f"{what}: no answer from NVML within {self._timeout_s} s"
            ) from None
        except self._nvml.NVMLError as exc:
            raise map_nvml_error(device_id, what, exc) from exc

    # ---- readings -------------------------------------------------------------------------

    async def read_all(self) -> tuple[GpuReading, ...]:
        """One reading per GPU, in index order. A GPU that fails raises for the whole host."""
        count = await self._run(HOST_DEVICE_ID, "nvmlDeviceGetCount", self._nvml.nvmlDeviceGetCount)
        readings = []
        for index in range(count):
            readings.append(
                await self._run(f"gpu{index}", "reading GPU", self._read_index_blocking, index)
            )
        return tuple(readings)

    async def read_each(self) -> tuple[GpuReading | DeviceError, ...]:
        """Like ``read_all``, but a GPU that fails gives its error in its place, so one card
        off the bus does not hide the others."""
        count = await self._run(HOST_DEVICE_ID, "nvmlDeviceGetCount", self._nvml.nvmlDeviceGetCount)
        results: list[GpuReading | DeviceError] = []
        for index in range(count):
            try:
                results.append(
                    await self._run(f"gpu{index}", "reading GPU", self._read_index_blocking, index)
                )
            except DeviceError as err:
                results.append(err)
        return tuple(results)

    async def read(self, device_id: str) -> GpuReading:
        """One GPU's reading by UUID."""
        return await self._run(device_id, "reading GPU", self._read_uuid_blocking, device_id)

    def _read_index_blocking(self, index: int) -> GpuReading:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError as exc:
            raise map_nvml_error(f"gpu{index}", "reading GPU", exc) from exc
        return self._read_handle_blocking(handle, index, uuid)

    def _read_uuid_blocking(self, uuid: str) -> GpuReading:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            index = int(nvml.nvmlDeviceGetIndex(handle))
        except nvml.NVMLError as exc:
            raise map_nvml_error(uuid, "reading GPU", exc) from exc
        return self._read_handle_blocking(handle, index, uuid)

    def _read_handle_blocking(self, handle: Any, index: int, uuid: str) -> GpuReading:
        nvml = self._nvml
        field = "name"
        try:
            name = _text(nvml.nvmlDeviceGetName(handle))
            field = "power usage"
            power_mw = nvml.nvmlDeviceGetPowerUsage(handle)
            field = "power limit"
            limit_mw = nvml.nvmlDeviceGetPowerManagementLimit(handle)
            field = "power limit constraints"
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            field = "default power limit"
            default_mw = self._optional(
                uuid, field, nvml.nvmlDeviceGetPowerManagementDefaultLimit, handle, max_mw
            )
            field = "temperature"
            temperature_c = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            field = "memory"
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            # Utilization is "N/A" on MIG-enabled GPUs and energy on pre-Volta boards: report
            # NaN (not a made-up 0) and keep the rest of the reading.
            field = "utilization"
            util = self._optional(uuid, field, nvml.nvmlDeviceGetUtilizationRates, handle, None)
            field = "energy counter"
            energy_mj = self._optional(
                uuid, field, nvml.nvmlDeviceGetTotalEnergyConsumption, handle, math.nan
            )
            # Containers without the host PID namespace get NO_PERMISSION here.
            field = "running processes"
            procs = self._optional(
                uuid, field, nvml.nvmlDeviceGetComputeRunningProcesses, handle, []
            )
        except nvml.NVMLError as exc:
            raise map_nvml_error(uuid, f"reading {field}", exc) from exc
        try:
            return self._checked_reading(
                uuid,
                index,
                name,
                power_mw,
                limit_mw,
                min_mw,
                max_mw,
                default_mw,
                util,
                memory,
                temperature_c,
                energy_mj,
                procs,
            )
        except InputRejected as exc:
            record(self._rejections, "gpu", exc)  # one source label for every GPU
            raise BadReply(uuid, f"NVML reported {exc.message}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BadReply(uuid, f"NVML reported nonsense ({type(exc).__name__})") from None

    def _checked_reading(
        self,
        uuid: str,
        index: int,
        name: str,
        power_mw: Any,
        limit_mw: Any,
        min_mw: Any,
        max_mw: Any,
        default_mw: Any,
        util: Any,
        memory: Any,
        temperature_c: Any,
        energy_mj: Any,
        procs: Any,
    ) -> GpuReading:
        """Every number finite and physical after the mW→W conversion (NaN only where NVML
        lacks the reading: utilization on MIG, energy on pre-Volta boards)."""

        def watts(mw: Any, what: str) -> float:
            return finite_in_range(mw, 0.0, MAX_GPU_W, what, source=uuid, scale=1e-3, unit="W")

        def optional(value: Any, lo: float, hi: float, what: str, scale: float = 1.0) -> float:
            if isinstance(value, float) and math.isnan(value):
                return value
            return finite_in_range(value, lo, hi, what, source=uuid, scale=scale)

        mib = 1.0 / (1024 * 1024)
        return GpuReading(
            device_id=uuid,
            index=index,
            name=name[:128],
            at=self._clock(),
            power_w=watts(power_mw, "power usage"),
            power_limit_w=watts(limit_mw, "power limit"),
            min_limit_w=watts(min_mw, "minimum power limit"),
            max_limit_w=watts(max_mw, "maximum power limit"),
            default_limit_w=watts(default_mw, "default power limit"),
            utilization_pct=math.nan if util is None else optional(util.gpu, 0, 100, "util"),
            memory_used_mib=finite_in_range(memory.used, 0, 2**50, "memory", scale=mib),
            memory_total_mib=finite_in_range(memory.total, 0, 2**50, "memory", scale=mib),
            temperature_c=finite_in_range(temperature_c, -60, 250, "temperature", source=uuid),
            energy_j=optional(energy_mj, 0, 1e18, "energy counter", scale=1e-3),
            process_pids=tuple(int(p.pid) for p in procs[:MAX_PROCESSES]),
        )

    def _optional(
        self, uuid: str, field: str, fn: Callable[[Any], Any], handle: Any, default: Any
    ) -> Any:
        """A reading some boards or setups lack: the default instead, logged once per GPU."""
        try:
            return fn(handle)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) not in (_NOT_SUPPORTED, _NO_PERMISSION):
                raise
            if (uuid, field) not in self._unsupported_logged:
                self._unsupported_logged.add((uuid, field))
                log.info("%s: %s unavailable (%s); reporting without it", uuid, field, exc)
            return default

    # ---- commands -------------------------------------------------------------------------

    async def set_power_limit(self, device_id: str, watts: float) -> None:
        """Set the GPU's power limit; refuse a value outside its allowed range before asking."""
        if not isinstance(watts, int | float) or not math.isfinite(watts):
            raise CommandRejected(
                device_id, f"power limit must be a finite number of watts, got {watts!r}"
            )
        await self._run(
            device_id, "setting power limit", self._set_limit_blocking, device_id, watts
        )

    def _set_limit_blocking(self, uuid: str, watts: float) -> None:
        nvml = self._nvml
        step = "looking up GPU"
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            step = "reading power limit constraints"
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            limit_mw = round(watts * 1000)
            if not min_mw <= limit_mw <= max_mw:
                raise CommandRejected(
                    uuid,
                    f"power limit {watts:g} W is outside the allowed range "
                    f"{min_mw / 1000:g}–{max_mw / 1000:g} W; nothing changed",
                )
            step = f"setting power limit to {watts:g} W"
            nvml.nvmlDeviceSetPowerManagementLimit(handle, limit_mw)
            step = "reading back the power limit"
            applied_mw = nvml.nvmlDeviceGetPowerManagementLimit(handle)
        except nvml.NVMLError as exc:
            raise map_nvml_error(uuid, step, exc) from exc
        if applied_mw != limit_mw:
            raise CommandNotApplied(
                uuid, f"asked for {watts:g} W but the GPU reports {applied_mw / 1000:g} W"
            )
        log.info("%s: power limit set to %g W", uuid, watts)


def _consume_result(future: asyncio.Future[Any]) -> None:
    """Fetch a late thread's outcome so asyncio does not log 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()
