"""Benchmark: microseconds per ``decide()`` call for sites of 50, 150, 500 and 3,000 views.

The backtest calls ``decide()`` about 35,040 times for a year of 15-minute intervals, so one
call must stay well under a millisecond for the reference site (about 150 views: miner blocks
plus 32 GPU nodes of 8 GPUs with jobs). Each figure is one JSON line:

    {"figure": "decide_us", "views": 150, "miners": 118, "gpu_nodes": 32, "us_per_call": ...}

Prices walk through cheap, mid and scarce levels so every branch of the merit order runs;
the snapshots are built once, outside the timing. Run: ``.venv/bin/python bench/policy_decide.py``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import (
    AgentConfig,
    CircuitConfig,
    ConstantPriceConfig,
    PricesConfig,
    SiteConfig,
)
from agent.domain import (
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    PriceView,
    Snapshot,
)
from agent.policy import decide
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


def main() -> None:
    for views in (50, 150, 500, 3000):
        config, snaps = site(views)
        for s in snaps:  # warm the ladder caches, as the backtest's first interval does
            decide(s, config, T0)
        calls = max(70, 14_000 // views)
        # Best of five rounds: the machine is shared, and the minimum is the policy's own cost.
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(calls):
                decide(snaps[i % len(snaps)], config, T0)
            rounds.append((time.perf_counter() - start) / calls * 1e6)
        us = min(rounds)
        print(
            json.dumps(
                {
                    "figure": "decide_us",
                    "views": views,
                    "miners": len(snaps[0].miners),
                    "gpu_nodes": len(snaps[0].gpu_nodes),
                    "calls": calls,
                    "us_per_call": round(us, 1),
                    "us_per_call_median": round(sorted(rounds)[2], 1),
                }
            )
        )


if __name__ == "__main__":
    main()
