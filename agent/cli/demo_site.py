"""The demo site: simulated miners and GPU nodes, the real agent, a real ERCOT day, in one run.

Starts the LuxOS miner simulators of ``configs/demo-site.yaml`` on loopback (unmodified pyasic
talks to them over TCP) and its GPU nodes (simulated H100s behind the real NVML driver, with the
simulated scheduler running SLA, preemptible and filler jobs on them), replays a real ERCOT day
(2023-09-06 on HB_WEST, an emergency day with prices from negative to over 5,000 USD/MWh) at
high speed, runs the agent against it, prints one status line per replayed 15-minute interval,
and ends with a summary: energy, revenue, cost and profit, against the same site left always on
(miners at their default profile, every job running uncapped).

With a ``meter:`` block the demo also runs the pymodbus SunSpec meter simulator on its loopback
net: it measures the simulators' true power plus cooling (on the replayed day's hot afternoon)
and noise, the agent reads it and trims its limit by it, and the summary shows the metered load
against the device sum, and the trim.

The money is settled the way the backtest settles it: every control cycle, the power the
simulators *measure* (miners, GPUs, plus the GPU hosts' overhead) is charged at the price of the
interval being replayed, the hashrate they *measure* earns hashprice, and every running job
earns its contract per GPU-hour times the throughput fraction at its node's power cap.

When Mosquitto is installed, each GPU host runs as a node agent in its own process
(``site-agent sim node``, :mod:`agent.cli.demo_nodes`) behind a broker on the demo's loopback
net, and the agent dispatches it over MQTT like any remote node (``remote_nodes:``); the hosts'
power is what their own telemetry reports, and their jobs, caps and AI revenue are read from
their own ``/metrics``. Without Mosquitto the GPU hosts run in-process, and the demo says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cli.demo_drivers import GpuSimulation, build_simulated_gpu_fleet
from agent.cli.demo_nodes import NodeProcesses, NodeTelemetry, broker_binaries
from agent.control.config import (
    AgentConfig,
    ConfigError,
    CsvPriceConfig,
    load_config,
)
from agent.control.domain import SLEEP, ActionKind, MinerView, Plan, Snapshot
from agent.control.economics import ai_revenue_usd_per_h, mining_revenue_usd_per_h
from agent.control.settlement import Ledger
from agent.control.site import contract
from agent.outputs.metrics import MetricsService
from agent.outputs.node_metrics import register_remote_nodes
from agent.runtime.actuator import ActionResult
from agent.runtime.coordinator import utc_now
from agent.runtime.fleet import Fleet
from agent.runtime.gpu_fleet import GpuFleet, expand_gpu_nodes
from agent.runtime.loop import Agent, Components
from agent.runtime.miner_fleet import MinerFleet
from agent.runtime.state import AgentState
from agent.runtime.supervisor import TaskBoard
from agent.runtime.wiring import (
    build_meter,
    build_miners,
    build_price_source,
    build_remote_fleet,
)
from drivers.errors import AgentError
from drivers.jobs.base import JobClass, JobState
from drivers.prices.csv_replay import CsvPriceReplay
from simulators.antminer import AntminerFleet, AntminerSpec
from simulators.braiins import BraiinsFleet
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.meter import MeterSimulator
from simulators.whatsminer import WhatsminerFleet, WhatsminerSpec

DAY_S = 86_400.0
DEMO_NET = 42  # the shipped demo's loopback net: miners on 127.42.x.y
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Tally:
    """The agent's and the always-on site's money (one settlement, :class:`Ledger`), and what
    the agent did."""

    agent: Ledger = field(default_factory=lambda: Ledger("agent"))
    always_on: Ledger = field(default_factory=lambda: Ledger("always_on"))
    peak_kw: float = 0.0
    actions: int = 0
    failed: int = 0
    faults: set[str] = field(default_factory=set)
    suspended: Counter[str] = field(default_factory=Counter)  # job class -> suspensions
    resumed: int = 0
    cap_changes: int = 0
    # With a meter: site energy metered and the devices' own, over the same cycles (Wh); and
    # the cycles in which the agent trusted the meter.
    metered_wh: float = 0.0
    device_wh: float = 0.0
    trusted_cycles: int = 0
    cycles: int = 0
    # GPU hosts as node processes: what their telemetry showed last (to count changes).
    node_suspended: dict[str, dict[str, int]] = field(default_factory=dict)
    node_caps: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class GpuSide:
    """The GPU hosts in one cycle: read in-process, or from the node agents' own telemetry."""

    power_w: float = 0.0
    running: dict[JobClass, int] = field(default_factory=lambda: dict.fromkeys(JobClass, 0))
    suspended: int = 0
    caps_w: list[float] = field(default_factory=list)
    ai_usd_per_h: float = 0.0


