"""Simulated GPU nodes and job scheduler as registered drivers, for the demo and the tests.

The live registry (:func:`agent.runtime.registry.live_drivers`) knows only real devices. The
demo, ``site-agent sim`` and the tests add these factories to a copy of it:

* ``driver: nvml-sim`` — per node, a :class:`~simulators.nvml.SimNvml` of the line's ``model``
  (its cap range checked against what that card allows) behind the real NVML driver;
* ``ai.scheduler: sim`` — one :class:`~simulators.jobs.SimScheduler` over those simulated GPUs,
  running ``ai.sim_jobs`` (or a default mix per node) behind the simulated-jobs driver.

A :class:`SimulatedGpus` keeps what it built (:class:`GpuSimulation`), so the demo and the tests
can read the simulated truth (true GPU power, the scheduler's jobs) and inject faults.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.control.config import (
    AgentConfig,
    ControlConfig,
    GpuNodeConfig,
    JobClassContract,
    SimJobConfig,
)
from agent.runtime.gpu_fleet import GpuFleet, build_gpu_fleet
from agent.runtime.registry import DriverConfigError, DriverRegistry, GpuNodeSpec, live_drivers
from drivers.gpus.base import GpuControl
from drivers.gpus.nvml import NvmlGpus
from drivers.jobs.base import JobControl
from drivers.jobs.sim import SimJobs
from simulators.jobs import SimScheduler
from simulators.nvml import SimNvml, model_named


@dataclass(slots=True)
class GpuSimulation:
    """The simulated side of a site: NVML stand-ins per node and the job scheduler."""

    nvml: dict[str, SimNvml] = field(default_factory=dict)  # node id -> its simulated NVML
    scheduler: SimScheduler | None = None

    def gpu_power_w(self) -> float:
        """True power of every simulated GPU (what a meter on the cards would read)."""
        return sum(g.power_w for nvml in self.nvml.values() for g in nvml.gpus)


class SimulatedGpus:
    """Factories for ``nvml-sim`` nodes and the ``sim`` scheduler; keeps what they built."""

    def __init__(self, *, sim_clock: Callable[[], float] = time.time) -> None:
        self.sim_clock = sim_clock
        self.simulation = GpuSimulation()

    def registry(self, base: DriverRegistry | None = None) -> DriverRegistry:
        return (base or live_drivers()).with_(
            gpus={"nvml-sim": self.gpu},
            jobs={"sim": self.scheduler},
            reads={"driver:nvml-sim": frozenset({"model"})},
        )

    def gpu(self, spec: GpuNodeSpec, line: GpuNodeConfig, control: ControlConfig) -> GpuControl:
        try:
            model = model_named(line.model)
        except ValueError as exc:
            raise DriverConfigError(str(exc), key="model") from None
        if spec.min_cap_w < model.min_limit_w or spec.max_cap_w > model.max_limit_w:
            raise DriverConfigError(
                f"cap range {spec.min_cap_w:g}–{spec.max_cap_w:g} W is outside what a "
                f"{model.name} allows ({model.min_limit_w:g}–{model.max_limit_w:g} W)",
                key="",
            )
        nvml = SimNvml([model] * spec.gpus)
        self.simulation.nvml[spec.device_id] = nvml
        return NvmlGpus(nvml, call_timeout_s=min(2.0, control.device_timeout_s))

    def scheduler(self, config: AgentConfig, specs: Sequence[GpuNodeSpec]) -> JobControl:
        sims = self.simulation.nvml
        real = [spec.device_id for spec in specs if spec.device_id not in sims]
        if real:
            raise DriverConfigError(
                f"sim runs simulated jobs on simulated GPUs, but {', '.join(real)} use real "
                "NVML; use slurm or local"
            )
        ai = config.ai
        by_sched = {spec.scheduler_node: spec for spec in specs}
        scheduler = SimScheduler(
            {spec.scheduler_node: sims[spec.device_id].gpus for spec in specs},
            clock=self.sim_clock,
        )
        node_ids = {spec.device_id: spec.scheduler_node for spec in specs}
        for k, job in enumerate(ai.sim_jobs or default_mix(specs)):
            if job.node is not None and job.node not in node_ids:
                raise DriverConfigError(
                    f"unknown GPU node {job.node!r} (known: {', '.join(node_ids)})",
                    key=f"sim_jobs.{k}.node",
                )
            pinned = None if job.node is None else node_ids[job.node]
            room = by_sched[pinned].gpus if pinned else max(s.gpus for s in specs)
            if job.gpus > room:
                raise DriverConfigError(
                    f"{job.gpus} GPUs, but no node has more than {room}",
                    key=f"sim_jobs.{k}.gpus",
                )
            contract: JobClassContract = getattr(ai, job.job_class)
            for _ in range(job.count):
                scheduler.submit(
                    job_class=job.job_class,
                    gpus=job.gpus,
                    node=pinned,
                    utilization_pct=job.utilization_pct,
                    checkpoint_interval_s=contract.checkpoint_interval_s,
                )
        self.simulation.scheduler = scheduler
        return SimJobs(scheduler)


def default_mix(specs: Sequence[GpuNodeSpec]) -> list[SimJobConfig]:
    """Per node: a quarter of the GPUs in an SLA job, half preemptible, the rest filler."""
    mix: list[SimJobConfig] = []
    for spec in specs:
        sla = max(1, spec.gpus // 4)
        preemptible = spec.gpus // 2
        filler = spec.gpus - sla - preemptible
        for job_class, gpus in (("sla", sla), ("preemptible", preemptible), ("filler", filler)):
            if gpus > 0:
                mix.append(
                    SimJobConfig.model_validate(
                        {"job_class": job_class, "gpus": gpus, "node": spec.device_id}
                    )
                )
    return mix


def build_simulated_gpu_fleet(
    config: AgentConfig,
    *,
    sim_clock: Callable[[], float] = time.time,
    clock: Callable[[], datetime] | None = None,
    **kwargs: Any,
) -> tuple[GpuFleet, GpuSimulation]:
    """The GPU fleet of ``config`` with the simulated drivers available, and their simulation."""
    sims = SimulatedGpus(sim_clock=sim_clock)
    fleet = build_gpu_fleet(config, drivers=sims.registry(), clock=clock, **kwargs)
    return fleet, sims.simulation
