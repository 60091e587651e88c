"""The driver registry: which driver serves each config line, keyed by what the config says.

Miners are keyed by ``firmware:``, GPU nodes by ``driver:``, the job scheduler by
``ai.scheduler:``. Each entry is a factory that gets the config line (the settings model that
driver reads) and returns a driver behind its protocol (``drivers/*/base.py``); a factory
refuses what it cannot serve by raising :class:`DriverConfigError` with a one-line reason, which
the builder reports with the file and the key.

:func:`live_drivers` has the drivers of the running site (pyasic for LuxOS, NVML, Slurm, local
processes). Simulated devices are never registered here: ``site-agent demo``, ``site-agent sim``
and the tests add their own factories (``agent/cli/demo_drivers.py``) to a copy. The multi-family
miner driver (``firmware: braiins|antminer|whatsminer|auto``) is registered in :func:`live_drivers`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

from agent.control.config import AgentConfig, ControlConfig, GpuNodeConfig, MinerConfig
from agent.runtime.miner_fleet import MinerDevice
from drivers.gpus.base import GpuControl
from drivers.jobs.base import JobControl
from drivers.miners.base import MinerProfile


class DriverConfigError(ValueError):
    """A config line its driver cannot serve; the message says why, in one line.

    ``key`` is the key under the line that is wrong (``model``, ``sim_jobs.0.node``), ``""`` for
    the line as a whole, or None for the key that chose the driver.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def where(self, line: str, default_key: str) -> str:
        """The config path this error is about: ``gpu_nodes.0.model``, ``ai.scheduler``..."""
        key = default_key if self.key is None else self.key
        return f"{line}.{key}" if key else line


@dataclass(frozen=True, slots=True)
class MinerLine:
    """One miner to build a driver for: an expanded ``miners:`` line."""

    device_id: str
    address: str
    config: MinerConfig  # its firmware, credentials...
    semaphore: asyncio.Semaphore  # shared by the whole fleet: bounds concurrent device calls
    timeout_s: float
    ladder: tuple[MinerProfile, ...] = ()  # its model's profiles, for target/limit families


@dataclass(frozen=True, slots=True)
class GpuNodeSpec:
    """One GPU node as configured (a ``count`` line expanded into one spec per node)."""

    device_id: str
    scheduler_node: str
    gpus: int
    min_cap_w: float
    max_cap_w: float
    idle_w: float
    host_overhead_w: float
    circuit: str | None = None


MinerFactory = Callable[[MinerLine], MinerDevice]
GpuFactory = Callable[[GpuNodeSpec, GpuNodeConfig, ControlConfig], GpuControl]
JobsFactory = Callable[[AgentConfig, Sequence[GpuNodeSpec]], JobControl]


@dataclass(slots=True)
class DriverRegistry:
    """Factories by config key. :meth:`with_` gives a copy with more (demo, tests).

    Some keys of a config line belong to its driver, not to every line (:data:`MINER_KEYS`,
    :data:`GPU_KEYS`). ``reads`` says which of them each driver reads (``"firmware:braiins":
    {"credentials"}``); such a key set on a line whose driver does not read it is refused, so
    that no config key is silently ignored.
    """

    miners: dict[str, MinerFactory] = field(default_factory=dict)
    gpus: dict[str, GpuFactory] = field(default_factory=dict)
    jobs: dict[str, JobsFactory] = field(default_factory=dict)
    reads: dict[str, frozenset[str]] = field(default_factory=dict)

    def with_(
        self,
        *,
        miners: Mapping[str, MinerFactory] | None = None,
        gpus: Mapping[str, GpuFactory] | None = None,
        jobs: Mapping[str, JobsFactory] | None = None,
        reads: Mapping[str, frozenset[str]] | None = None,
    ) -> DriverRegistry:
        return DriverRegistry(
            {**self.miners, **(miners or {})},
            {**self.gpus, **(gpus or {})},
            {**self.jobs, **(jobs or {})},
            {**self.reads, **(reads or {})},
        )

    def miner(self, line: MinerLine) -> MinerDevice:
        firmware = line.config.firmware
        factory = _pick(self.miners, firmware, "firmware")
        self._all_read(line.config, MINER_KEYS, f"firmware:{firmware}")
        return factory(line)

    def gpu(self, spec: GpuNodeSpec, line: GpuNodeConfig, control: ControlConfig) -> GpuControl:
        factory = _pick(self.gpus, line.driver, "driver")
        self._all_read(line, GPU_KEYS, f"driver:{line.driver}")
        return factory(spec, line, control)

    def _all_read(self, line: BaseModel, keys: frozenset[str], driver: str) -> None:
        unread = sorted((line.model_fields_set & keys) - self.reads.get(driver, frozenset()))
        if unread:
            kind, _, name = driver.partition(":")
            raise DriverConfigError(
                f"{kind} {name} does not read this key; remove it", key=unread[0]
            )

    def scheduler(self, config: AgentConfig, specs: Sequence[GpuNodeSpec]) -> JobControl:
        return _pick(self.jobs, config.ai.scheduler, "scheduler")(config, specs)