def miners_on_net(config: AgentConfig, net: int) -> AgentConfig:
    """``config`` with every miner address (and the meter's) moved to 127.``net``.x.y (same
    last two octets)."""
    if not 1 <= net <= 254:
        raise ValueError(f"loopback net must be 1..254, got {net}")

    def moved(address: str) -> str:
        packed = ipaddress.IPv4Address(address).packed
        return f"127.{net}.{packed[2]}.{packed[3]}"

    miners = [line.model_copy(update={"address": moved(line.address)}) for line in config.miners]
    update: dict[str, Any] = {"miners": miners}
    if config.meter is not None:
        update["meter"] = config.meter.model_copy(update={"host": moved(config.meter.host)})
    return config.model_copy(update=update)


FAMILY_NAMES = {
    "luxos": "LuxOS",
    "antminer": "stock Antminer",
    "braiins": "Braiins OS+",
    "whatsminer": "Whatsminer",
}


def without_unservable_antminers(config: AgentConfig) -> tuple[AgentConfig, str]:
    """The stock Antminer simulator serves its web API on port 80, as pyasic expects: when this
    process may not bind it (not root), the demo runs without its stock Antminers, and says why
    in the returned line (empty when nothing was dropped)."""
    stock = [line for line in config.miners if line.firmware == "antminer"]
    if not stock:
        return config, ""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((stock[0].address, 80))
    except PermissionError:
        count = sum(line.count for line in stock)
        kept = [line for line in config.miners if line.firmware != "antminer"]
        line = (
            f"demo: runs without its {count} stock Antminers: their web API needs port 80, "
            "which only root may bind"
        )
        return config.model_copy(update={"miners": kept}), line
    except OSError:
        pass  # in use or unavailable: the simulator's own start reports it
    finally:
        probe.close()
    return config, ""


def miner_simulators(by_family: dict[str, list[tuple[str, str]]], timing: Timing) -> list[Any]:
    """One simulator fleet per family, from (address, simulator model key) pairs."""
    sims: list[Any] = []
    if by_family["luxos"]:
        sims.append(LuxosFleet([MinerSpec(a, m) for a, m in by_family["luxos"]], timing=timing))
    if by_family["antminer"]:
        specs = [AntminerSpec(a, m) for a, m in by_family["antminer"]]
        sims.append(AntminerFleet(specs, timing=timing))
    if by_family["braiins"]:
        specs_b = [MinerSpec(a, m) for a, m in by_family["braiins"]]
        sims.append(BraiinsFleet(specs_b, timing=timing))
    if by_family["whatsminer"]:
        specs_w = [WhatsminerSpec(a, m) for a, m in by_family["whatsminer"]]
        sims.append(WhatsminerFleet(specs_w, timing=timing))
    return sims


def model_key(name: str) -> str:
    """Config model name → simulator model key (``S19jPro`` → ``s19jpro``)."""
    return name.lower().replace(" ", "").replace("-", "")


