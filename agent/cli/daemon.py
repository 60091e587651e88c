"""``site-agent run``: the daemon as systemd starts it, wiring the runtime to its outputs.

The runtime never imports an output; this is where they meet. Opens the journal (a journal that
cannot be opened stops the start with a clear error: running without one would lose what was
shed), builds the state, the supervised tasks' board, the outputs that read them and the operator
inbox, then the drivers and the agent with every part at once; tells systemd READY, feeds the
watchdog from the control loop, and says STOPPING on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from agent.control.config import AgentConfig
from agent.control.redaction import secrets_in
from agent.journal.store import Store, journal_path
from agent.outputs.logs import cycle_logger
from agent.outputs.metrics import MetricsService
from agent.outputs.mqtt import MqttBridge
from agent.outputs.node_metrics import register_remote_nodes
from agent.runtime.coordinator import utc_now
from agent.runtime.inbox import CommandInbox
from agent.runtime.loop import Agent, CycleHook, Service, first_poll_timeout_s
from agent.runtime.sdnotify import LoopWatchdog, Notifier
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard
from agent.runtime.wiring import build_components

log = logging.getLogger(__name__)


async def serve(config: AgentConfig, config_file: Path, *, grace_s: float = 3.0) -> None:
    """Run the agent until SIGTERM/SIGINT, with journal, systemd notifications and watchdog."""
    notifier = Notifier()
    path = journal_path(config.store.path, config_file)
    async with Store.open(path, known_secrets=secrets_in(config)) as store:
        state = AgentState(site_id=config.site.id, started_at=utc_now())
        tasks = TaskBoard()  # the supervised tasks' health: the supervisor writes, outputs read
        inbox = CommandInbox()
        control = config.control
        # A healthy cycle can take a full round of device timeouts and retries; the first one
        # also waits for the first fleet poll.
        stall_s = max(
            first_poll_timeout_s(control),
            control.interval_s + (control.retries + 1) * control.device_timeout_s * 2,
        )
        watchdog = LoopWatchdog(notifier, max_stall_s=stall_s)
        services: list[Service] = [watchdog.run]
        observers: list[CycleHook] = [cycle_logger(state)]
        metrics = MetricsService(state, config, tasks=tasks) if config.metrics.enabled else None
        if metrics is not None:
            services.append(metrics)
        if config.mqtt.enabled:
            bridge = MqttBridge(
                config.mqtt,
                state,
                inbox.submit,
                count_rejected=inbox.reject,
                audit_rejection=inbox.audit,
                interconnect_limit_w=config.site.interconnect_limit_kw * 1000.0,
                tasks=tasks,
            )
            observers.append(lambda _snapshot, _plan, _results: bridge.publish_cycle())
            services.append(bridge)
        components = build_components(config, state, store=store, services=services)
        if metrics is not None:
            register_remote_nodes(metrics, components.fleets)
        agent = Agent(
            config,
            components,
            state=state,
            tasks=tasks,
            observers=observers,
            inbox=inbox,
            watchdog=watchdog.beat,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            notifier.stopping("stopping on signal")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        notifier.ready(f"site {config.site.id}: {len(agent.fleets)} fleet(s), journal {path}")
        log.info("site-agent running: site %s, journal %s", config.site.id, path)
        try:
            await agent.run(stop, grace_s=grace_s)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
