"""Operator commands as the runtime receives them, and its answers (whatever the transport).

The MQTT bridge parses and authenticates commands into these types; the runtime acts on them
and answers with a :class:`CommandResult`. They live here, below both, so that the runtime never
imports an output.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal


@dataclass(frozen=True, slots=True)
class Curtail:
    """Hold site load at or below ``target_kw`` until ``until`` (an operator override)."""

    id: str
    operator: str
    target_kw: float
    until: datetime


@dataclass(frozen=True, slots=True)
class Release:
    """End the operator's curtailment."""

    id: str
    operator: str


@dataclass(frozen=True, slots=True)
class SetMode:
    """Switch between automatic control and manual (the agent stops actuating)."""

    id: str
    operator: str
    mode: Literal["auto", "manual"]


@dataclass(frozen=True, slots=True)
class Refresh:
    """Run a control cycle now and republish everything."""

    id: str
    operator: str


Command = Curtail | Release | SetMode | Refresh


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The runtime's answer to a command: accepted, or refused with a reason."""

    accepted: bool
    reason: str = ""

    @classmethod
    def ok(cls, reason: str = "") -> CommandResult:
        return cls(True, reason)

    @classmethod
    def refuse(cls, reason: str) -> CommandResult:
        return cls(False, reason)


CommandHandler = Callable[[Command], Awaitable[CommandResult]]
# Counts one rejected input: (source, reason code), e.g. ("mqtt", "bad_token").
RejectCounter = Callable[[str, str], None]
# Asks for one audit row of an input refused at the edge: (source, action, reason), e.g.
# ("mqtt", "command:curtail", "too_deep: ..."). The output bounds the rate; the runtime writes.
RejectionAudit = Callable[[str, str, str], None]