async def run_demo(
    config_path: Path,
    duration_s: float,
    *,
    out: Any = None,
    loopback_net: int | None = None,
    node_processes: bool = True,
    on_nodes: Any = None,
) -> int:
    """Run the demo site; ``loopback_net`` N moves the simulated miners (and the node agents'
    broker) to 127.N.x.y (the tests use their own net, so two runs on one machine never share an
    address). ``node_processes``: GPU hosts as node agents in their own processes when
    Mosquitto is installed; ``on_nodes(nodes)`` is called once they run (the tests watch them)."""
    out = out or sys.stdout
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    if loopback_net is not None:
        config = miners_on_net(config, loopback_net)
    rt = config.prices.realtime
    if not isinstance(rt, CsvPriceConfig):
        print(
            f"{config_path}: the demo replays a CSV price file (prices.realtime.type: csv_replay)"
        )
        return 2
    # The whole day in `duration_s` of wall time.
    speed = DAY_S / duration_s
    config = config.model_copy(
        update={
            "prices": config.prices.model_copy(
                update={"realtime": rt.model_copy(update={"speed": speed})}
            )
        }
    )
    try:
        price_source = build_price_source(config)
    except AgentError as exc:
        print(f"demo cannot start: {exc}", file=sys.stderr)
        return 2
    assert isinstance(price_source, CsvPriceReplay)

    # One simulator per firmware family in the config (LuxOS for "luxos" and "auto" lines).
    config, refusal = without_unservable_antminers(config)
    if refusal:
        print(refusal, file=out)
    timing = Timing(wake_ramp_s=2.0, sleep_ramp_s=0.3, profile_ramp_s=0.5)
    by_family: dict[str, list[tuple[str, str]]] = {f: [] for f in FAMILY_NAMES}
    for _id, address, line in config.expanded_miners():
        family = "luxos" if line.firmware == "auto" else line.firmware
        if family not in by_family:
            print(f"demo: {line.id}: no {line.firmware} simulator in the demo", file=sys.stderr)
            return 2
        by_family[family].append((address, model_key(line.model)))
    fleet = contextlib.AsyncExitStack()
    try:
        sims: list[Any] = miner_simulators(by_family, timing)
    except ValueError as exc:  # a model the family's simulator does not know
        print(f"demo cannot start: {exc}", file=sys.stderr)
        return 2
    gpus: GpuFleet | None = None
    simulation: GpuSimulation | None = None
    try:
        if config.gpu_nodes:
            gpus, simulation = build_simulated_gpu_fleet(config, source=str(config_path))
    except AgentError as exc:
        print(f"demo cannot start: {exc}", file=sys.stderr)
        return 2
    nodes: NodeProcesses | None = None
    agent_config = config
    if simulation is not None and node_processes:
        binaries = broker_binaries()
        if isinstance(binaries, str):
            print(f"demo: GPU hosts run in-process: {binaries}", file=out)
        else:
            net = DEMO_NET if loopback_net is None else loopback_net
            nodes = NodeProcesses(config, simulation, net=net, binaries=binaries)
            agent_config = nodes.controller_config()
            gpus = None
    node_ids = frozenset(() if nodes is None else nodes.node_ids)
    meter: MeterSimulator | None = None
    if config.meter is not None:
        # The site's true load at the point of interconnection, on the replayed day's clock
        # (its ambient curve gives the afternoon's heat).
        host_w = sum(spec.host_overhead_w for _, spec in expand_gpu_nodes(config))
        miner_sims = list(sims)

        def true_devices_w() -> float:
            miners_w = sum(float(f.truth(a)["power_w"]) for f in miner_sims for a in f.addresses)
            if nodes is not None:  # the GPU hosts' truth lives in their processes: their reading
                return miners_w + sum(t.power_w or 0.0 for t in nodes.telemetry().values())
            return miners_w + (0.0 if simulation is None else simulation.gpu_power_w() + host_w)

        meter = MeterSimulator(
            config.meter.host,
            config.meter.port,
            config.meter.unit_id,
            device_power=true_devices_w,
            max_site_w=config.site.interconnect_limit_kw * 1500.0,
            clock=price_source.sim_now_s,
        )
        sims.append(meter)
    always_on_ai = always_on_ai_figures(simulation, config)
    ledger = Tally()
    models = {d: line.model for d, _a, line in config.expanded_miners()}
    default_points = {
        name: next((p for p in m.profiles if p.name == "default"), m.profiles[-1])
        for name, m in config.miner_models.items()
    }
    hashprice = config.economics.hashprice.usd_per_ph_day
    fee = config.economics.pool_fee
    clock = {"mono": time.monotonic()}
    shown = {"interval": -1.0}

    def on_cycle(snapshot: Snapshot, plan: Plan, results: Sequence[ActionResult]) -> None:
        now = time.monotonic()
        dt_h = (now - clock["mono"]) * speed / 3600.0
        clock["mono"] = now
        sim_s = price_source.sim_now_s()
        true_price = price_source.series.value_for_interval_containing(sim_s)
        if true_price is None:
            return
        miners = [m for m in snapshot.miners if m.device_id not in node_ids]
        if nodes is None:
            side = gpu_side_in_process(snapshot)
        else:
            side = gpu_side_of_nodes(snapshot, nodes.telemetry(), ledger)
        miners_w = sum(m.measured_power_w or 0.0 for m in miners)
        site_w = miners_w + side.power_w
        hashrate = sum(m.measured_hashrate_ths or 0.0 for m in miners)
        ledger.agent.settle(
            dt_h,
            true_price,
            miners_w,
            side.power_w,
            mining_revenue_usd_per_h(hashrate, hashprice, fee),
            side.ai_usd_per_h,
            keep_series=False,
        )
        base_ai_w, base_ai_usd_per_h = always_on_ai
        base_w = sum(default_points[models[m.device_id]].power_w for m in miners)
        base_ths = sum(default_points[models[m.device_id]].hashrate_ths for m in miners)
        ledger.always_on.settle(
            dt_h,
            true_price,
            base_w,
            base_ai_w,
            mining_revenue_usd_per_h(base_ths, hashprice, fee),
            base_ai_usd_per_h,
            keep_series=False,
        )
        ledger.peak_kw = max(ledger.peak_kw, site_w / 1000)
        ledger.cycles += 1
        ledger.trusted_cycles += snapshot.load_model.source == "meter"
        if meter is not None:
            # What the meter measures and the devices draw at the same instant (the agent's
            # device readings lag a ramp by a poll, the meter's by another).
            truth = meter.truth()
            metered_w, devices_w = truth.get("site_w"), truth.get("device_w")
            if isinstance(metered_w, float) and isinstance(devices_w, float):
                ledger.metered_wh += metered_w * dt_h
                ledger.device_wh += devices_w * dt_h
        ledger.actions += len(results)
        ledger.failed += sum(1 for r in results if r.result != "ok")
        ledger.faults |= {m.device_id for m in snapshot.miners if m.fault}  # nodes included
        ledger.faults |= {n.device_id for n in snapshot.gpu_nodes if n.fault}
        classes = {j.job_id: j.job_class.value for n in snapshot.gpu_nodes for j in n.jobs}
        for r in results:
            if r.result != "ok":
                continue
            if r.action.kind is ActionKind.SUSPEND_JOB:
                ledger.suspended[classes.get(r.action.job_id or "", "unknown")] += 1
            elif r.action.kind is ActionKind.RESUME_JOB:
                ledger.resumed += 1
            elif r.action.kind is ActionKind.SET_GPU_CAP:
                ledger.cap_changes += 1
        # One line per replayed interval (the cycle that first sees it).
        interval = sim_s - sim_s % price_source.series.interval_s
        if interval != shown["interval"]:
            if shown["interval"] < 0 and metrics is not None and metrics.started.is_set():
                print(f"metrics: http://127.0.0.1:{metrics.port}/metrics", file=out)
                print(f"operator page: http://127.0.0.1:{metrics.port}/", file=out)
            shown["interval"] = interval
            hhmm = price_source.sim_now().strftime("%H:%M")
            line = status_line(hhmm, true_price, miners, side, plan, ledger)
            print(line, file=out, flush=True)

    state = AgentState(site_id=config.site.id, started_at=utc_now())
    tasks = TaskBoard()  # the supervised tasks' health: the supervisor writes, metrics read
    metrics = MetricsService(state, agent_config, tasks=tasks) if config.metrics.enabled else None
    fleets: list[Fleet] = [MinerFleet(config, build_miners(config))]
    if gpus is not None:
        fleets.append(gpus)
    if nodes is not None:
        fleets.append(build_remote_fleet(agent_config, state))
    if metrics is not None:
        register_remote_nodes(metrics, fleets)
    components = Components(
        fleets=fleets,
        price_source=price_source,
        meter=build_meter(config),
        services=() if metrics is None else (metrics,),
    )
    agent = Agent(agent_config, components, state=state, tasks=tasks, observers=[on_cycle])
    miners_text = ", ".join(f"{len(v)} {FAMILY_NAMES[f]}" for f, v in by_family.items() if v)
    print(
        f"site-agent demo: {miners_text} miners simulated on loopback, "
        f"{gpu_summary(config, nodes is not None)}, "
        f"{rt.column} prices of {price_source.sim_now():%Y-%m-%d} replayed at {speed:.0f}x "
        f"({duration_s:.0f} s), interconnect {config.site.interconnect_limit_kw:.0f} kW"
        f"{'' if meter is None else ' at a simulated SunSpec meter'}, "
        f"hashprice {hashprice:.0f} $/PH/day",
        file=out,
        flush=True,
    )
    print(
        f"time   price $/MWh  mining ({'/'.join(sorted(set(models.values())))})  asleep  "
        "AI jobs S/P/F  susp  GPU cap W  "
        "GPU kW  site kW  plan kW  limit  profit $  always-on $",
        file=out,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        import signal

        # Ctrl-C stops the day and everything the demo started (node processes included).
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with fleet:
        for sim in sims:
            await fleet.enter_async_context(sim)
        if nodes is not None:
            try:
                await fleet.enter_async_context(nodes)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"demo cannot start its GPU node agents: {exc}", file=sys.stderr)
                return 1
            print(node_lines(nodes), file=out, flush=True)
            if on_nodes is not None:
                on_nodes(nodes)
        if gpus is not None:
            # Read the GPU nodes once, so the first status line already shows them.
            with contextlib.suppress(AgentError):
                await gpus.poll()
        if not stop.is_set():
            # The day starts now: starting simulators and node processes took no replayed time.
            price_source.restart()
            clock["mono"] = time.monotonic()  # and settlement counts from the day's start
            loop.call_later(duration_s, stop.set)
            await agent.run(stop)
        if nodes is not None:
            codes = await nodes.stop()
            print(node_summary(nodes, agent, codes), file=out, flush=True)
    print_summary(ledger, agent, out)
    return 0


