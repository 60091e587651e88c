"""Supervision of the agent's long-lived tasks: a task that dies is logged, shown and restarted.

No single input may end the daemon. Each long-lived task (pollers, the control loop, the event
watch, the MQTT bridge, the metrics server, grid sources) runs under :func:`supervise`. A task
that returns has finished its job and is no longer shown (the systemd watchdog feeder returns
at once when systemd set no watchdog). One that raises anything but a cancellation has died:
the death is logged once per distinct error (one line with the task and the error; the
traceback at debug level), the :class:`TaskBoard` marks it down (``site_agent_task_up`` and
``site_agent_task_restarts_total`` in ``/metrics``, ``tasks`` in the retained MQTT state), and
the task is started again after a capped exponential back-off. A task that then ran for a while
(``healthy_after_s``) starts the back-off again from its first step.

Task health has its own owner, not :class:`~agent.runtime.state.AgentState` (whose one writer is
the control loop, which is itself a supervised task and may be the one that died): the
:class:`TaskBoard`, built once at start and handed to :func:`supervise` (through the agent) and to
the outputs that show it. Only :func:`supervise` writes it; readers see it as a read-only mapping
of frozen :class:`TaskHealth` records.

Only a broken journal or a bad config at start ends the daemon; both happen before any task
runs (:mod:`agent.cli.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class TaskHealth:
    """One supervised long-lived task, as last recorded by :func:`supervise`."""

    name: str
    up: bool = False
    restarts: int = 0
    last_error: str | None = None


class TaskBoard(Mapping[str, TaskHealth]):
    """Supervised task name -> its :class:`TaskHealth`; read-only for everyone but
    :func:`supervise`, the one writer (through :meth:`_record_task` and :meth:`_forget_task`)."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: dict[str, TaskHealth] = {}

    def __getitem__(self, name: str) -> TaskHealth:
        return self._tasks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def _record_task(self, name: str, **change: Any) -> TaskHealth:
        health = replace(self._tasks.get(name) or TaskHealth(name), **change)
        self._tasks[name] = health
        return health

    def _forget_task(self, name: str) -> None:
        self._tasks.pop(name, None)


async def supervise(
    name: str,
    factory: TaskFactory,
    stop: asyncio.Event,
    board: TaskBoard,
    *,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    healthy_after_s: float = 60.0,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``factory()`` until ``stop`` is set, restarting it with back-off whenever it dies.

    Its health is recorded on ``board`` (this is the board's only writer)."""
    health = board._record_task(name)
    delay = initial_backoff_s
    last_logged: str | None = None
    while not stop.is_set():
        started = monotonic()
        health = board._record_task(name, up=True)
        try:
            await factory()
        except asyncio.CancelledError:
            board._record_task(name, up=False)
            raise
        except Exception as exc:  # any bug or hostile input: this task only, never the daemon
            failure = exc
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            if not stop.is_set():  # finished its job: done, not dead, so not shown as down
                log.debug("task %s finished", name)
                board._forget_task(name)
                return
            break
        health = board._record_task(name, up=False, restarts=health.restarts + 1, last_error=error)
        if monotonic() - started >= healthy_after_s:
            delay, last_logged = initial_backoff_s, None
        if error != last_logged:  # once per distinct failure, not once per restart
            log.error("task %s died (%s); restarting with back-off", name, error)
            last_logged = error
        log.debug("task %s traceback", name, exc_info=failure)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, max_backoff_s)
    board._record_task(name, up=False)
