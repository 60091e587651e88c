"""A node agent's extra ``/metrics``: its GPUs under dcgm-exporter's own names, and its link.

A GPU host's dashboards and alerts are usually written against NVIDIA dcgm-exporter. A node
agent serves those families as dcgm-exporter names them (``DCGM_FI_DEV_*``, labels ``gpu``,
``UUID``, ``device``, ``modelName``, ``Hostname``), next to the ``site_agent_gpu_*`` families of
:mod:`agent.outputs.metrics`, so a host can drop dcgm-exporter without touching its dashboards.
Units are dcgm's: W, %, °C, MiB, mJ. The link's state (granted envelope, applied sequence,
refused commands) comes from a callable, so this module reads no runtime object.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.outputs.metrics import MetricsService
from agent.runtime.state import AgentState

LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]


class DcgmCollector(Collector):
    """``DCGM_FI_DEV_*`` families from the per-GPU readings in the agent's state."""

    def __init__(self, state: AgentState, hostname: str | None = None) -> None:
        self.state = state
        self.hostname = hostname or socket.gethostname()

    def collect(self) -> Iterator[Metric]:
        power = GaugeMetricFamily("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", labels=LABELS)
        limit = GaugeMetricFamily(
            "DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "Enforced power limit (in W).", labels=LABELS
        )
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=LABELS)
        temp = GaugeMetricFamily("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", labels=LABELS)
        mem = GaugeMetricFamily(
            "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=LABELS
        )
        # A gauge here only because prometheus_client appends _total to counters; dcgm-exporter
        # serves this name as it is, and dashboards query it by that name.
        energy = GaugeMetricFamily(
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            labels=LABELS,
        )
        for _node, readings in sorted(dict(self.state.gpu_readings).items()):
            for r in readings:
                values = [str(r.index), r.device_id, f"nvidia{r.index}", r.name, self.hostname]
                power.add_metric(values, r.power_w)
                limit.add_metric(values, r.power_limit_w)
                util.add_metric(values, r.utilization_pct)
                temp.add_metric(values, r.temperature_c)
                mem.add_metric(values, r.memory_used_mib)
                energy.add_metric(values, r.energy_j * 1000.0)
        yield from (power, limit, util, temp, mem, energy)


class NodeLinkCollector(Collector):
    """``site_agent_node_*``: the envelope a node holds and what it did with commands."""

    def __init__(self, read: Callable[[], Mapping[str, float]], node_id: str) -> None:
        self.read = read
        self.node_id = node_id

    def collect(self) -> Iterator[Metric]:
        values = self.read()
        envelope = GaugeMetricFamily(
            "site_agent_node_envelope_watts",
            "The power envelope this node holds (absent: none granted).",
            labels=["node"],
        )
        if values.get("envelope_w") is not None:
            envelope.add_metric([self.node_id], float(values["envelope_w"]))
        link_state = GaugeMetricFamily(
            "site_agent_node_state",
            "1 for the node's link state (online, holding, failsafe).",
            labels=["node", "state"],
        )
        for name in ("online", "holding", "failsafe"):
            link_state.add_metric([self.node_id, name], 1.0 if values.get(f"state_{name}") else 0.0)
        applied = GaugeMetricFamily(
            "site_agent_node_applied_seq", "Sequence of the last applied command.", labels=["node"]
        )
        applied.add_metric([self.node_id], float(values.get("applied_seq", 0)))
        refused = CounterMetricFamily(
            "site_agent_node_commands_refused",
            "Commands refused (malformed, replayed, stale, other version).",
            labels=["node"],
        )
        refused.add_metric([self.node_id], float(values.get("refused", 0)))
        yield from (envelope, link_state, applied, refused)


class RemoteNodesCollector(Collector):
    """``site_agent_remote_node_*`` on the controller: each node agent's power, grant and acks."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        rows = self.read()
        power = GaugeMetricFamily(
            "site_agent_remote_node_power_watts",
            "A node agent's power as its own telemetry reports it.",
            labels=["node"],
        )
        envelope = GaugeMetricFamily(
            "site_agent_remote_node_envelope_watts",
            "The power envelope last granted to a node agent (absent: none granted).",
            labels=["node"],
        )
        acks = CounterMetricFamily(
            "site_agent_remote_node_acks", "Acks received from a node agent.", labels=["node"]
        )
        applied = GaugeMetricFamily(
            "site_agent_remote_node_applied_seq",
            "Sequence of the last command a node agent reports applied.",
            labels=["node"],
        )
        faulted = GaugeMetricFamily(
            "site_agent_remote_node_faulted",
            "1 while a node agent is faulted (silent, or a command not confirmed).",
            labels=["node"],
        )
        for node, row in sorted(rows.items()):
            if "measured_w" in row:
                power.add_metric([node], row["measured_w"])
            if "envelope_w" in row:
                envelope.add_metric([node], row["envelope_w"])
            if "applied_seq" in row:
                applied.add_metric([node], row["applied_seq"])
            acks.add_metric([node], row.get("acks", 0.0))
            faulted.add_metric([node], row.get("faulted", 0.0))
        yield from (power, envelope, acks, applied, faulted)


def register_remote_nodes(metrics: MetricsService, fleets: Iterable[object]) -> int:
    """Register a :class:`RemoteNodesCollector` on ``metrics`` (a MetricsService) for every
    fleet of node agents among ``fleets`` (those with ``link_metrics``); how many."""
    found = 0
    for fleet in fleets:
        read = getattr(fleet, "link_metrics", None)
        if callable(read):
            metrics.registry.register(RemoteNodesCollector(read))
            found += 1
    return found