def node_lines(nodes: NodeProcesses) -> str:
    """Where each node agent runs (its pid and its own ``/metrics``)."""
    return "\n".join(
        f"GPU host {node_id}: node agent pid {pid}, broker "
        f"{nodes.broker_host}:{nodes.broker_port}, metrics {nodes.nodes[node_id].metrics_url}"
        for node_id, pid in nodes.pids().items()
    )


def node_summary(nodes: NodeProcesses, agent: Agent, codes: dict[str, int | None]) -> str:
    """Per node agent: the acks the controller received, its last envelope and power, its exit."""
    fleet = next((f for f in agent.fleets if hasattr(f, "link_metrics")), None)
    rows = {} if fleet is None else fleet.link_metrics()
    lines = []
    for node_id in nodes.node_ids:
        row = rows.get(node_id, {})
        t = nodes.nodes[node_id].telemetry if node_id in nodes.nodes else NodeTelemetry()
        envelope = row.get("envelope_w")
        lines.append(
            f"  node {node_id}: acks {row.get('acks', 0):.0f}, applied seq {t.applied_seq}, "
            f"envelope {'-' if envelope is None else f'{envelope / 1000:.1f} kW'}, "
            f"last power {row.get('measured_w', 0.0) / 1000:.1f} kW, "
            f"scraped {t.scraped}x, exit {codes.get(node_id)}"
        )
    return "\n".join(lines)


