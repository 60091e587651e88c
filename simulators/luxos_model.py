"""Physics and state of one simulated LuxOS miner, with no networking.

A miner is a ladder of profiles (watts, hashrate) plus sleep. Every change of operating point
is a linear ramp from where the miner is now to the new target over a model-specific time
(waking is slow, sleeping fast, a profile change in between). Temperatures follow power with
a first-order lag. Time comes from an injected clock so tests can step it instead of waiting.
"""

from __future__ import annotations

import itertools
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


# LuxOS builds 16 underclocking and 8 overclocking profiles in 25 MHz steps around the
# EEPROM default, named by frequency ("290MHz"), the default one "default". Hashrate follows
# frequency; power follows a static + dynamic curve fitted to a real S19k Pro's 25 profiles
# (0.28x the default power at -16 steps, 1.5x at +8).
STEP_MHZ = 25
STEPS_DOWN = 16
STEPS_UP = 8
# What the miner draws on a profile, as a fraction of the profile's nominal "Watts": a real
# LuxOS 2025.4.8 S19k Pro read 1051 W on its 1188 W profile.
PROFILE_DRAW_RATIO = 0.885
# Braiins OS+ holds its power target a little under the target (3480 W on 3500 W).
TARGET_DRAW_RATIO = 0.994


def _power_ratio(freq_ratio: float) -> float:
    r = freq_ratio
    return 0.071 + 0.519 * r + 0.41 * r * r


def frequency_ladder(
    default_w: float, default_ths: float, default_mhz: int, default_v: float
) -> tuple[ProfileSpec, ...]:
    """The 25 built-in LuxOS profiles around a model's default operating point."""
    out: list[ProfileSpec] = []
    for step in range(-STEPS_DOWN, STEPS_UP + 1):
        mhz = default_mhz + STEP_MHZ * step
        r = mhz / default_mhz
        name = "default" if step == 0 else f"{mhz}MHz"
        out.append(
            ProfileSpec(
                name,
                round(default_w * _power_ratio(r)),
                round(default_ths * r, 1),
                mhz,
                round(max(11.88, default_v + 0.1 * step), 2),
            )
        )
    return tuple(out)


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
    # The points a site config offers the policy (a few of the 25; names as the miner has them).
    site_profiles: tuple[str, ...] = ()
    boards: int = 3
    fans: int = 4
    ambient_c: float = 25.0
    # Steady-state board temperature rise per kW drawn (with the fans at their floor when a
    # fan loop is modelled), and how much hotter chips run.
    pcb_rise_c_per_kw: float = 12.0
    chip_rise_c_per_kw: float = 6.0
    thermal_tau_s: float = 60.0
    # The fan loop's board target (None: fans fixed, no loop); ATM's hot and the cut-off.
    target_c: float | None = None
    hot_c: float = 65.0
    dangerous_c: float = 70.0

    def site_config(self) -> dict[str, object]:
        """This model as a site config's ``miner_models`` entry (standby, nameplate, ladder).

        Tests, benchmarks and demos build their site configs from it, so the agent's view of
        a model and the simulator's can never drift apart. Powers are what the miner draws on
        each profile (not the profile's nominal "Watts").
        """
        return {
            "standby_w": self.standby_w,
            "nameplate_w": self.nameplate_w,
            "profiles": [
                {
                    "name": p.name,
                    "power_w": round(p.power_w * PROFILE_DRAW_RATIO),
                    "hashrate_ths": p.hashrate_ths,
                }
                for p in self.profiles
                if p.name in self.site_profiles
            ],
        }

    @property
    def site_top(self) -> str:
        """The most powerful point of the site ladder (what a cheap hour runs)."""
        return max((self.profile(n) for n in self.site_profiles), key=lambda p: p.power_w).name

    @property
    def site_bottom(self) -> str:
        """The least powerful point of the site ladder."""
        return min((self.profile(n) for n in self.site_profiles), key=lambda p: p.power_w).name

    def profile(self, name: str) -> ProfileSpec:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    def hashrate_at_w(self, power_w: float) -> float:
        """Hashrate at a continuous power target (Braiins OS+), on the profile curve.

        Linear between the ladder's points, proportional below the lowest (a tuner that goes
        lower underclocks further), flat above the highest (more power buys no hashrate).
        """
        ladder = sorted(self.profiles, key=lambda p: p.power_w)
        if power_w <= ladder[0].power_w:
            return ladder[0].hashrate_ths * max(0.0, power_w) / ladder[0].power_w
        for lo, hi in itertools.pairwise(ladder):
            if power_w <= hi.power_w:
                f = (power_w - lo.power_w) / (hi.power_w - lo.power_w)
                return lo.hashrate_ths + f * (hi.hashrate_ths - lo.hashrate_ths)
        return ladder[-1].hashrate_ths


