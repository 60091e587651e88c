"""Supervision and its task board: a task that dies is shown down, counted and restarted; the
board (not ``AgentState``) holds task health; only the supervisor writes it; /metrics and the
retained MQTT state show it with the same names and payload as before."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import pytest

from agent.outputs.metrics import build_registry
from agent.outputs.mqtt import state_payload
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard, TaskHealth, supervise
from tests.sample_state import NOW, STARTED, sample_config


async def until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_task_that_dies_is_shown_down_counted_and_restarted() -> None:
    board = TaskBoard()
    stop = asyncio.Event()
    runs = 0
    healed = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"hostile input #{runs}")
        healed.set()
        await stop.wait()

    task = asyncio.create_task(
        supervise("price", flaky, stop, board, initial_backoff_s=0.01, max_backoff_s=0.02)
    )
    try:
        await asyncio.wait_for(healed.wait(), timeout=10)
        health = board["price"]
        assert health == TaskHealth("price", up=True, restarts=2, last_error=health.last_error)
        assert health.last_error == "ValueError: hostile input #2"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert board["price"].up is False  # stopped: no longer running
    assert board["price"].restarts == 2


async def test_a_dead_task_stays_down_during_its_backoff() -> None:
    """The control loop itself may be the task that died: the board, not the loop, shows it."""
    board = TaskBoard()
    stop = asyncio.Event()

    async def dies() -> None:
        raise RuntimeError("bug in the loop")

    task = asyncio.create_task(
        supervise("control", dies, stop, board, initial_backoff_s=5.0, max_backoff_s=5.0)
    )
    try:
        await until(lambda: "control" in board and board["control"].restarts == 1, 10, "a death")
        assert board["control"].up is False
        assert board["control"].last_error == "RuntimeError: bug in the loop"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_a_task_that_finishes_its_job_leaves_the_board() -> None:
    board = TaskBoard()
    started = asyncio.Event()
    release = asyncio.Event()

    async def once() -> None:
        started.set()
        await release.wait()

    task = asyncio.create_task(supervise("watchdog", once, asyncio.Event(), board))
    await asyncio.wait_for(started.wait(), timeout=10)
    assert board["watchdog"].up
    release.set()
    await asyncio.wait_for(task, timeout=10)
    assert "watchdog" not in board
    assert len(board) == 0


def test_readers_cannot_write_task_health() -> None:
    board = TaskBoard()
    health = TaskHealth("mqtt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        health.up = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        board["mqtt"] = health  # type: ignore[index]
    assert not hasattr(AgentState("s", STARTED), "tasks")


async def test_metrics_and_mqtt_show_the_board() -> None:
    """Same families, labels and payload as when the state held task health."""
    board = TaskBoard()
    stop = asyncio.Event()

    async def dies() -> None:
        raise OSError("address in use")

    async def runs() -> None:
        await stop.wait()

    tasks = [
        asyncio.create_task(supervise("metrics", dies, stop, board, initial_backoff_s=5.0)),
        asyncio.create_task(supervise("control", runs, stop, board)),
    ]
    try:
        await until(
            lambda: "metrics" in board and board["metrics"].restarts == 1 and "control" in board,
            10,
            "one death and one running task",
        )
        state = AgentState("west-1", STARTED)
        reg = build_registry(state, sample_config(), clock=lambda: NOW, tasks=board)
        assert reg.get_sample_value("site_agent_task_up", {"task": "metrics"}) == 0.0
        assert reg.get_sample_value("site_agent_task_up", {"task": "control"}) == 1.0
        restarts = reg.get_sample_value("site_agent_task_restarts_total", {"task": "metrics"})
        assert restarts == 1.0
        assert state_payload(state, None, board)["tasks"] == {
            "control": {"up": True, "restarts": 0, "last_error": None},
            "metrics": {"up": False, "restarts": 1, "last_error": "OSError: address in use"},
        }
        # Without a board the families are there, empty; the payload's tasks are empty.
        bare = build_registry(state, sample_config(), clock=lambda: NOW)
        assert bare.get_sample_value("site_agent_task_up", {"task": "control"}) is None
        assert state_payload(state)["tasks"] == {}
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
