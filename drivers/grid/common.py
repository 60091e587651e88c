"""Pieces every grid source shares: program settings, audit rows, and fail directions.

A source that loses its signal (a stale MQTT heartbeat, an unreachable OpenADR VTN) applies each
program's ``fail`` direction through :func:`apply_fail_directions`, so that every source fails the
same way: ``curtail`` synthesizes a full-shed event while the silence lasts, ``hold`` keeps the
known events until they end, ``release`` drops them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from pydantic import ConfigDict, Field

from drivers.grid.base import FailDirection, GridEvent, ProgramKind
from drivers.inputs import StrictSettings

T = TypeVar("T")


async def run_until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``work``, or cancel it as soon as ``stop`` is set (then return None).

    Vendor clients block in connect/handshake for their own timeouts (10 s and more); a source
    must still stop at once when the agent shuts down. Exceptions of ``work`` propagate.
    """
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


class ProgramSettings(StrictSettings):
    """One demand-response program a source can signal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ProgramKind
    fail: FailDirection = FailDirection.HOLD
    payment_usd_per_mwh: float = Field(default=0.0, ge=0, le=100_000, allow_inf_nan=False)
    penalty_usd_per_mwh: float = Field(default=0.0, ge=0, le=100_000, allow_inf_nan=False)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message or event that changed nothing, and why (for the audit log)."""

    at: datetime
    topic: str  # MQTT topic, or the OpenADR market context / event id
    payload: str  # the first 200 characters, for the audit row
    reason: str


def apply_fail_directions(
    known: Iterable[GridEvent],
    programs: Mapping[str, ProgramSettings],
    *,
    source: str,
    silent_since: datetime,
    now: datetime,
    hold_for: timedelta,
) -> tuple[GridEvent, ...]:
    """The events to report while ``source`` has been silent since ``silent_since``.

    ``programs`` maps the program name (``GridEvent.program``) to its settings. Events of a
    program that is not in ``programs`` are kept (hold). A synthesized full-shed event lasts to
    ``now + hold_for`` and is re-synthesized at each call while the silence lasts.
    """
    known = list(known)
    out: list[GridEvent] = []
    for event in known:
        program = programs.get(event.program)
        if program is None or program.fail is not FailDirection.RELEASE:
            out.append(event)
    for name, program in sorted(programs.items()):
        if program.fail is FailDirection.CURTAIL:
            out.append(
                GridEvent(
                    event_id=f"{source}:signal-lost:{name}",
                    source=source,
                    program=name,
                    kind=program.kind,
                    start=silent_since,
                    end=now + hold_for,
                    max_site_kw=0.0,
                    payment_usd_per_mwh=program.payment_usd_per_mwh,
                    penalty_usd_per_mwh=program.penalty_usd_per_mwh,
                    fail=program.fail,
                )
            )
    return tuple(out)
