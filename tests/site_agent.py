"""Builds the real Agent for tests the way the daemon does: state first, then every part.

Outputs that read the agent's state (metrics, MQTT) are built from it (and from the supervised
tasks' board) before the agent, and handed in with the rest at construction, as
:func:`agent.cli.daemon.serve` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from agent.control.config import AgentConfig
from agent.journal.store import Store
from agent.outputs.metrics import MetricsService
from agent.outputs.node_metrics import register_remote_nodes
from agent.runtime.fleet import Fleet
from agent.runtime.inbox import CommandInbox
from agent.runtime.loop import Agent, CycleHook, Service
from agent.runtime.registry import DriverRegistry
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard
from agent.runtime.wiring import build_components
from drivers.prices.base import PriceSource


def build_agent(
    config: AgentConfig,
    *,
    outputs: Callable[[AgentState], Sequence[Service]] = lambda _state: (),
    observers: Callable[[AgentState], Sequence[CycleHook]] = lambda _state: (),
    store: Store | None = None,
    drivers: DriverRegistry | None = None,
    fleets: Sequence[Fleet] | None = None,
    price_source: PriceSource | None = None,
    inbox: CommandInbox | None = None,
    metrics: bool = False,
) -> Agent:
    state = AgentState(site_id=config.site.id, started_at=datetime.now(UTC))
    tasks = TaskBoard()
    services = list(outputs(state))
    service = MetricsService(state, config, tasks=tasks) if metrics else None
    if service is not None:
        services.append(service)
    components = build_components(
        config,
        state,
        drivers=drivers,
        fleets=fleets,
        price_source=price_source,
        store=store,
        services=services,
    )
    if service is not None:  # as the daemon does: per-node figures of remote node agents
        register_remote_nodes(service, components.fleets)
    return Agent(
        config, components, state=state, tasks=tasks, observers=observers(state), inbox=inbox
    )


def metrics_port(agent: Agent) -> int:
    """The port the agent's ``/metrics`` is bound to (it must be serving)."""
    service = next(s for s in agent.components.services if isinstance(s, MetricsService))
    assert service.started.is_set(), "metrics not serving yet"
    return service.port
