"""Supervision of the agent's long-lived tasks: a task that dies is logged, shown and restarted.

No single input may end the daemon. Each long-lived task (pollers, the control loop, the event
watch, the MQTT bridge, the metrics server, grid sources) runs under :func:`supervise`. A task
that returns has finished its job and is no longer shown (the systemd watchdog feeder returns
at once when systemd set no watchdog). One that raises anything but a cancellation has died:
the death is logged once per distinct error (one line with the task and the error; the
traceback at debug level), ``AgentState.tasks`` marks it down (``site_agent_task_up`` and
``site_agent_task_restarts_total`` in ``/metrics``, ``tasks`` in the retained MQTT state), and
the task is started again after a capped exponential back-off. A task that then ran for a while
(``healthy_after_s``) starts the back-off again from its first step.

Only a broken journal or a bad config at start ends the daemon; both happen before any task
runs (:mod:`agent.cli.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from agent.runtime.state import AgentState

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


async def supervise(
    name: str,
    factory: TaskFactory,
    stop: asyncio.Event,
    state: AgentState,
    *,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    healthy_after_s: float = 60.0,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``factory()`` until ``stop`` is set, restarting it with back-off whenever it dies."""
    health = state.task(name)
    delay = initial_backoff_s
    last_logged: str | None = None
    while not stop.is_set():
        started = monotonic()
        health.up = True
        try:
            await factory()
        except asyncio.CancelledError:
            health.up = False
            raise
        except Exception as exc:  # any bug or hostile input: this task only, never the daemon
            failure = exc
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            if not stop.is_set():  # finished its job: done, not dead, so not shown as down
                log.debug("task %s finished", name)
                state.tasks.pop(name, None)
                return
            break
        health.up = False
        health.restarts += 1
        health.last_error = error
        if monotonic() - started >= healthy_after_s:
            delay, last_logged = initial_backoff_s, None
        if error != last_logged:  # once per distinct failure, not once per restart
            log.error("task %s died (%s); restarting with back-off", name, error)
            last_logged = error
        log.debug("task %s traceback", name, exc_info=failure)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, max_backoff_s)
    health.up = False