def gpu_side_in_process(snapshot: Snapshot) -> GpuSide:
    """The GPU hosts as the agent itself reads them (in-process)."""
    side = GpuSide(
        power_w=sum(n.measured_power_w or 0.0 for n in snapshot.gpu_nodes),
        caps_w=[n.cap_w for n in snapshot.gpu_nodes],
        ai_usd_per_h=ai_revenue_rate(snapshot),
    )
    for n in snapshot.gpu_nodes:
        for j in n.jobs:
            if j.state is JobState.RUNNING:
                side.running[j.job_class] += 1
            elif j.state is JobState.SUSPENDED:
                side.suspended += 1
    return side


def gpu_side_of_nodes(
    snapshot: Snapshot, telemetry: dict[str, NodeTelemetry], ledger: Tally
) -> GpuSide:
    """The GPU hosts as node agents: power from the views the controller dispatches on, jobs,
    caps and revenue from each node's own ``/metrics``; suspensions, resumptions and cap changes
    are counted from changes in that telemetry."""
    side = GpuSide()
    for m in snapshot.miners:
        if m.device_id in telemetry:
            side.power_w += m.measured_power_w or 0.0
    for node_id, t in sorted(telemetry.items()):
        if not t.scraped:
            continue
        side.ai_usd_per_h += t.ai_usd_per_h
        if t.cap_w is not None:
            side.caps_w.append(t.cap_w)
            before = ledger.node_caps.get(node_id)
            if before is not None and abs(before - t.cap_w) > 0.5:
                ledger.cap_changes += 1
            ledger.node_caps[node_id] = t.cap_w
        seen = ledger.node_suspended.setdefault(node_id, {})
        for c in JobClass:
            side.running[c] += t.jobs.get((c.value, JobState.RUNNING.value), 0)
            now = t.jobs.get((c.value, JobState.SUSPENDED.value), 0)
            side.suspended += now
            was = seen.get(c.value, 0)
            if now > was:
                ledger.suspended[c.value] += now - was
            elif now < was:
                ledger.resumed += was - now
            seen[c.value] = now
    return side


