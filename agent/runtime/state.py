"""The agent's live, in-memory state that outputs read: latest snapshot and plan, counters.

One writer: the loop (:class:`agent.runtime.loop.Agent`). The coordinator, the fleets and the
actuator keep their own records and report through return values; the loop publishes copies
here after every poll and every cycle (:meth:`~agent.runtime.loop.Agent.publish`), and counts
what outputs refuse through the operator inbox. Outputs (the Prometheus collector, the MQTT
publisher, the status line) only read it; they never do I/O against devices. Counters only grow,
so a reader may see a value one cycle old but never a wrong one. ``tests/test_layout.py`` checks
that nothing else in ``agent/`` writes to it (assignment, item assignment, ``del``, or a mutating
call such as ``update``/``pop``). The health of the supervised tasks is not here: it has its own
owner, :class:`agent.runtime.supervisor.TaskBoard`, written only by the supervisor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from agent.control.domain import Plan, Snapshot
from agent.control.settlement import FourCpFigures
from drivers.gpus.base import GpuReading

if TYPE_CHECKING:
    from agent.runtime.meter import MeterStatus


@dataclass(slots=True)
class SourceHealth:
    """Health of one polled source (a device poller, a price feed, a grid source)."""

    name: str
    last_success: datetime | None = None
    last_error: str | None = None
    last_duration_s: float = 0.0
    successes: int = 0
    failures: int = 0


@dataclass(slots=True)
class AgentState:
    """What the agent knows and has done, for outputs to read."""

    site_id: str
    started_at: datetime
    snapshot: Snapshot | None = None
    plan: Plan | None = None
    cycles: int = 0
    last_cycle_at: datetime | None = None
    last_cycle_duration_s: float = 0.0
    # (action kind, result) -> count; result is "ok", "failed", "not_applied", "skipped"
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (source, reason) -> count of rejected inputs (bad price rows, bad commands, ...)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    sources: Mapping[str, SourceHealth] = field(default_factory=dict)
    faults: Mapping[str, str] = field(default_factory=dict)  # device id -> fault reason
    mode: str = "auto"  # "auto"; "manual" (operator: no actions); "safe" (sheds only)
    safe_reason: str | None = None
    # GPU node id -> the latest per-GPU readings of that node (for per-GPU metrics).
    gpu_readings: Mapping[str, tuple[GpuReading, ...]] = field(default_factory=dict)
    meter: MeterStatus | None = None  # the meter and the load model, as of the latest snapshot
    # The live 4CP account: site demand in 4CP-risk intervals, per month and season.
    fourcp: FourCpFigures | None = None
    # Thermal derates: step-downs so far by kind, and the devices held derated now (-> kind).
    thermal_derates: Mapping[str, int] = field(default_factory=dict)
    thermal_derated: Mapping[str, str] = field(default_factory=dict)
    # The horizon planner's last solve (None: never solved): its time, status and reason.
    planner_solve_s: float | None = None
    planner_status: str | None = None
    planner_reason: str = ""
