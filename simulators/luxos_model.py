"""Physics and state of one simulated LuxOS miner, with no networking.

A miner is a ladder of profiles (watts, hashrate) plus sleep. Every change of operating point
is a linear ramp from where the miner is now to the new target over a model-specific time
(waking is slow, sleeping fast, a profile change in between). Temperatures follow power with
a first-order lag. Time comes from an injected clock so tests can step it instead of waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """One LuxOS power profile: what the miner draws and hashes when settled on it."""

    name: str
    power_w: float
    hashrate_ths: float
    frequency_mhz: int
    voltage_v: float


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A miner model as the simulator needs it: identity, ladder and thermal behaviour."""

    key: str
    type_name: str  # VERSION[0].Type, which pyasic maps to a model class
    chips_per_board: int
    profiles: tuple[ProfileSpec, ...]
    default_profile: str
    standby_w: float
    nameplate_w: float  # worst-case draw (PSU rating), above the top profile
    boards: int = 3
    fans: int = 4
    ambient_c: float = 25.0
    # Steady-state PCB temperature rise per kW drawn, and how much hotter chips run.
    pcb_rise_c_per_kw: float = 12.0
    chip_rise_c_per_kw: float = 6.0
    thermal_tau_s: float = 60.0

    def site_config(self) -> dict[str, object]:
        """This model as a site config's ``miner_models`` entry (standby, nameplate, ladder).

        Tests, benchmarks and demos build their site configs from it, so the agent's view of
        a model and the simulator's can never drift apart.
        """
        return {
            "standby_w": self.standby_w,
            "nameplate_w": self.nameplate_w,
            "profiles": [
                {"name": p.name, "power_w": p.power_w, "hashrate_ths": p.hashrate_ths}
                for p in self.profiles
            ],
        }

    def profile(self, name: str) -> ProfileSpec:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)


S19J_PRO = ModelSpec(
    key="s19jpro",
    type_name="Antminer S19j Pro",
    chips_per_board=126,
    profiles=(
        ProfileSpec("-2", 2450.0, 88.0, 475, 12.6),
        ProfileSpec("-1", 2760.0, 96.0, 500, 13.0),
        ProfileSpec("default", 3068.0, 104.0, 525, 13.4),
        ProfileSpec("+1", 3420.0, 112.0, 550, 13.9),
    ),
    default_profile="default",
    standby_w=28.0,
    nameplate_w=3500.0,
)

S21 = ModelSpec(
    key="s21",
    type_name="Antminer S21",
    chips_per_board=108,
    profiles=(
        ProfileSpec("-2", 2790.0, 172.0, 440, 12.2),
        ProfileSpec("-1", 3140.0, 186.0, 465, 12.6),
        ProfileSpec("default", 3500.0, 200.0, 490, 13.0),
        ProfileSpec("+1", 3930.0, 214.0, 515, 13.5),
    ),
    default_profile="default",
    standby_w=35.0,
    nameplate_w=4000.0,
)

MODELS: dict[str, ModelSpec] = {m.key: m for m in (S19J_PRO, S21)}


