"""Benchmark: dispatch a virtual 100,000-miner site through node agents over a real Mosquitto.

Starts Mosquitto (one user per node and the node ACL) and ``python -m simulators.nodes`` (200
miner partitions of 500 miners + 64 GPU hosts, each its own MQTT peer) as separate processes,
then runs the real controller loop in this process with a
:class:`~agent.runtime.remote_fleet.RemoteNodeFleet` over the 264 nodes, reading prices from the
real HTTP price server. After every node is heard, the price spikes from 30 to 400 $/MWh (every
miner partition is worth less than its energy, every GPU host more) and it measures:

* from the spike to every shed node's ack (``spike_to_all_acked_s``), and to every shed node's
  own telemetry confirming its envelope (``spike_to_all_confirmed_s``), broker included;
* the controller's CPU per control cycle (process CPU time / cycles over the run) and RSS;
* side by side, the same dispatch with every miner polled directly by one controller: measured
  with ``bench/agent_spike.py --miners N`` (``--direct N``, 1,000 by default: the whole agent
  against N LuxOS simulators over pyasic, in this same run), and extrapolated linearly to the
  site's miners (a direct controller must poll every miner to confirm a shed).

Prints one JSON line per figure. Run: ``.venv/bin/python bench/nodes.py [--partitions 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.control.config import parse_config  # noqa: E402
from agent.runtime.remote_fleet import RemoteNodeFleet  # noqa: E402
from simulators.price_server import PriceServer  # noqa: E402
from tests.servers import Mosquitto  # noqa: E402
from tests.site_agent import build_agent  # noqa: E402


def figure(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"figure": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> None:
    ids = [f"part-{i:03d}" for i in range(args.partitions)]
    ids += [f"gpu-{i:03d}" for i in range(args.gpu_hosts)]
    users = {"controller": "controller-secret", **{n: f"{n}-secret" for n in ids}}
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    broker = Mosquitto(work, users=users, acl=(ROOT / "configs/mosquitto-nodes.acl").read_text())
    broker.start()
    sim = subprocess.Popen(  # noqa: ASYNC220 - starts once, before the loop does any work
        [
            sys.executable,
            "-m",
            "simulators.nodes",
            "--port",
            str(broker.port),
            "--site",
            "bench",
            "--partitions",
            str(args.partitions),
            "--gpu-hosts",
            str(args.gpu_hosts),
            "--miners",
            str(args.miners),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(work / "simulator.log").open("wb"),
    )
    server = PriceServer([30.0], interval_s=3600)
    try:
        async with server:
            config = parse_config(
                {
                    "site": {"id": "bench", "interconnect_limit_kw": 1e6},
                    "control": {
                        "interval_s": 1.0,
                        "poll_interval_s": 0.2,
                        "poll_jitter_s": 0.0,
                        "verify_after_s": 30,
                        "min_on_s": 0,
                        "min_off_s": 0,
                        "hysteresis_usd_per_mwh": 2,
                        "max_concurrency": 1000,
                    },
                    "metrics": {"enabled": False},
                    "prices": {
                        "realtime": {
                            "type": "http_json",
                            "url": f"{server.url}/price",
                            "value_path": "data.0.price",
                            "time_path": "data.0.time",
                            "poll_interval_s": 0.1,
                            "timeout_s": 1,
                        },
                        "max_age_s": 60,
                    },
                    "remote_nodes": {
                        "broker": {
                            "host": broker.host,
                            "port": broker.port,
                            "username": "controller",
                            "password": "controller-secret",
                        },
                        "nodes": [{"id": n, "max_w": 2e6, "timeout_s": 30} for n in ids],
                        "ack_timeout_s": 10,
                    },
                }
            )
            agent = build_agent(config)
            fleet = next(f for f in agent.fleets if isinstance(f, RemoteNodeFleet))
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            t_start = time.monotonic()
            await until(lambda: not fleet.faults() and agent.state.cycles > 0, 120, "all nodes")
            figure("all_nodes_heard_s", time.monotonic() - t_start, "s", nodes=len(ids))
            cycles0, cpu0 = agent.state.cycles, cpu_s()
            parts = [fleet.nodes[n] for n in ids if n.startswith("part-")]

            def acked() -> bool:
                return all(
                    n.envelope_w is not None
                    and n.views is not None
                    and n.envelope_w <= n.views.floor_w + 1
                    for n in parts
                )

            def confirmed() -> bool:
                return acked() and all(
                    n.pending is None
                    and n.views is not None
                    and n.views.measured_w <= (n.envelope_w or 0) * 1.02
                    for n in parts
                )

            sent_before = fleet.commands_sent
            plan = agent.state.plan
            figure(
                "commands_before_spike",
                sent_before,
                "commands",
                plan=None if plan is None else plan.summary[:160],
            )
            server.prices[0] = 400.0
            t0 = time.monotonic()
            await until(acked, 60, "every partition acked")
            t_ack = time.monotonic() - t0
            await until(confirmed, 60, "every partition's telemetry confirming")
            t_conf = time.monotonic() - t0
            await asyncio.sleep(3)  # a few steady cycles for the CPU figure
            cycles = agent.state.cycles - cycles0
            cpu = cpu_s() - cpu0
            stop.set()
            await asyncio.wait_for(task, 15)
        miners = args.miners
        figure("spike_to_all_acked_s", t_ack, "s", nodes=len(parts), miners=miners)
        figure("spike_to_all_confirmed_s", t_conf, "s", nodes=len(parts), target_s=5)
        figure(
            "controller_cpu_per_cycle_s",
            cpu / max(cycles, 1),
            "s",
            cycles=cycles,
            note="process CPU (loop, bus, HTTP price) / control cycles over the run",
        )
        figure("controller_rss_mb", rss_mb(), "MB", target_mb=500)
        figure("commands_sent", fleet.commands_sent, "commands")
        direct(args.direct, miners)
    finally:
        sim.terminate()
        sim.wait(10)
        broker.stop()


def direct(n: int, site_miners: int) -> None:
    """The same spike with N miners polled directly (bench/agent_spike.py), side by side."""
    if n <= 0:
        return
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agent_spike.py"), "--miners", str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    wanted = {"agent_poll_s", "spike_to_all_confirmed_asleep_s", "agent_peak_rss_mb"}
    for line in done.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("figure") in wanted:
            figure(f"direct_{row['figure']}", float(row["value"]), row.get("unit", ""), miners=n)
            if row["figure"] == "agent_poll_s":
                figure(
                    "direct_poll_extrapolated_s",
                    float(row["value"]) * site_miners / n,
                    "s",
                    miners=site_miners,
                    note=f"linear from {n} measured; one poll is the least a shed needs",
                )
    if done.returncode != 0:
        figure("direct_failed", done.returncode, "rc", stderr=done.stderr[-300:])


def main() -> None:
    p = argparse.ArgumentParser(description="node agents at scale")
    p.add_argument("--partitions", type=int, default=200)
    p.add_argument("--gpu-hosts", type=int, default=64)
    p.add_argument("--miners", type=int, default=100_000)
    p.add_argument("--direct", type=int, default=1000, help="miners polled directly (0: skip)")
    args = p.parse_args()
    os.nice(0)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
