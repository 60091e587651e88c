"""The node agent's process: the ordinary agent loop over its local fleet, plus its link.

Like :mod:`agent.cli.daemon` (journal, ``/metrics``, systemd notifications, signals), with the
controller's link (:class:`agent.runtime.node.NodeLink`) as the price source, as a grid source
(the granted envelope is a mandatory site cap) and as a cycle observer (acks and views).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from agent.control.config import AgentConfig
from agent.control.redaction import secrets_in
from agent.journal.store import Store, journal_path
from agent.outputs.logs import cycle_logger
from agent.outputs.metrics import MetricsService
from agent.outputs.node_metrics import DcgmCollector, NodeLinkCollector
from agent.runtime.coordinator import utc_now
from agent.runtime.loop import Agent, CycleHook, Service
from agent.runtime.node import NodeLink, node_will
from agent.runtime.registry import DriverRegistry
from agent.runtime.sdnotify import Notifier
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard
from agent.runtime.wiring import build_components
from drivers.bus.mqtt import MqttBus

log = logging.getLogger(__name__)


def build_node(
    config: AgentConfig,
    *,
    store: Store | None,
    drivers: DriverRegistry | None = None,
    extra_services: Sequence[Service] = (),
) -> tuple[Agent, NodeLink]:
    """The node's agent and its link, every part given at construction."""
    assert config.node is not None
    bus = MqttBus(config.node.broker.bus_settings(f"node-{config.node.id}", node_will(config)))
    wake_control = asyncio.Event()  # shared: a new envelope runs the node's cycle at once
    link = NodeLink(config, bus, wake=wake_control.set)
    state = AgentState(site_id=config.site.id, started_at=utc_now())
    tasks = TaskBoard()  # the supervised tasks' health: the supervisor writes, metrics read
    services: list[Service] = [link.run, link.tick, *extra_services]
    if config.metrics.enabled:
        metrics = MetricsService(state, config, tasks=tasks)
        metrics.registry.register(DcgmCollector(state))
        metrics.registry.register(NodeLinkCollector(link.metrics, link.node_id))
        services.append(metrics)
    observers: list[CycleHook] = [cycle_logger(state), link.observe]
    components = build_components(
        config, state, drivers=drivers, price_source=link, store=store, services=services
    )
    # The link is one more grid source: every other part stays as the wiring built it.
    components = replace(components, grid_sources=(*components.grid_sources, link))
    agent = Agent(
        config,
        components,
        state=state,
        tasks=tasks,
        observers=observers,
        wake_control=wake_control,
        event_watch_s=0.1,  # a new envelope reaches the policy within 0.1 s
    )
    return agent, link


async def serve_node(
    config: AgentConfig,
    config_file: Path,
    *,
    drivers: DriverRegistry | None = None,
    grace_s: float = 3.0,
) -> None:
    """Run the node until SIGTERM/SIGINT."""
    notifier = Notifier()
    path = journal_path(config.store.path, config_file)
    async with Store.open(path, known_secrets=secrets_in(config)) as store:
        agent, link = build_node(config, store=store, drivers=drivers)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            notifier.stopping("stopping on signal")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        notifier.ready(f"node {link.node_id} of site {config.site.id}")
        log.info("node agent %s running: journal %s", link.node_id, path)
        try:
            await agent.run(stop, grace_s=grace_s)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
