"""Benchmark: microseconds per ``decide()`` call for sites of 50, 150, 500 and 3,000 views.

The backtest calls ``decide()`` about 35,040 times for a year of 15-minute intervals, so one
call must stay well under a millisecond for the reference site (about 150 views: miner blocks
plus 32 GPU nodes of 8 GPUs with jobs). Each figure is one JSON line:

    {"figure": "decide_us", "views": 150, "miners": 118, "gpu_nodes": 32, "us_per_call": ...}

Prices walk through a day of cheap, mid and scarce intervals (twice) and every interval's
snapshot carries the state the previous plan left, as in the backtest; the snapshots are built
first and only the ``decide()`` calls are timed: wall time (best of five rounds, and the
median) and this process's CPU time (best of five), which a busy shared machine disturbs less.
Run: ``.venv/bin/python bench/policy_decide.py``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.control.config import (
    AgentConfig,
    CircuitConfig,
    ConstantPriceConfig,
    PricesConfig,
    SiteConfig,
)
from agent.control.domain import (
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    Plan,
    PriceView,
    Snapshot,
)
from agent.control.policy import decide
from drivers.jobs.base import JobClass, JobState

T0 = datetime(2023, 8, 1, tzinfo=UTC)
MODELS = {
    "S19jPro": (
        OperatingPoint("sleep", 30.0),
        OperatingPoint("eco", 2400.0, 84.0),
        OperatingPoint("stock", 3068.0, 104.0),
    ),
    "S21": (
        OperatingPoint("sleep", 25.0),
        OperatingPoint("eco", 2600.0, 150.0),
        OperatingPoint("stock", 3500.0, 200.0),
        OperatingPoint("turbo", 4200.0, 225.0),
    ),
}
PRICES = (25.0, 60.0, 95.0, 140.0, 400.0, 2500.0, 6000.0)


def site(views: int) -> tuple[AgentConfig, list[Snapshot]]:
    nodes = min(32, views // 4)
    blocks = views - nodes
    miners_total = 3000
    per_block = max(1, miners_total // max(blocks, 1))
    miners = []
    for i in range(blocks):
        model = "S21" if i % 3 else "S19jPro"
        pts = MODELS[model]
        miners.append(
            MinerView(
                device_id=f"m{i:05d}",
                model=model,
                points=pts,
                nameplate_w=pts[-1].power_w,
                commanded=pts[-1].name if i % 4 else "sleep",
                commanded_since=T0 - timedelta(hours=1),
                count=per_block,
                circuit=f"feeder{i % 4}",
            )
        )
    gpu_nodes = []
    classes = (JobClass.SLA, JobClass.PREEMPTIBLE, JobClass.FILLER)
    rates = {JobClass.SLA: 2.5, JobClass.PREEMPTIBLE: 2.0, JobClass.FILLER: 0.6}
    for i in range(nodes):
        jobs = tuple(
            JobView(
                job_id=f"j{i}-{k}",
                job_class=classes[(i + k) % 3],
                state=JobState.RUNNING if (i + k) % 5 else JobState.SUSPENDED,
                gpus=4,
                node_id=f"g{i:03d}",
                usd_per_gpu_hour=rates[classes[(i + k) % 3]],
                penalty_usd=500.0 if classes[(i + k) % 3] is JobClass.SLA else 0.0,
                commanded_since=T0 - timedelta(hours=2),
                last_checkpoint_at=T0 - timedelta(minutes=10 + i),
            )
            for k in range(2)
        )
        gpu_nodes.append(
            GpuNodeView(
                device_id=f"g{i:03d}",
                gpu_count=8,
                min_cap_w=200.0,
                max_cap_w=700.0,
                idle_w=70.0,
                host_overhead_w=1500.0,
                cap_w=700.0,
                jobs=jobs,
                circuit="gpu-hall",
            )
        )
    config = AgentConfig(
        site=SiteConfig(
            id="bench",
            interconnect_limit_kw=20_000,
            circuits=[
                *(CircuitConfig(id=f"feeder{k}", limit_kw=3_000, parent="main") for k in range(4)),
                CircuitConfig(id="gpu-hall", limit_kw=2_000, parent="main"),
                CircuitConfig(id="main", limit_kw=19_000),
            ],
        ),
        prices=PricesConfig(realtime=ConstantPriceConfig(type="constant", value=50.0)),
    )
    snaps = [
        Snapshot(
            at=T0,
            price=PriceView(p, T0, 60.0),
            hashprice_usd_per_ph_day=50.0,
            miners=tuple(miners),
            gpu_nodes=tuple(gpu_nodes),
        )
        for p in PRICES
    ]
    return config, snaps


def follow(snap: Snapshot, plan: Plan, at: datetime) -> Snapshot:
    """The next interval's snapshot once the plan was applied (as the backtest does)."""
    miners = tuple(
        m
        if plan.miner_points[m.device_id] == m.commanded
        else replace(m, commanded=plan.miner_points[m.device_id], commanded_since=at)
        for m in snap.miners
    )
    nodes = []
    for n in snap.gpu_nodes:
        jobs = tuple(
            j
            if plan.job_states[j.job_id] is j.state
            else replace(j, state=plan.job_states[j.job_id], commanded_since=at)
            for j in n.jobs
        )
        nodes.append(replace(n, cap_w=plan.gpu_caps_w[n.device_id], jobs=jobs))
    return replace(snap, at=at, miners=miners, gpu_nodes=tuple(nodes))


def main() -> None:
    # A day of 15-minute intervals: cheap nights, a mid-price day and an evening scarcity spike.
    day = [PRICES[(k // 8) % len(PRICES)] for k in range(96)]
    for views in (50, 150, 500, 3000):
        config, snaps = site(views)
        snap = snaps[0]
        # Backtest-like: each interval sees the state the previous plan left behind.
        sequence: list[tuple[Snapshot, datetime]] = []
        for k, price in enumerate(day * 2):
            at = T0 + timedelta(minutes=15 * k)
            snap = replace(snap, at=at, price=PriceView(price, at, 60.0))
            sequence.append((snap, at))
            snap = follow(snap, decide(snap, config, at), at)
        # Best of five rounds: the machine is shared, and the minimum is the policy's own cost.
        rounds = []
        cpu_rounds = []
        for _ in range(5):
            start, cpu_start = time.perf_counter(), time.process_time()
            for snap, at in sequence:
                decide(snap, config, at)
            rounds.append((time.perf_counter() - start) / len(sequence) * 1e6)
            cpu_rounds.append((time.process_time() - cpu_start) / len(sequence) * 1e6)
        us = min(rounds)
        print(
            json.dumps(
                {
                    "figure": "decide_us",
                    "views": views,
                    "miners": len(snaps[0].miners),
                    "gpu_nodes": len(snaps[0].gpu_nodes),
                    "calls": len(sequence),
                    "us_per_call": round(us, 1),
                    "us_per_call_median": round(sorted(rounds)[2], 1),
                    "cpu_us_per_call": round(min(cpu_rounds), 1),
                }
            )
        )


if __name__ == "__main__":
    main()
