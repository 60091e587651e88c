"""An in-process NVML stand-in: the pynvml functions, constants and error classes the GPU driver
uses, backed by simulated GPUs with power physics and fault injection.

``SimNvml`` is "module-like": hand an instance to the NVML driver where it would take ``pynvml``.
Each ``SimGpu`` follows simple physics, in SI units internally and NVML units (mW, mJ, bytes) at
the API:

* board power = idle + (cap - idle) x utilization, so a busy GPU runs at its cap and never above;
* throughput fraction = utilization x (1 - (1 - c)^2) with c = cap / max limit, the concave curve
  of economics.md (half the power still gives three quarters of the work);
* temperature relaxes towards ambient + k x power with a first-order lag (``THERMAL_TAU_S``);
* the energy counter integrates power over the injected clock.

Faults: ``fall_off_bus()`` makes every call on that GPU raise ``NVMLError_GpuIsLost`` (as a real
card does after an Xid 79); ``hang()`` makes calls on that GPU block until ``release()`` (or a
safety deadline, so a forgotten hang cannot wedge a test run). An out-of-range power limit raises
``NVMLError_InvalidArgument``, as the real driver does; ``privileged=False`` makes setting a
limit raise ``NVMLError_NoPermission`` like a non-root caller.

This module imports neither ``agent`` nor ``drivers``.
"""

from __future__ import annotations

import math
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Values are NVML's own (nvml.h / pynvml), so code that compares codes behaves identically.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0

_ERROR_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_IN_USE: "In Use",
    NVML_ERROR_MEMORY: "Insufficient Memory",
    NVML_ERROR_NO_DATA: "No Data",
    NVML_ERROR_NOT_READY: "Not Ready",
    NVML_ERROR_GPU_NOT_FOUND: "GPU Not Found",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like ``pynvml.NVMLError``: ``NVMLError(code)`` yields the subclass for that code."""

    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, NVMLError)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {"__module__": __name__})
    NVMLError._by_code[code] = cls
    return cls


# The subclasses pynvml generates, under the same names (NVML_ERROR_GPU_IS_LOST -> ..._GpuIsLost).
NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_Timeout = _error_class("NVMLError_Timeout", NVML_ERROR_TIMEOUT)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

MIB = 1024 * 1024
AMBIENT_C = 30.0
THERMAL_TAU_S = 30.0
# Every model reaches ambient + this many kelvin when drawing its maximum limit.
_RISE_AT_MAX_K = 45.0
# A hung call gives up after this long even if nobody calls release(): a forgotten hang must
# not keep a test process alive for ever (a real hung ioctl would).
HANG_SAFETY_S = 60.0


@dataclass(frozen=True, slots=True)
class GpuModel:
    """Static facts of a GPU model, as ``nvidia-smi -q`` reports them."""

    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    idle_w: float
    memory_total_mib: int


# H100 SXM5 from NVIDIA's datasheet (700 W TDP, settable down to 200 W); the others from the
# recorded `nvidia-smi -q -x` files in shared/data/fixtures/nvidia-smi (names, limits, memory,
# idle draw).
H100_SXM = GpuModel("NVIDIA H100 80GB HBM3", 200.0, 700.0, 700.0, 70.0, 81559)
A100_SXM4_80GB = GpuModel("NVIDIA A100-SXM4-80GB", 100.0, 500.0, 500.0, 67.0, 81920)
A10G = GpuModel("NVIDIA A10G", 100.0, 300.0, 300.0, 25.6, 23028)
TESLA_T4 = GpuModel("Tesla T4", 60.0, 70.0, 70.0, 26.8, 15360)
MODELS: dict[str, GpuModel] = {
    "h100-sxm": H100_SXM,
    "a100-sxm4-80gb": A100_SXM4_80GB,
    "a10g": A10G,
    "t4": TESLA_T4,
}


def model_named(name: str) -> GpuModel:
    """A model by config name ("H100-SXM", "a10g", "T4") or NVML name ("Tesla T4")."""
    key = name.strip().lower()
    for short, model in MODELS.items():
        if key in (short, model.name.lower(), model.name.lower().removeprefix("nvidia ")):
            return model
    if key == "tesla-t4":
        return TESLA_T4
    raise ValueError(f"unknown GPU model {name!r}; known: {', '.join(MODELS)}")


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What ``nvmlDeviceGetComputeRunningProcesses`` returns per process."""

    pid: int
    usedGpuMemory: int  # bytes; pynvml's field name
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Utilization:
    """What ``nvmlDeviceGetUtilizationRates`` returns (percent)."""

    gpu: int
    memory: int


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """What ``nvmlDeviceGetMemoryInfo`` returns (bytes)."""

    total: int
    free: int
    used: int


