"""The agent's own vocabulary: the immutable Snapshot the policy reads, and the Plan it returns.

The coordinator builds one :class:`Snapshot` per control cycle from the last good readings of
every source (with their ages and faults). :func:`agent.control.policy.decide` turns it into a
:class:`Plan`: the operating point of every device and the :class:`Action` list that gets there,
each action with the reason a person can read. The actuator executes actions; outputs (metrics,
MQTT, logs) only read snapshots and plans. Everything here is frozen and holds no I/O.

The backtest may represent ``count`` identical miners as one view (a block); live views always
have ``count == 1``. Powers and hashrates of a view are per unit; totals multiply by ``count``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from agent.control.cooling import SiteLoadModel
from drivers.grid.base import GridEvent
from drivers.jobs.base import JobClass, JobState

if TYPE_CHECKING:  # the planner imports this module's types
    from agent.control.planner import HorizonPlan

SLEEP = "sleep"  # the name of every miner's standby operating point


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """One rung of a device's ladder: ``sleep`` or a power profile."""

    name: str
    power_w: float
    hashrate_ths: float = 0.0


@dataclass(frozen=True, slots=True)
class MinerView:
    """What the policy knows about one miner (or a block of ``count`` identical ones)."""

    device_id: str
    model: str
    # Ascending by power; index 0 is always the ``sleep`` point (standby power, no hashrate).
    points: tuple[OperatingPoint, ...]
    nameplate_w: float
    commanded: str  # the operating point last commanded (a name in ``points``)
    commanded_since: datetime  # when that command was given (for minimum on/off times)
    measured_power_w: float | None = None  # None: no fresh reading
    measured_hashrate_ths: float | None = None
    reading_age_s: float | None = None
    fault: str | None = None  # set when the device is faulted; the policy leaves it alone
    circuit: str | None = None
    count: int = 1
    # The firmware reports no power (stock Antminer): measured_power_w is the driver's
    # estimate from the model's ladder and the hashrate, so limits count the nameplate.
    power_estimated: bool = False
    temperature_c: float | None = None  # the hottest chip on any board (fresh readings only)
    # Thermal derate: the highest point the policy may plan (None: the whole ladder), and why.
    max_point: str | None = None
    derate: str | None = None

    def point(self, name: str) -> OperatingPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"{self.device_id} has no operating point {name!r}")

    @property
    def controllable(self) -> bool:
        return self.fault is None

    @property
    def worst_case_power_w(self) -> float:
        """The power to assume for limits: measured if fresh, else nameplate (design.md).

        An estimated reading is not a measurement: such a miner counts at its nameplate.
        """
        if self.measured_power_w is None or self.power_estimated:
            return self.nameplate_w
        return max(self.measured_power_w, self.point(self.commanded).power_w)


@dataclass(frozen=True, slots=True)
class JobView:
    """An AI job as the policy sees it."""

    job_id: str
    job_class: JobClass
    state: JobState
    gpus: int
    node_id: str | None
    usd_per_gpu_hour: float
    penalty_usd: float
    commanded_since: datetime
    last_checkpoint_at: datetime | None = None
    # Deferrable training: all its work (GPU-hours still to run, at full throughput) done by
    # ``deadline``; the horizon plan chooses when. None: an ordinary job.
    deadline: datetime | None = None
    remaining_gpu_h: float = 0.0


@dataclass(frozen=True, slots=True)
class GpuNodeView:
    """A GPU server: its cards' cap range, its commanded cap, and the jobs placed on it."""

    device_id: str
    gpu_count: int
    min_cap_w: float
    max_cap_w: float
    idle_w: float  # per GPU with no running job
    host_overhead_w: float
    cap_w: float  # per-GPU power cap currently commanded
    jobs: tuple[JobView, ...]
    measured_power_w: float | None = None  # whole node, GPUs + host
    reading_age_s: float | None = None
    fault: str | None = None
    circuit: str | None = None
    count: int = 1
    temperature_c: float | None = None  # the hottest card (fresh readings only)
    # Thermal derate: set when ``max_cap_w`` was lowered below the card's maximum, and why.
    derate: str | None = None

    @property
    def worst_case_power_w(self) -> float:
        nameplate = self.host_overhead_w + self.gpu_count * self.max_cap_w
        return nameplate if self.measured_power_w is None else self.measured_power_w


