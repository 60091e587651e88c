"""Operator commands and rejected inputs on their way from an output to the loop.

The MQTT bridge is built before the agent (the agent's cycle observers include it), so it cannot
call the agent directly. It hands commands to a :class:`CommandInbox` instead, which the loop
serves as one of its tasks: the loop is the only writer of the agent's state, and a command
changes that state only there. A command the loop has not answered within the bridge's timeout
is answered by the bridge as refused; the loop then skips it. A refused input the bridge wants
on the audit trail travels the same way (:class:`AuditRequest`): the loop writes the row.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from agent.control.commands import Command, CommandResult

MAX_WAITING = 100  # commands queued for the loop; more is a flood, refused at once


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input an output refused before it reached the loop (it is counted, nothing else)."""

    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditRequest:
    """An input an output refused, to be written to the audit trail by the loop."""

    source: str
    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class Submission:
    command: Command
    answer: asyncio.Future[CommandResult]


Item = Submission | Rejection | AuditRequest


class CommandInbox:
    """A bounded queue from outputs to the loop."""

    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue(max_waiting)

    async def submit(self, command: Command) -> CommandResult:
        """Hand ``command`` to the loop and wait for its answer (a ``CommandHandler``)."""
        answer: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Submission(command, answer))
        except asyncio.QueueFull:
            return CommandResult.refuse("too many commands waiting for the agent; try again")
        return await answer

    def reject(self, source: str, reason: str) -> None:
        """Count an input refused at the edge (a ``RejectCounter``); dropped if flooded."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(Rejection(source, reason))

    def audit(self, source: str, action: str, reason: str) -> None:
        """Ask for an audit row of a refused input (a ``RejectionAudit``); dropped if flooded."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(AuditRequest(source, action, reason))

    async def next(self) -> Item:
        return await self._queue.get()