@dataclass(slots=True)
class _Process:
    pid: int
    memory_mib: float
    utilization_pct: float
    suspended: bool = False


@dataclass(eq=False)
class SimGpu:
    """One simulated GPU; also the NVML handle the module functions take."""

    model: GpuModel
    index: int
    clock: Callable[[], float]
    uuid: str = ""
    power_limit_w: float = 0.0
    load_pct: float = 0.0  # utilization from work that is not a listed process
    # The air the card breathes (a site's ambient curve: a hot afternoon); AMBIENT_C if None.
    ambient: Callable[[], float] | None = None
    # The lag of the card's temperature behind its power and air (tests shorten it).
    thermal_tau_s: float = THERMAL_TAU_S
    _processes: dict[int, _Process] = field(default_factory=dict)
    _temperature_c: float = AMBIENT_C
    _energy_j: float = 0.0
    _last_s: float = 0.0
    _lost: bool = False
    _hang: threading.Event | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = f"GPU-{uuidlib.uuid4()}"
        if not self.power_limit_w:
            self.power_limit_w = self.model.default_limit_w
        self._last_s = self.clock()

    # ---- physics --------------------------------------------------------------------------

    @property
    def utilization_pct(self) -> float:
        # The lock: NVML calls read from worker threads while jobs attach on the event loop.
        with self._lock:
            active = sum(p.utilization_pct for p in self._processes.values() if not p.suspended)
        return min(100.0, max(0.0, self.load_pct + active))

    @property
    def power_w(self) -> float:
        """Board power now: idle plus the share of the cap the utilization drives."""
        cap = self.power_limit_w
        idle = min(self.model.idle_w, cap)
        return idle + (cap - idle) * self.utilization_pct / 100.0

    @property
    def throughput_fraction(self) -> float:
        """Work done per unit time relative to an uncapped, fully busy GPU."""
        c = self.power_limit_w / self.model.max_limit_w
        return (self.utilization_pct / 100.0) * (1.0 - (1.0 - c) ** 2)

    @property
    def temperature_c(self) -> float:
        self._advance()
        return self._temperature_c

    @property
    def energy_j(self) -> float:
        self._advance()
        return self._energy_j

    def _advance(self) -> None:
        """Integrate energy and temperature up to now; power is constant between changes."""
        with self._lock:
            now = self.clock()
            dt = now - self._last_s
            if dt <= 0:
                return
            power = self.power_w
            self._energy_j += power * dt
            air = AMBIENT_C if self.ambient is None else self.ambient()
            target = air + _RISE_AT_MAX_K * power / self.model.max_limit_w
            self._temperature_c = target + (self._temperature_c - target) * math.exp(
                -dt / self.thermal_tau_s
            )
            self._last_s = now

    # ---- what jobs do ---------------------------------------------------------------------

    def attach(self, pid: int, memory_mib: float, utilization_pct: float) -> None:
        """A process starts using this GPU."""
        with self._lock:
            self._advance()
            self._processes[pid] = _Process(pid, memory_mib, utilization_pct)

    def detach(self, pid: int) -> None:
        with self._lock:
            self._advance()
            self._processes.pop(pid, None)

    def suspend(self, pid: int) -> None:
        """The process is stopped: it keeps its memory but does no work (utilization 0)."""
        with self._lock:
            self._advance()
            self._processes[pid].suspended = True

    def resume(self, pid: int) -> None:
        with self._lock:
            self._advance()
            self._processes[pid].suspended = False

    def set_load(self, utilization_pct: float) -> None:
        """Utilization from work that is not a listed process."""
        with self._lock:
            self._advance()
            self.load_pct = utilization_pct

    # ---- faults ---------------------------------------------------------------------------

    def fall_off_bus(self) -> None:
        """Every later call on this GPU raises GPU_IS_LOST (a real card needs a reset)."""
        self._lost = True

    def hang(self) -> None:
        """Later calls on this GPU block until ``release()``."""
        self._hang = threading.Event()

    def release(self) -> None:
        if self._hang is not None:
            self._hang.set()
            self._hang = None

    def _enter_call(self) -> None:
        hang = self._hang
        if hang is not None:
            hang.wait(HANG_SAFETY_S)
        if self._lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)

    # ---- commands -------------------------------------------------------------------------

    def _set_limit(self, watts: float) -> None:
        self._advance()
        self.power_limit_w = watts

    @property
    def memory_used_mib(self) -> float:
        with self._lock:
            return sum(p.memory_mib for p in self._processes.values())

    def process_list(self) -> list[ProcessInfo]:
        with self._lock:
            return [ProcessInfo(p.pid, int(p.memory_mib * MIB)) for p in self._processes.values()]