def ai_revenue_rate(snapshot: Snapshot) -> float:
    """USD/h the running jobs earn at their nodes' power caps (economics.md)."""
    return sum(
        ai_revenue_usd_per_h(j.gpus, j.usd_per_gpu_hour, n.cap_w, n.max_cap_w, n.min_cap_w)
        for n in snapshot.gpu_nodes
        for j in n.jobs
        if j.state is JobState.RUNNING
    )


def always_on_ai_figures(
    simulation: GpuSimulation | None, config: AgentConfig
) -> tuple[float, float]:
    """(power W, revenue USD/h) of the GPU nodes with every job running uncapped."""
    if simulation is None or simulation.scheduler is None:
        return 0.0, 0.0
    specs = [spec for _, spec in expand_gpu_nodes(config)]
    by_name = {spec.scheduler_node: spec for spec in specs}
    power_w = sum(spec.host_overhead_w + spec.gpus * spec.idle_w for spec in specs)
    revenue = 0.0
    for job in simulation.scheduler.jobs():
        spec = by_name.get(job.node or "", specs[0])
        revenue += job.gpus * contract(config, JobClass(job.job_class)).usd_per_gpu_hour
        # A busy GPU draws idle + (cap - idle) x utilization (the simulated physics).
        power_w += job.gpus * (spec.max_cap_w - spec.idle_w) * job.utilization_pct / 100.0
    return power_w, revenue


def gpu_summary(config: AgentConfig, as_processes: bool) -> str:
    if not config.gpu_nodes:
        return "no GPU nodes"
    cards = sum(n.gpus * n.count for n in config.gpu_nodes)
    models = "/".join(sorted({n.model for n in config.gpu_nodes}))
    hosts = sum(n.count for n in config.gpu_nodes)
    where = ", each a node agent process over MQTT" if as_processes else ", in-process"
    return f"{hosts} GPU nodes ({cards} simulated {models}{where})"