# Keys of a line that only some drivers read.
MINER_KEYS = frozenset({"credentials"})  # firmware that needs a login
GPU_KEYS = frozenset({"model"})  # the simulated card's model (real NVML reports its own)

_NOT_HERE = {
    "nvml-sim": "is simulated: only site-agent demo, site-agent sim and the tests have it; use "
    "nvml on the GPU host",
    "sim": "is the simulated scheduler: only site-agent demo, site-agent sim and the tests have "
    "it; use slurm or local",
    "mqtt-node": "(a node agent on a remote GPU host, over MQTT) is not a gpu_nodes line: run "
    "site-agent node on that host and list it under remote_nodes.nodes",
}

F = TypeVar("F")


def _pick(table: Mapping[str, F], key: str, what: str) -> F:
    factory = table.get(key)
    if factory is None:
        why = _NOT_HERE.get(key, "has no driver in this build")
        raise DriverConfigError(f"{key} {why} (available {what}s: {', '.join(sorted(table))})")
    return factory


# --- the live drivers (vendor libraries load when a driver is built, not at import) ------------


def _luxos(line: MinerLine) -> MinerDevice:
    """LuxOS through pyasic; its API opens sessions without a login (no ``credentials``)."""
    from drivers.miners.pyasic_driver import PyasicMiner

    return PyasicMiner.luxos(
        line.address, line.semaphore, device_id=line.device_id, timeout_s=line.timeout_s
    )


def _family(line: MinerLine) -> MinerDevice:
    """Braiins OS+, stock Antminer, Whatsminer or ``auto`` (identified on the first call)
    through the same pyasic driver; ``credentials`` go where each family logs in."""
    from drivers.miners.pyasic_driver import PyasicMiner

    creds = line.config.credentials
    try:
        return PyasicMiner.for_firmware(
            line.address,
            line.config.firmware,
            line.semaphore,
            device_id=line.device_id,
            timeout_s=line.timeout_s,
            ladder=line.ladder,
            credentials=(creds.username, creds.password.get_secret_value()) if creds else None,
        )
    except ValueError as exc:
        raise DriverConfigError(str(exc), key="address") from None


def _nvml(spec: GpuNodeSpec, line: GpuNodeConfig, control: ControlConfig) -> GpuControl:
    from drivers.gpus.nvml import NvmlGpus

    return NvmlGpus(call_timeout_s=min(2.0, control.device_timeout_s))


def _slurm(config: AgentConfig, specs: Sequence[GpuNodeSpec]) -> JobControl:
    from drivers.jobs.slurm import JobClassRules, SlurmJobs

    return SlurmJobs(rules=JobClassRules(sources=(config.ai.class_from,)))


def _local(config: AgentConfig, specs: Sequence[GpuNodeSpec]) -> JobControl:
    from drivers.jobs.local import LocalJobs

    if len(specs) != 1:
        raise DriverConfigError(
            f"local runs jobs on this host, so it needs exactly one GPU node (got {len(specs)})"
        )
    return LocalJobs(node=specs[0].scheduler_node)


def live_drivers() -> DriverRegistry:
    """The drivers of a real site: LuxOS, and the family driver for the other firmwares."""
    logs_in = frozenset({"credentials"})
    return DriverRegistry(
        miners={
            "luxos": _luxos,
            "braiins": _family,
            "antminer": _family,
            "whatsminer": _family,
            "auto": _family,
        },
        reads={f"firmware:{f}": logs_in for f in ("braiins", "antminer", "whatsminer", "auto")},
        gpus={"nvml": _nvml},
        jobs={"slurm": _slurm, "local": _local},
    )