class SimNvml:
    """A module-like NVML: pass it to the driver in place of ``pynvml``.

    ``gpus`` lists the models in index order. ``clock`` (seconds, monotonic) drives the
    energy counter and the thermal lag; tests pass a fake one and step it.
    """

    # Error classes and constants as attributes, so ``nvml.NVMLError`` works as with pynvml.
    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def __init__(
        self,
        gpus: Sequence[GpuModel] = (H100_SXM,),
        *,
        clock: Callable[[], float] = time.monotonic,
        privileged: bool = True,
        driver_loaded: bool = True,
        ambient_c: Callable[[], float] | None = None,
    ) -> None:
        self.clock = clock
        self.privileged = privileged
        self.driver_loaded = driver_loaded
        self.gpus: list[SimGpu] = [
            SimGpu(model=m, index=i, clock=clock, ambient=ambient_c) for i, m in enumerate(gpus)
        ]
        self.init_count = 0
        self.calls: list[str] = []  # every API call by name, so tests can see what was (not) done

    def gpu(self, uuid: str) -> SimGpu:
        """The simulated GPU with this UUID (for jobs and fault injection)."""
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise KeyError(uuid)

    # ---- lifecycle ------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if not self.driver_loaded:
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, name: str, handle: Any) -> SimGpu:
        self._check(name)
        if not isinstance(handle, SimGpu):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle._enter_call()
        return handle

    # ---- device enumeration ---------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimGpu:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        gpu._enter_call()
        return gpu

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> SimGpu:
        self._check("nvmlDeviceGetHandleByUUID")
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == wanted:
                gpu._enter_call()
                return gpu
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    # ---- readings (NVML units) ------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetName", handle).model.name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._gpu("nvmlDeviceGetIndex", handle).index

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return round(self._gpu("nvmlDeviceGetPowerUsage", handle).power_w * 1000)

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return round(self._gpu("nvmlDeviceGetPowerManagementLimit", handle).power_limit_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return round(self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_w * 1000)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        model = self._gpu("nvmlDeviceGetPowerManagementLimitConstraints", handle).model
        return [round(model.min_limit_w * 1000), round(model.max_limit_w * 1000)]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        model = self._gpu("nvmlDeviceGetPowerManagementDefaultLimit", handle).model
        return round(model.default_limit_w * 1000)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        gpu = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        util = round(gpu.utilization_pct)
        return Utilization(gpu=util, memory=round(util * 0.6))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return round(gpu.temperature_c)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo:
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        total = gpu.model.memory_total_mib * MIB
        used = min(total, int(gpu.memory_used_mib * MIB))
        return MemoryInfo(total=total, free=total - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[ProcessInfo]:
        return self._gpu("nvmlDeviceGetComputeRunningProcesses", handle).process_list()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return round(self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_j * 1000)

    # ---- commands -------------------------------------------------------------------------

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit_mw: int) -> None:
        gpu = self._gpu("nvmlDeviceSetPowerManagementLimit", handle)
        if not self.privileged:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        model = gpu.model
        if not round(model.min_limit_w * 1000) <= limit_mw <= round(model.max_limit_w * 1000):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu._set_limit(limit_mw / 1000.0)