def status_line(
    hhmm: str,
    price: float,
    miners: Sequence[MinerView],
    side: GpuSide,
    plan: Plan,
    ledger: Tally,
) -> str:
    by_model: dict[str, int] = {}
    asleep = 0
    for m in miners:
        if m.commanded == SLEEP:
            asleep += 1
        else:
            by_model[m.model] = by_model.get(m.model, 0) + 1
    mining = "/".join(str(v) for _, v in sorted(by_model.items())) or "0"
    running = side.running
    jobs = "/".join(str(running[c]) for c in (JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER))
    caps = "/".join(f"{c:.0f}" for c in side.caps_w) or "-"
    gpu_kw = side.power_w / 1000
    site_kw = (sum(m.measured_power_w or 0.0 for m in miners) + side.power_w) / 1000
    return (
        f"{hhmm}  {price:>11,.2f}  {sum(by_model.values()):>3} ({mining:>7})  {asleep:>6}  "
        f"{jobs:>13}  {side.suspended:>4}  {caps:>9}  {gpu_kw:>6.1f}  "
        f"{site_kw:>7.1f}  {plan.planned_power_w / 1000:>7.1f}  {plan.limit_w / 1000:>5.0f}  "
        f"{ledger.agent.profit_usd:>8.2f}  {ledger.always_on.profit_usd:>11.2f}"
    )


def print_summary(ledger: Tally, agent: Agent, out: Any) -> None:
    mine, base = ledger.agent, ledger.always_on
    rows = [
        ("energy MWh", mine.energy_mwh, base.energy_mwh, ".3f"),
        ("mining revenue $", mine.mining_usd, base.mining_usd, ".2f"),
        ("AI revenue $", mine.ai_usd, base.ai_usd, ".2f"),
        ("energy cost $", mine.energy_cost_usd, base.energy_cost_usd, ".2f"),
        ("profit $", mine.profit_usd, base.profit_usd, ".2f"),
    ]
    print("", file=out)
    print(f"{'summary (one replayed day)':<30}{'agent':>12}{'always-on':>12}", file=out)
    for label, a, b, fmt in rows:
        print(f"  {label:<28}{a:>12{fmt}}{b:>12{fmt}}", file=out)
    gain = mine.profit_usd - base.profit_usd
    print(f"  agent ahead of always-on by ${gain:,.2f}", file=out)
    if any(f.name in ("gpus", "nodes") for f in agent.fleets):
        by_class = ", ".join(
            f"{c.value} {ledger.suspended[c.value]}"
            for c in (JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER)
        )
        print(
            f"  AI jobs suspended ({by_class}), resumed {ledger.resumed}, "
            f"GPU cap changes {ledger.cap_changes}",
            file=out,
        )
    if agent.components.meter is not None:
        status = agent.state.meter
        trim_kw = 0.0 if status is None else status.trim_w / 1000
        share = ledger.trusted_cycles / max(ledger.cycles, 1)
        if ledger.device_wh > 0:
            print(
                f"  meter: site {ledger.metered_wh / 1000:,.1f} kWh metered vs "
                f"{ledger.device_wh / 1000:,.1f} kWh device sum "
                f"({ledger.metered_wh / ledger.device_wh - 1:+.1%}: cooling, base load), "
                f"trim {trim_kw:.1f} kW at the end, meter trusted in {share:.0%} of cycles",
                file=out,
            )
        else:
            print(f"  meter: never read ({share:.0%} of cycles trusted)", file=out)
    print(
        f"  control cycles {agent.state.cycles}, actions {ledger.actions} "
        f"({ledger.failed} failed), peak site {ledger.peak_kw:.1f} kW, "
        f"faulted devices {len(ledger.faults)}",
        file=out,
        flush=True,
    )