class FaultKind(StrEnum):
    """How a simulated miner misbehaves (set per miner at run time)."""

    NONE = "none"
    HANG = "hang"  # accept the connection, never answer
    SLOW = "slow"  # answer correctly after ``delay_s``
    GARBAGE = "garbage"  # answer bytes that are not JSON
    ERROR = "error"  # answer STATUS "E" to everything
    IGNORE = "ignore"  # answer success to commands but change nothing
    REBOOT = "reboot"  # refuse connections for ``delay_s``, then come back in default state


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault and its one parameter (seconds of delay for SLOW, of downtime for REBOOT)."""

    kind: FaultKind = FaultKind.NONE
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Timing:
    """How long operating-point changes take, in seconds of simulated time."""

    wake_ramp_s: float = 5.0
    sleep_ramp_s: float = 0.5
    profile_ramp_s: float = 1.0


@dataclass(slots=True)
class MinerState:
    """The true state of one miner; the server reads it to answer and commands mutate it."""

    address: str
    model: ModelSpec
    clock: Clock
    timing: Timing = field(default_factory=Timing)
    profile: str = ""
    sleeping: bool = False
    atm_enabled: bool = True
    session_id: str = ""
    fault: Fault = field(default_factory=Fault)
    boot_at: float = 0.0
    # The current ramp: from (power, hashrate) at ramp_from_s to the target over ramp_s.
    _from_power_w: float = 0.0
    _from_hashrate_ths: float = 0.0
    _ramp_from_s: float = 0.0
    _ramp_s: float = 0.0
    _pcb_c: float = 0.0
    _thermal_at_s: float = 0.0
    accepted_shares: int = 0
    # Heat: the air the miner breathes (a site's ambient curve; the model's ambient_c if None),
    # how much hotter this spot runs (a hot aisle, a clogged filter), and a faster thermal
    # time constant for tests (the model's if None).
    ambient: Clock | None = None
    hot_spot_c: float = 0.0
    thermal_tau_s: float | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Boot state: default profile, mining at full power, temperatures settled."""
        now = self.clock()
        self.profile = self.model.default_profile
        self.sleeping = False
        self.atm_enabled = True
        self.session_id = ""
        self.boot_at = now
        target = self.model.profile(self.profile)
        self._from_power_w = target.power_w
        self._from_hashrate_ths = target.hashrate_ths
        self._ramp_from_s = now
        self._ramp_s = 0.0
        self._pcb_c = self._steady_pcb_c(target.power_w)
        self._thermal_at_s = now

    # --- physics -------------------------------------------------------------------------

    def target(self) -> tuple[float, float]:
        """Where the miner is heading: (power W, hashrate TH/s)."""
        if self.sleeping:
            return self.model.standby_w, 0.0
        p = self.model.profile(self.profile)
        return p.power_w, p.hashrate_ths

    def _progress(self, now: float) -> float:
        if self._ramp_s <= 0.0:
            return 1.0
        return min(1.0, max(0.0, (now - self._ramp_from_s) / self._ramp_s))

    def power_w(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        target_w, _ = self.target()
        f = self._progress(now)
        return self._from_power_w + (target_w - self._from_power_w) * f

    def hashrate_ths(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        _, target_ths = self.target()
        f = self._progress(now)
        return self._from_hashrate_ths + (target_ths - self._from_hashrate_ths) * f

    def intake_c(self) -> float:
        """The air temperature at this miner's intake."""
        base = self.model.ambient_c if self.ambient is None else self.ambient()
        return base + self.hot_spot_c

    def _steady_pcb_c(self, power_w: float) -> float:
        return self.intake_c() + self.model.pcb_rise_c_per_kw * power_w / 1000.0

    def pcb_c(self, now: float | None = None) -> float:
        """PCB temperature, lagging power with time constant ``thermal_tau_s``."""
        now = self.clock() if now is None else now
        dt = now - self._thermal_at_s
        if dt > 0.0:
            # Exact for constant power over dt; during ramps polls are frequent enough
            # that using the power at the end of the interval is a small error.
            tau = self.model.thermal_tau_s if self.thermal_tau_s is None else self.thermal_tau_s
            alpha = 1.0 - math.exp(-dt / tau)
            self._pcb_c += (self._steady_pcb_c(self.power_w(now)) - self._pcb_c) * alpha
            self._thermal_at_s = now
        return self._pcb_c

    def chip_c(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        pcb = self.pcb_c(now)
        # Chips run hotter than the board in proportion to the heat they make.
        rise = self.model.chip_rise_c_per_kw * self.power_w(now) / 1000.0
        return pcb + rise

    def _start_ramp(self, ramp_s: float) -> None:
        now = self.clock()
        self.pcb_c(now)  # settle the thermal integral up to the change
        self._from_power_w = self.power_w(now)
        self._from_hashrate_ths = self.hashrate_ths(now)
        self._ramp_from_s = now
        self._ramp_s = ramp_s

    # --- commands ------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.sleeping:
            return
        self._start_ramp(self.timing.sleep_ramp_s)
        self.sleeping = True

    def wake(self) -> None:
        if not self.sleeping:
            return
        self._start_ramp(self.timing.wake_ramp_s)
        self.sleeping = False

    def set_profile(self, name: str) -> None:
        self.model.profile(name)  # KeyError for an unknown profile, checked by the caller
        if name == self.profile:
            return
        self._start_ramp(0.0 if self.sleeping else self.timing.profile_ramp_s)
        self.profile = name

    def truth(self) -> dict[str, object]:
        """The true state as plain JSON-able data (for tests and the control endpoint)."""
        now = self.clock()
        return {
            "address": self.address,
            "model": self.model.key,
            "profile": self.profile,
            "sleeping": self.sleeping,
            "atm_enabled": self.atm_enabled,
            "power_w": round(self.power_w(now), 1),
            "hashrate_ths": round(self.hashrate_ths(now), 3),
            "pcb_c": round(self.pcb_c(now), 2),
            "chip_c": round(self.chip_c(now), 2),
            "intake_c": round(self.intake_c(), 2),
            "fault": self.fault.kind.value,
            "fault_delay_s": self.fault.delay_s,
        }


class ManualClock:
    """A clock that only moves when told to: inject it into a fleet to step physics in tests."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time only moves forward, got {seconds}")
        self.now_s += seconds
