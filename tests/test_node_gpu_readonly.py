"""A node agent's read path on a GPU host, read only: real NVML where this machine has a driver.

The node agent is built as ``site-agent node`` builds it (``build_node``: its GPU fleet, local
jobs, its link to the controller, its ``/metrics`` with dcgm-exporter names). It polls its
GPUs, builds the views it would publish to the controller (the envelope ladder, measured power,
device count) and its ``DCGM_FI_DEV_*`` families; both are checked against what the driver
read. It runs twice: on the NVML simulator always (so the test itself is proven on every
machine), and on the real driver of a GPU machine (``-m gpu``; it skips where NVML has no
driver, as on CI).

Read only, by construction: no control cycle runs (a node that has not heard its controller
applies its fail direction after ``fail_after_s``, and a cycle would act), the link never
connects to a broker, and the node's GPU driver is wrapped so that any power-limit change
fails the test before it reaches NVML. Never change a real card's power limit, clocks or any
other setting.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.cli.demo_drivers import SimulatedGpus
from agent.cli.node_daemon import build_node
from agent.control.config import AgentConfig, ControlConfig, GpuNodeConfig, parse_config
from agent.control.node_protocol import decode_views
from agent.control.policy import decide
from agent.outputs.node_metrics import DcgmCollector
from agent.runtime.gpu_fleet import GpuFleet
from agent.runtime.registry import DriverRegistry, GpuNodeSpec, live_drivers
from drivers.gpus.base import GpuControl, GpuReading


class ReadOnlyGpus:
    """A GPU driver that may read and must never write: a write fails the test."""

    def __init__(self, inner: GpuControl) -> None:
        self.inner = inner
        self.writes: list[tuple[str, float]] = []

    async def __aenter__(self) -> ReadOnlyGpus:
        enter = getattr(self.inner, "__aenter__", None)
        if enter is not None:
            await enter()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leave = getattr(self.inner, "__aexit__", None)
        if leave is not None:
            await leave(kind, exc, tb)

    async def read_all(self) -> tuple[GpuReading, ...]:
        return await self.inner.read_all()

    async def set_power_limit(self, device_id: str, watts: float) -> None:
        self.writes.append((device_id, watts))
        raise AssertionError(f"the read-only test tried to set {device_id} to {watts:g} W")


def real_gpus() -> tuple[int, float, float] | None:
    """(count, min cap W, max cap W) of this host's GPUs, or None without a usable driver."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        lo, hi = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        return count, lo / 1000.0, hi / 1000.0
    finally:
        pynvml.nvmlShutdown()


def node_config(tmp: Path, driver: str, gpus: int, min_cap: float, max_cap: float) -> AgentConfig:
    line: dict[str, Any] = {
        "id": "gpu-ro",
        "gpus": gpus,
        "driver": driver,
        "min_cap_w": min_cap,
        "max_cap_w": max_cap,
        "host_overhead_w": 1000,
    }
    if driver == "nvml-sim":
        line["model"] = "H100-SXM"
    return parse_config(
        {
            "site": {"id": "ro-site", "interconnect_limit_kw": 100},
            "node": {
                "id": "gpu-ro",
                # Never reached: the link's broker session is not started here.
                "broker": {"host": "127.0.0.1", "port": 1, "username": "gpu-ro"},
                "fail_after_s": 3600,
                "journal_path": str(tmp / "node.json"),
            },
            "control": {"device_timeout_s": 5},
            "gpu_nodes": [line],
            "ai": {"scheduler": "local"},
            "prices": {"realtime": {"type": "constant", "value": 0}},
            "metrics": {"enabled": False, "port": 0},
        }
    )


@pytest.fixture(params=["nvml-sim", pytest.param("nvml", marks=pytest.mark.gpu)])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_node_agent_reads_its_gpus_and_publishes_views_read_only(
    tmp_path: Path, driver: str
) -> None:
    if driver == "nvml":
        found = real_gpus()
        if found is None:
            pytest.skip("no usable NVIDIA driver here: the real-GPU node check needs a GPU host")
        gpus, min_cap, max_cap = found
        base: DriverRegistry = live_drivers()
    else:
        gpus, min_cap, max_cap = 4, 200.0, 700.0
        base = SimulatedGpus().registry()
    guards: list[ReadOnlyGpus] = []
    inner_factory = base.gpus[driver]

    def read_only(spec: GpuNodeSpec, line: GpuNodeConfig, control: ControlConfig) -> GpuControl:
        guard = ReadOnlyGpus(inner_factory(spec, line, control))
        guards.append(guard)
        return guard

    config = node_config(tmp_path, driver, gpus, min_cap, max_cap)
    agent, link = build_node(config, store=None, drivers=base.with_(gpus={driver: read_only}))
    (fleet,) = [f for f in agent.fleets if isinstance(f, GpuFleet)]
    try:
        assert await fleet.poll() is None, "the node's GPUs did not answer"
        (guard,) = guards
        readings = await guard.read_all()
        assert len(readings) == gpus
        for r in readings:
            assert 0 < r.min_limit_w <= r.power_limit_w <= r.max_limit_w
            assert 0 <= r.power_w <= r.max_limit_w * 1.2
            assert r.memory_total_mib > 0

        # What the node would publish to its controller, from this poll (no cycle: no action).
        snapshot = agent.coordinator.snapshot()
        plan = replace(decide(snapshot, config, snapshot.at), actions=())  # pure: acts on nothing
        link.observe(snapshot, plan, [])
        topic, payload, retained = link.outbox.get_nowait()
        assert topic.endswith("/views")
        assert retained
        views = decode_views(payload, "gpu-ro")
        assert views.devices == 1  # one GPU host: its cards move together under one cap
        card_w = sum(r.power_w for r in readings)
        # Measured: the cards plus the host's overhead (two reads apart: within 20 %).
        assert views.measured_w == pytest.approx(card_w + 1000, rel=0.2)
        # The envelope range: at least the host's overhead, at most the cards at their top cap.
        assert 1000 <= views.floor_w <= views.max_w <= 1000 + gpus * max_cap + 1
        assert views.max_w >= 1000 + gpus * min_cap
        assert views.points, "no ladder for the controller to dispatch"

        # The node's /metrics families, with dcgm-exporter's names, from the same state.
        agent.publish()
        registry = CollectorRegistry()
        registry.register(DcgmCollector(agent.state, hostname="ro-host"))
        by_uuid: dict[str, dict[str, float]] = {}
        for family in registry.collect():
            for sample in family.samples:
                by_uuid.setdefault(sample.labels["UUID"], {})[sample.name] = sample.value
        for r in readings:
            got = by_uuid[r.device_id]
            assert got["DCGM_FI_DEV_ENFORCED_POWER_LIMIT"] == pytest.approx(r.power_limit_w)
            assert 0 <= got["DCGM_FI_DEV_POWER_USAGE"] <= r.max_limit_w * 1.2
        assert guard.writes == []
    finally:
        await fleet.aclose()
