"""``site-agent run``: the daemon as systemd starts it.

Opens the journal (a journal that cannot be opened stops the start with a clear error: running
without one would lose what was shed), builds the drivers, starts the outputs, tells systemd
READY, feeds the watchdog from the control loop, and says STOPPING on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.control.config import AgentConfig
from agent.journal.store import Store, journal_path, secrets_in
from agent.outputs.metrics import MetricsServer, build_registry
from agent.outputs.mqtt import MqttBridge
from agent.runtime.loop import Agent
from agent.runtime.sdnotify import LoopWatchdog, Notifier
from agent.runtime.wiring import attach_grid_sources, build_components

log = logging.getLogger(__name__)

Service = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def metrics_service(agent: Agent, config: AgentConfig) -> Service:
    """Serve ``/metrics`` (read-only, localhost by default) while the agent runs."""

    async def service(stop: asyncio.Event) -> None:
        registry = build_registry(agent.state, config)
        server = MetricsServer(registry, config.metrics.host, config.metrics.port)
        await server.start()
        agent.metrics_port = server.port
        try:
            await stop.wait()
        finally:
            await server.close()

    return service


async def serve(config: AgentConfig, config_file: Path, *, grace_s: float = 3.0) -> None:
    """Run the agent until SIGTERM/SIGINT, with journal, systemd notifications and watchdog."""
    notifier = Notifier()
    path = journal_path(config.store.path, config_file)
    async with Store.open(path, known_secrets=secrets_in(config)) as store:
        components = build_components(config)
        components.store = store
        agent = Agent(config, components)
        attach_grid_sources(agent, config)
        control = config.control
        # A healthy cycle can take a full round of device timeouts and retries; the first one
        # also waits for the first fleet poll.
        stall_s = max(
            agent.first_poll_timeout_s,
            control.interval_s + (control.retries + 1) * control.device_timeout_s * 2,
        )
        if config.metrics.enabled:
            components.services.append(metrics_service(agent, config))
        if config.mqtt.enabled:

            async def audit_rejection(action: str, reason: str) -> None:
                await store.audit(source="mqtt", action=action, result="rejected", reason=reason)

            bridge = MqttBridge(
                config.mqtt,
                agent.state,
                agent.handle_command,
                interconnect_limit_w=config.site.interconnect_limit_kw * 1000.0,
                audit_rejection=audit_rejection,
            )
            agent.on_cycle = lambda _snapshot, _plan, _results: bridge.publish_cycle()
            components.services.append(bridge)
        watchdog = LoopWatchdog(notifier, max_stall_s=stall_s)
        agent.watchdog = watchdog.beat
        components.services.append(watchdog.run)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            notifier.stopping("stopping on signal")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        notifier.ready(f"site {config.site.id}: {len(components.miners)} miners, journal {path}")
        log.info("site-agent running: site %s, journal %s", config.site.id, path)
        try:
            await agent.run(stop, grace_s=grace_s)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