def _site_names(profiles: tuple[ProfileSpec, ...], steps: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(profiles[STEPS_DOWN + s].name for s in steps)


_S19J_PRO_LADDER = frequency_ladder(3068.0, 104.0, 590, 13.4)
S19J_PRO = ModelSpec(
    key="s19jpro",
    type_name="Antminer S19j Pro",
    chips_per_board=126,
    profiles=_S19J_PRO_LADDER,
    default_profile="default",
    standby_w=28.0,
    nameplate_w=4100.0,
    site_profiles=_site_names(_S19J_PRO_LADDER, (-4, -2, 0, 2)),
    # A LuxOS S19-class board: 22 C over the air at 1.05 kW with fans at 20 % (recorded),
    # chips reported as the board, LuxOS's tempctrl defaults driving the fans.
    pcb_rise_c_per_kw=21.0,
    chip_rise_c_per_kw=0.0,
    target_c=55.0,
)

_S21_LADDER = frequency_ladder(3500.0, 200.0, 590, 13.0)
S21 = ModelSpec(
    key="s21",
    type_name="Antminer S21",
    chips_per_board=108,
    profiles=_S21_LADDER,
    default_profile="default",
    standby_w=35.0,
    nameplate_w=4700.0,
    site_profiles=_site_names(_S21_LADDER, (-4, -2, 0, 2)),
    # A LuxOS S19-class board: 22 C over the air at 1.05 kW with fans at 20 % (recorded),
    # chips reported as the board, LuxOS's tempctrl defaults driving the fans.
    pcb_rise_c_per_kw=21.0,
    chip_rise_c_per_kw=0.0,
    target_c=55.0,
)

MODELS: dict[str, ModelSpec] = {m.key: m for m in (S19J_PRO, S21)}

# Both models default to 590 MHz, so their site ladders share names: tests use these.
SITE_TOP = S19J_PRO.site_top
SITE_BOTTOM = S19J_PRO.site_bottom


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
    # LuxOS drops a session idle for about a minute; the only holder until then.
    session_idle_s: float = 60.0
    # ATM looks at the temperatures and may step one profile at most this often.
    atm_step_s: float = 60.0


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
    session_used_s: float = 0.0
    # The profile the user (or the controller) chose: ATM steps below it when hot, and back.
    user_profile: str = ""
    atm_checked_s: float = 0.0
    # Braiins OS+: a continuous power target replaces the profile when set.
    power_target_w: float | None = None
    # What the miner draws on a profile, per nominal profile watt (LuxOS: PROFILE_DRAW_RATIO).
    profile_draw_ratio: float = 1.0
    fault: Fault = field(default_factory=Fault)
    boot_at: float = 0.0
    # The current ramp: from (power, hashrate) at ramp_from_s to the target over ramp_s.
    _from_power_w: float = 0.0
    _from_hashrate_ths: float = 0.0
    _ramp_from_s: float = 0.0
    _ramp_s: float = 0.0
    _pcb_c: float = 0.0
    _thermal_at_s: float = 0.0
    # Work done (TH) up to the start of the current ramp, and the mark the firmware's
    # since-start averages count from (boot, or the last wake: the mining process restarts).
    _work_th: float = 0.0
    _avg_from_s: float = 0.0
    _avg_from_work_th: float = 0.0
    accepted_shares: int = 0
    # Heat: the air the miner breathes (a site's ambient curve; else ``ambient_c``, the model's
    # unless a test or the control port sets it: a hot room makes ATM step profiles down), how
    # much hotter this spot runs (a hot aisle, a clogged filter), and a faster thermal time
    # constant for tests (the model's if None).
    ambient_c: float = math.nan
    ambient: Clock | None = None
    hot_spot_c: float = 0.0
    thermal_tau_s: float | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.ambient_c):
            self.ambient_c = self.model.ambient_c
        self.reset()

    def reset(self) -> None:
        """Boot state: default profile, mining at full power, temperatures settled."""
        now = self.clock()
        self.profile = self.model.default_profile
        self.user_profile = self.profile
        self.sleeping = False
        self.atm_enabled = True
        self.session_id = ""
        self.session_used_s = now
        self.atm_checked_s = now
        self.power_target_w = None
        self.boot_at = now
        power_w, hashrate_ths = self.target()
        self._from_power_w = power_w
        self._from_hashrate_ths = hashrate_ths
        self._ramp_from_s = now
        self._ramp_s = 0.0
        self._pcb_c = self._steady_pcb_c(power_w)
        self._thermal_at_s = now
        self._work_th = 0.0
        self._avg_from_s = now
        self._avg_from_work_th = 0.0

    def reset_ramp(self) -> None:
        """Settle at the current target now (boot into a saved state, no ramp)."""
        now = self.clock()
        power_w, hashrate_ths = self.target()
        self._from_power_w = power_w
        self._from_hashrate_ths = hashrate_ths
        self._ramp_from_s = now
        self._ramp_s = 0.0
        self._pcb_c = self._steady_pcb_c(power_w)
        self._thermal_at_s = now

    # --- physics -------------------------------------------------------------------------

    def target(self) -> tuple[float, float]:
        """Where the miner is heading: (power W, hashrate TH/s)."""
        if self.sleeping:
            return self.model.standby_w, 0.0
        if self.power_target_w is not None:
            t = self.power_target_w
            return t * TARGET_DRAW_RATIO, self.model.hashrate_at_w(t)
        p = self.model.profile(self.profile)
        return p.power_w * self.profile_draw_ratio, p.hashrate_ths

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

    def work_th(self, now: float | None = None) -> float:
        """Hashes done since boot, in TH (the integral of the linear ramps, exactly)."""
        now = self.clock() if now is None else now
        _, h1 = self.target()
        h0 = self._from_hashrate_ths
        dt = max(0.0, now - self._ramp_from_s)
        r = self._ramp_s
        if r <= 0.0:
            seg = h1 * dt
        elif dt <= r:
            seg = h0 * dt + (h1 - h0) * dt * dt / (2.0 * r)
        else:
            seg = (h0 + h1) * r / 2.0 + h1 * (dt - r)
        return self._work_th + seg

    def average_hashrate_ths(self, now: float | None = None) -> float:
        """The since-start average (cgminer's ``MHS av``): since boot or the last wake."""
        now = self.clock() if now is None else now
        if self.sleeping:
            return 0.0  # boards off: the mining process counts nothing until the next wake
        elapsed = now - self._avg_from_s
        if elapsed <= 0.0:
            return self.hashrate_ths(now)
        return (self.work_th(now) - self._avg_from_work_th) / elapsed

    def mining_elapsed_s(self, now: float | None = None) -> float:
        """Seconds since the mining process (re)started: boot or the last wake."""
        now = self.clock() if now is None else now
        return max(0.0, now - self._avg_from_s)

    def intake_c(self) -> float:
        """The air temperature at this miner's intake."""
        base = self.ambient_c if self.ambient is None else self.ambient()
        return base + self.hot_spot_c

    def fan_ratio(self, power_w: float) -> float:
        """Fan duty (0.2-1.0) the fan loop settles on to hold the boards under target."""
        rise_floor = self.model.pcb_rise_c_per_kw * power_w / 1000.0
        if self.model.target_c is None:
            return 0.2
        room = self.model.target_c - 3.0 - self.intake_c()
        if room <= 0.0:
            return 1.0
        return min(1.0, max(0.2, 0.2 * math.pow(rise_floor / room, 1.0 / 0.6)))

    def _steady_pcb_c(self, power_w: float) -> float:
        # Faster fans carry heat away better: the rise falls as (floor duty / duty)^0.6.
        rise_floor = self.model.pcb_rise_c_per_kw * power_w / 1000.0
        return self.intake_c() + rise_floor * math.pow(0.2 / self.fan_ratio(power_w), 0.6)

    def pcb_c(self, now: float | None = None) -> float:
        """Board (outlet) temperature, lagging power with time constant ``thermal_tau_s``."""
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

    def inlet_c(self, now: float | None = None) -> float:
        """Board intake sensors: ambient plus part of the board's rise (34 C beside 47 C)."""
        pcb = self.pcb_c(now)
        intake = self.intake_c()
        return intake + 0.4 * (pcb - intake)

    def chip_c(self, now: float | None = None) -> float:
        # LuxOS shows measured board temperatures where others estimate chip ones.
        return self.pcb_c(now) + self.model.chip_rise_c_per_kw * self.power_w(now) / 1000.0

    # --- ATM and sessions ----------------------------------------------------------------

    def atm_tick(self, now: float | None = None) -> None:
        """Advanced Thermal Management: step down a profile when hot, back up when cool.

        Evaluated lazily when the miner is observed, at most once per ``atm_step_s``.
        """
        now = self.clock() if now is None else now
        if not self.atm_enabled or self.sleeping or self.power_target_w is not None:
            self.atm_checked_s = now
            return
        if now - self.atm_checked_s < self.timing.atm_step_s:
            return
        self.atm_checked_s = now
        names = [p.name for p in self.model.profiles]
        i = names.index(self.profile)
        ceiling = names.index(self.user_profile) if self.user_profile in names else i
        pcb = self.pcb_c(now)
        if pcb >= self.model.hot_c and i > 0:
            self._start_ramp(self.timing.profile_ramp_s)
            self.profile = names[i - 1]
        elif pcb < self.model.hot_c - 5.0 and i < ceiling:
            self._start_ramp(self.timing.profile_ramp_s)
            self.profile = names[i + 1]

    def session_holder(self, now: float | None = None) -> str:
        """The active session id, or "" when none (an idle one expires)."""
        now = self.clock() if now is None else now
        if self.session_id and now - self.session_used_s > self.timing.session_idle_s:
            self.session_id = ""
        return self.session_id

    def touch_session(self, now: float | None = None) -> None:
        self.session_used_s = self.clock() if now is None else now

    def _start_ramp(self, ramp_s: float) -> None:
        now = self.clock()
        self.pcb_c(now)  # settle the thermal integral up to the change
        self._work_th = self.work_th(now)
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
        now = self.clock()
        self._avg_from_s = now
        self._avg_from_work_th = self._work_th

    def set_profile(self, name: str) -> None:
        self.model.profile(name)  # KeyError for an unknown profile, checked by the caller
        if name == self.profile:
            self.user_profile = name
            return
        self.user_profile = name
        self._start_ramp(0.0 if self.sleeping else self.timing.profile_ramp_s)
        self.profile = name

    def set_power_target(self, power_w: float) -> None:
        """Braiins OS+ ``SetPowerTarget``: ramp to a continuous target (range checked by caller)."""
        if power_w == self.power_target_w:
            return
        self._start_ramp(0.0 if self.sleeping else self.timing.profile_ramp_s)
        self.power_target_w = power_w

    def truth(self) -> dict[str, object]:
        """The true state as plain JSON-able data (for tests and the control endpoint)."""
        now = self.clock()
        return {
            "address": self.address,
            "model": self.model.key,
            "profile": self.profile,
            "user_profile": self.user_profile,
            "session": self.session_holder(now),
            "sleeping": self.sleeping,
            "atm_enabled": self.atm_enabled,
            "power_target_w": self.power_target_w,
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
