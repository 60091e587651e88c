"""Soak: a simulated day at high speed, hundreds of miners, random faults, invariants every cycle.

The agent runs its real loop (coordinator, policy, actuator, journal, event book) against
``--miners`` LuxOS simulators served in this process on 127.80.x addresses (pyasic talks to them
over loopback sockets), with prices replayed from the real ERCOT year
(``rtm_hub_prices_15min_2023.csv``) at ``--speed`` × real time. While it runs:

* operator overrides (site load ≤ a random target) are written to the journal now and then,
  exactly as ``site-agent curtail`` does, and expire;
* random miner faults (hang, slow, garbage, error status, ignored commands, reboot) are
  injected and cleared;
* after every control cycle (the Agent's ``on_cycle`` hook) the invariants are checked:

  1. planned power ≤ the plan's active limit (unless the policy reports the limit infeasible);
  2. the simulators' *true* site power ≤ the highest active limit of the last ``lag_s``
     seconds + the nameplate of every miner that may draw power the agent cannot yet know
     about or stop: one ignoring commands or one that rebooted (into mining) within ``lag_s``.
     ``lag_s`` = 2 cycles + a poll + the sleep ramp: a lower limit takes one cycle to plan and
     the miners' sleep ramp to show at the meter;

* at the end: every action executed (``state.actions``) has its audit row in the journal, and
  memory is flat (RSS growth after warm-up, and the number of asyncio tasks).

Prints one JSON line every ``--report-s`` seconds and a final ``{"figure": "soak", ...}`` line.
Run: ``.venv/bin/python bench/soak.py [--miners 300] [--hours 24] [--speed 1440]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make agent/, drivers/, simulators/ importable
    sys.path.insert(0, str(ROOT))

from agent.control.config import AgentConfig, parse_config  # noqa: E402
from agent.control.domain import Plan, Snapshot  # noqa: E402
from agent.journal.store import Store  # noqa: E402
from agent.runtime.actuator import ActionResult  # noqa: E402
from agent.runtime.loop import Agent, Components  # noqa: E402
from agent.runtime.miner_fleet import MinerFleet  # noqa: E402
from agent.runtime.wiring import build_miners  # noqa: E402
from drivers.grid.base import FailDirection, GridEvent, ProgramKind  # noqa: E402
from drivers.prices.csv_replay import CsvPriceReplay, load_price_csv  # noqa: E402
from simulators.luxos import LuxosFleet, fleet_addresses, fleet_specs, raise_open_file_limit  # noqa: E402
from simulators.luxos_model import (  # noqa: E402
    S19J_PRO,
    FaultKind,
    Timing,
)
from simulators.luxos_model import S21 as S21_MODEL  # noqa: E402

PRICE_CSV = ROOT.parent / "shared" / "data" / "ercot" / "rtm_hub_prices_15min_2023.csv"
FAULTS = (
    FaultKind.HANG,
    FaultKind.SLOW,
    FaultKind.GARBAGE,
    FaultKind.ERROR,
    FaultKind.IGNORE,
    FaultKind.REBOOT,
)
MODELS: dict[str, Any] = {"S19jPro": S19J_PRO.site_config(), "S21": S21_MODEL.site_config()}
NAMEPLATE_W = {"s19jpro": 3500.0, "s21": 4000.0}
TIMING = Timing(wake_ramp_s=0.5, sleep_ramp_s=0.2, profile_ramp_s=0.2)


@dataclass(frozen=True, slots=True)
class SoakSettings:
    miners: int = 300
    base: str = "127.80.0.1"  # first miner address (loopback)
    hours: float = 24.0  # simulated
    speed: float = 1440.0  # simulated seconds per real second
    start: datetime = datetime(2023, 9, 6, tzinfo=UTC)  # an ERCOT emergency day (HB_WEST)
    column: str = "HB_WEST"
    seed: int = 7
    fault_every_s: float = 1.5  # real seconds between fault injections
    fault_for_s: tuple[float, float] = (3.0, 10.0)
    event_every_s: float = 8.0  # real seconds between operator overrides
    event_for_s: tuple[float, float] = (3.0, 6.0)
    report_s: float = 5.0
    warmup_frac: float = 0.25  # memory is measured from here to the end
    # A faulted miner's next chance (the agent's default is 300 s): short, so that retries of
    # still-faulty miners happen within the faults' lifetimes.
    fault_retry_s: float = 2.0
    # Run on past ``hours`` until the agent has made this many control cycles (a busy machine
    # gives it fewer per wall second), for at most ``overtime_s`` more wall seconds.
    min_cycles: int = 0
    overtime_s: float = 120.0


@dataclass(slots=True)
class Violation:
    at_s: float
    what: str


@dataclass(slots=True)
class SoakState:
    """Everything the invariant checks keep between cycles."""

    started: float
    limits: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, limit W)
    reboots: dict[str, float] = field(default_factory=dict)  # address -> when it rebooted
    ignoring: dict[str, float | None] = field(default_factory=dict)  # -> when found out
    violations: list[Violation] = field(default_factory=list)
    cycles: int = 0
    worst_over_w: float = float("-inf")  # max(true - allowed), should stay <= 0
    worst_plan_over_w: float = float("-inf")
    max_cycle_s: float = 0.0
    injected: dict[str, int] = field(default_factory=dict)
    ups: list[tuple[float, float]] = field(default_factory=list)  # (snapshot time, W started)
    worst_up_w_per_2s: float = 0.0
    max_poll_s: float = 0.0
    events: int = 0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def site_config(settings: SoakSettings, journal: Path, models: Sequence[str]) -> AgentConfig:
    """One miner line per simulated miner; limits scaled to the fleet."""
    fleet_w = settings.miners / 2 * (3420 + 3930)
    miners = [
        {"id": f"m{i:04d}", "address": a, "model": "S19jPro" if m == "s19jpro" else "S21"}
        for i, (a, m) in enumerate(
            zip(fleet_addresses(settings.miners, settings.base), models, strict=True)
        )
    ]
    return parse_config(
        {
            # The interconnect binds when every miner runs at its top profile; load may come
            # back at 10 % of the fleet per second.
            "site": {
                "id": "soak",
                "interconnect_limit_kw": round(fleet_w * 0.85 / 1000),
                "ramp_up_kw_per_min": round(fleet_w * 0.1 / 1000 * 60),
            },
            "control": {
                "interval_s": 1.0,
                "poll_interval_s": 1.0,
                "poll_jitter_s": 0.1,
                "device_timeout_s": 1.0,
                "retries": 1,
                "verify_after_s": 3.5,
                "hysteresis_usd_per_mwh": 3,
                "min_on_s": 2,
                "min_off_s": 2,
            },
            "economics": {"pool_fee": 0.02, "hashprice": {"usd_per_ph_day": 55}},
            "miner_models": MODELS,
            "miners": miners,
            # Replaced by the CSV replay handed to the agent directly (config keeps its path
            # relative to a file; the soak finds the data itself).
            "prices": {"realtime": {"type": "constant", "value": 0}, "max_age_s": 3600},
            "metrics": {"enabled": False},
            "store": {"path": str(journal)},
        }
    )


async def run_soak(
    settings: SoakSettings,
    price_csv: Path,
    workdir: Path,
    emit: Callable[[dict[str, Any]], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the soak; return the summary (also emitted as the last line)."""
    rng = random.Random(settings.seed)
    raise_open_file_limit()
    journal = workdir / "soak-journal.db"
    specs = fleet_specs(settings.miners, settings.base)
    config = site_config(settings, journal, [s.model for s in specs])
    addresses = [s.address for s in specs]
    device_of = {a: f"m{i:04d}" for i, a in enumerate(addresses)}
    model_of = {s.address: s.model for s in specs}
    series = load_price_csv(price_csv, settings.column, collect_errors=True)
    prices = CsvPriceReplay(series, start=settings.start, speed=settings.speed)
    wall_s = settings.hours * 3600.0 / settings.speed
    control = config.control
    ramp_w_per_s = config.site.ramp_up_kw_per_min * 1000.0 / 60.0
    lag_s = 2 * control.interval_s + control.poll_interval_s + TIMING.sleep_ramp_s + 0.5
    fleet = LuxosFleet(specs, timing=TIMING)
    st = SoakState(started=time.monotonic())

    def true_w() -> float:
        return sum(m.power_w() for m in fleet.miners.values())

    def allowed_w(now: float) -> float:
        recent = [w for t, w in st.limits if t >= now - lag_s]
        limit = max(recent) if recent else st.limits[-1][1]
        # An ignoring miner draws unannounced until the agent finds it out ("not applied").
        stubborn = {a for a, found in st.ignoring.items() if found is None or found >= now - lag_s}
        unknown = stubborn | {a for a, t in st.reboots.items() if t >= now - lag_s}
        return limit + sum(NAMEPLATE_W[model_of[a]] for a in unknown)

    def on_cycle(snapshot: Snapshot, plan: Plan, results: Sequence[ActionResult]) -> None:
        now = time.monotonic()
        st.cycles += 1
        st.limits.append((now, plan.limit_w))
        st.limits = [(t, w) for t, w in st.limits if t >= now - 10 * lag_s]
        t_s = now - st.started
        if "infeasible" not in plan.summary:
            over = plan.planned_power_w - plan.limit_w
            st.worst_plan_over_w = max(st.worst_plan_over_w, over)
            if over > 1.0:
                st.violations.append(
                    Violation(
                        t_s, f"planned {plan.planned_power_w:.0f} W > limit {plan.limit_w:.0f} W"
                    )
                )
        # Ramp: power the agent started in the trailing 2 s of snapshot time (the ramp budget
        # refills with the time between snapshots; a cycle's actions follow its snapshot).
        at = snapshot.at.timestamp()
        st.ups.extend(
            (at, r.action.delta_power_w) for r in results if r.result == "ok" and not r.action.sheds
        )
        st.ups = [(t, w) for t, w in st.ups if t >= at - 2.0]
        st.worst_up_w_per_2s = max(st.worst_up_w_per_2s, sum(w for _, w in st.ups))
        poll = agent_state_poll_s()
        st.max_poll_s = max(st.max_poll_s, poll)
        for a, found in st.ignoring.items():
            if found is None and "not applied" in (agent.state.faults.get(device_of[a]) or ""):
                st.ignoring[a] = now
        measured = true_w()
        over_w = measured - allowed_w(now)
        st.worst_over_w = max(st.worst_over_w, over_w)
        if over_w > 0:
            st.violations.append(
                Violation(t_s, f"true {measured:.0f} W > allowed by {over_w:.0f} W; {plan.summary}")
            )

    def agent_state_poll_s() -> float:
        health = agent.state.sources.get("miners")
        return 0.0 if health is None else health.last_duration_s

    async def faults(stop: asyncio.Event) -> None:
        active: dict[str, float] = {}  # address -> when to clear
        while not stop.is_set():
            now = time.monotonic()
            for a, until_t in list(active.items()):
                if now >= until_t:
                    del active[a]
                    st.ignoring.pop(a, None)
                    if fleet.miners[a].fault.kind is not FaultKind.NONE:
                        fleet.set_fault(a, FaultKind.NONE)
            a = rng.choice(addresses)
            if a not in active:
                kind = rng.choice(FAULTS)
                delay = {FaultKind.SLOW: 0.5, FaultKind.REBOOT: rng.uniform(0.5, 2.0)}.get(kind, 0)
                fleet.set_fault(a, kind, delay_s=delay)
                active[a] = now + rng.uniform(*settings.fault_for_s)
                st.injected[kind.value] = st.injected.get(kind.value, 0) + 1
                if kind is FaultKind.IGNORE:
                    st.ignoring[a] = None
                if kind is FaultKind.REBOOT:
                    st.reboots[a] = now + delay  # it comes back mining after the downtime
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.fault_every_s)
        for a in active:
            fleet.set_fault(a, FaultKind.NONE)

    async def overrides(stop: asyncio.Event, store: Store) -> None:
        fleet_kw = settings.miners / 2 * (3.42 + 3.93)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.event_every_s)
            if stop.is_set():
                return
            now = datetime.now(UTC)
            target_kw = round(rng.uniform(0.2, 0.7) * fleet_kw)
            event = GridEvent(
                event_id=f"soak-{st.events:04d}",
                source="operator:soak",
                program="operator-override",
                kind=ProgramKind.OVERRIDE,
                start=now,
                end=now + timedelta(seconds=rng.uniform(*settings.event_for_s)),
                max_site_kw=target_kw,
                fail=FailDirection.HOLD,
            )
            await store.upsert_event(event, baseline_w=0.0)
            st.events += 1

    async def reporter(stop: asyncio.Event, agent: Agent) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.report_s)
            plan = agent.state.plan
            emit(
                {
                    "t_s": round(time.monotonic() - st.started, 1),
                    "cycles": st.cycles,
                    "price_usd_per_mwh": None
                    if agent.coordinator.price is None
                    else agent.coordinator.price.value,
                    "limit_kw": None if plan is None else round(plan.limit_w / 1000, 1),
                    "planned_kw": None if plan is None else round(plan.planned_power_w / 1000, 1),
                    "true_kw": round(true_w() / 1000, 1),
                    "faults": len(agent.state.faults),
                    "violations": len(st.violations),
                    "rss_mb": round(rss_mb(), 1),
                    "tasks": len(asyncio.all_tasks()),
                }
            )

    async with fleet, Store.open(journal) as store:
        control = config.control.model_copy(update={"fault_retry_s": settings.fault_retry_s})
        config = config.model_copy(update={"control": control})
        components = Components(
            fleets=[MinerFleet(config, build_miners(config))],
            price_source=prices,
            store=store,
            # The reporter reads the agent once it runs (the agent starts its services).
            services=[faults, lambda s: overrides(s, store), lambda s: reporter(s, agent)],
        )
        agent = Agent(config, components, observers=[on_cycle])
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop, grace_s=5.0))
        await asyncio.sleep(wall_s * settings.warmup_frac)
        rss_warm, tasks_warm = rss_mb(), len(asyncio.all_tasks())
        await asyncio.sleep(wall_s * (1 - settings.warmup_frac))
        overtime_end = time.monotonic() + settings.overtime_s
        while st.cycles < settings.min_cycles:
            if time.monotonic() >= overtime_end:
                break  # the test's own assertions say what was missing
            await asyncio.sleep(0.1)
        ran_s = time.monotonic() - st.started
        rss_end, tasks_end = rss_mb(), len(asyncio.all_tasks())
        stop.set()
        await asyncio.wait_for(run, 30)
        actions = sum(agent.state.actions.values())
        audited = sum(1 for r in await store.audit_rows(limit=None) if r.source == "policy")
    summary: dict[str, Any] = {
        "figure": "soak",
        "miners": settings.miners,
        "simulated_h": settings.hours,
        "speed": settings.speed,
        "wall_s": round(time.monotonic() - st.started, 1),
        "cycles": st.cycles,
        "cycles_per_s": round(st.cycles / ran_s, 2),
        "actions": actions,
        "actions_by_result": {f"{k}:{r}": n for (k, r), n in sorted(agent.state.actions.items())},
        "audited": audited,
        "events": st.events,
        "faults_injected": st.injected,
        "violations": len(st.violations),
        "first_violations": [f"{v.at_s:.1f}s {v.what}" for v in st.violations[:5]],
        "worst_true_over_allowed_w": round(st.worst_over_w, 1),
        "worst_planned_over_limit_w": round(st.worst_plan_over_w, 1),
        "lag_s": lag_s,
        "ramp_allowed_w_per_2s": round(ramp_w_per_s * 2 + ramp_w_per_s * control.interval_s),
        "worst_started_w_per_2s": round(st.worst_up_w_per_2s),
        "max_poll_s": round(st.max_poll_s, 3),
        "rss_warm_mb": round(rss_warm, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tasks_warm": tasks_warm,
        "tasks_end": tasks_end,
        "last_cycle_duration_s": round(agent.state.last_cycle_duration_s, 3),
    }
    emit(summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--miners", type=int, default=300)
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    p.add_argument("--speed", type=float, default=1440.0, help="simulated s per real s")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--base", default="127.80.0.1", help="first miner address (loopback)")
    p.add_argument("--csv", type=Path, default=PRICE_CSV)
    args = p.parse_args(argv)
    if not args.csv.is_file():
        print(f"error: price file {args.csv} not found", file=sys.stderr)
        return 2
    settings = SoakSettings(
        miners=args.miners, hours=args.hours, speed=args.speed, seed=args.seed, base=args.base
    )

    def emit(line: dict[str, Any]) -> None:
        print(json.dumps(line), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        summary = asyncio.run(run_soak(settings, args.csv, Path(tmp), emit))
    return 0 if summary["violations"] == 0 and summary["actions"] == summary["audited"] else 1


if __name__ == "__main__":
    sys.exit(main())