@dataclass(frozen=True, slots=True)
class PriceView:
    """The latest settled price of a source and how old it is."""

    usd_per_mwh: float
    interval_start: datetime
    age_s: float


@dataclass(frozen=True, slots=True)
class ActiveEvent:
    """A grid event in force, with the site load measured when it began (for shed-Y targets)."""

    event: GridEvent
    baseline_w: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the policy may know at ``at``. Built by the coordinator or the backtest."""

    at: datetime
    price: PriceView | None  # None: no price yet (never seen one)
    hashprice_usd_per_ph_day: float
    miners: tuple[MinerView, ...] = ()
    gpu_nodes: tuple[GpuNodeView, ...] = ()
    events: tuple[ActiveEvent, ...] = ()
    day_ahead_usd_per_mwh: float | None = None
    fourcp_risk: float = 0.0  # 0..1: chance this interval is a monthly system peak
    fourcp_reason: str = ""
    # Site power at the meter: the meter's reading when a trusted meter is configured, else the
    # device sum through the load model (cooling, base load, fallback margin).
    measured_site_power_w: float | None = None
    device_power_w: float | None = None  # the sum of device readings (None: one is missing)
    # Device power → power at the meter (cooling, base load, meter trim or fallback margin).
    load_model: SiteLoadModel = field(default_factory=SiteLoadModel)
    # Power the site may add this cycle (ramp limit); the coordinator derives it from the
    # ramp rate and the cycle length.
    ramp_headroom_w: float = float("inf")
    # The latest usable horizon plan (agent.control.planner), or None: the rule alone decides.
    horizon: HorizonPlan | None = None


class ActionKind(StrEnum):
    SLEEP = "sleep"  # miner to standby
    WAKE = "wake"  # miner from standby to a profile
    SET_PROFILE = "set_profile"  # miner between profiles
    SET_GPU_CAP = "set_gpu_cap"  # every GPU of a node to a power cap
    SUSPEND_JOB = "suspend_job"
    RESUME_JOB = "resume_job"
    REQUEUE_JOB = "requeue_job"


# Order in which the actuator runs actions: power goes down before anything goes up.
SHED_KINDS = frozenset({ActionKind.SLEEP, ActionKind.SUSPEND_JOB, ActionKind.REQUEUE_JOB})


@dataclass(frozen=True, slots=True)
class Action:
    """One change to one device, and why."""

    device_id: str
    kind: ActionKind
    target: str  # operating point name, cap in W as text, or job state
    reason: str
    delta_power_w: float  # expected change in site power (negative = shed)
    job_id: str | None = None
    # What the switch costs (agent.control.site): revenue or work lost, and extra energy. The
    # settlement charges exactly these when the action is carried out.
    switch_lost_usd: float = 0.0
    switch_energy_wh: float = 0.0

    @property
    def sheds(self) -> bool:
        return self.delta_power_w < 0 or self.kind in SHED_KINDS


@dataclass(frozen=True, slots=True)
class Plan:
    """The policy's answer for one snapshot."""

    at: datetime
    limit_w: float  # the binding site limit this cycle (interconnect, event target, ...)
    planned_power_w: float
    effective_price_usd_per_mwh: float  # price + adders the plan was made against
    value_usd_per_h: float  # revenue rate of the planned operating points
    cost_usd_per_h: float
    miner_points: Mapping[str, str] = field(default_factory=dict)  # device -> point name
    gpu_caps_w: Mapping[str, float] = field(default_factory=dict)  # node -> per-GPU cap
    job_states: Mapping[str, JobState] = field(default_factory=dict)  # job -> target state
    actions: tuple[Action, ...] = ()
    summary: str = ""
    binding: tuple[str, ...] = ()  # which limits bind, e.g. ("interconnect", "event:abc")

    @property
    def margin_usd_per_h(self) -> float:
        return self.value_usd_per_h - self.cost_usd_per_h
