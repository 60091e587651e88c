"""Benchmark: poll and curtail N simulated LuxOS miners with our driver, against plain pyasic.

Starts ``python -m simulators.luxos --miners N`` as a separate process, then in this process:

1. identifies every miner (our ``discover``: pyasic ``get_miner`` under a bounded semaphore);
2. polls all N with ``read_fleet`` once to warm up, then a price "spike": commands all N asleep
   and polls until telemetry confirms every one sleeping; wakes them and waits until mining;
3. records this process's peak RSS before any baseline objects exist (the driver's footprint);
4. identifies the same miners again as plain pyasic objects (``get_miner``) and alternates,
   ``--rounds`` times, a full ``read_fleet`` poll with the baseline
   ``asyncio.gather(*(m.get_data() for m in miners))`` at pyasic's default settings.

Prints one JSON line per figure: ``{"figure", "value", "unit", "n", ...}``.
Run: ``.venv/bin/python bench/miners_poll.py [--miners 1000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.errors import DeviceError  # noqa: E402
from drivers.miners.base import MinerMode, MinerReading  # noqa: E402
from drivers.miners.pyasic_driver import (  # noqa: E402
    PyasicMiner,
    discover,
    read_fleet,
    sleep_fleet,
    wake_fleet,
)
from simulators.luxos import raise_open_file_limit  # noqa: E402


def emit(figure: str, value: float, unit: str, n: int, **extra: Any) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, "n": n, **extra}))
    sys.stdout.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def start_simulator(
    n: int, base: str, module: str = "simulators.luxos", *extra: str
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``python -m <module> --miners n --base base`` and wait for its ``ready`` line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--miners", str(n), "--base", base, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    addresses: list[str] = []
    for line in proc.stdout:
        row = json.loads(line)
        if row.get("event") == "ready":
            return proc, addresses
        addresses.append(row["address"])
    raise RuntimeError(f"{module} exited with {proc.wait()} before it was ready")


def count_ok(results: dict[str, MinerReading | DeviceError]) -> int:
    return sum(isinstance(r, MinerReading) for r in results.values())


async def until_all(
    miners: list[PyasicMiner], mode: MinerMode, deadline_s: float
) -> tuple[float, int]:
    """Poll until every miner reports ``mode``; returns (seconds, polls)."""
    t0 = time.perf_counter()
    polls = 0
    while time.perf_counter() - t0 < deadline_s:
        polls += 1
        results = await read_fleet(miners)
        if all(isinstance(r, MinerReading) and r.mode is mode for r in results.values()):
            return time.perf_counter() - t0, polls
    raise RuntimeError(f"not all miners reached {mode} within {deadline_s} s")


async def bench(n: int, rounds: int, concurrency: int, addresses: list[str]) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    t0 = time.perf_counter()
    found = await discover(addresses, semaphore, timeout_s=5.0)
    miners = [m for m in found.values() if isinstance(m, PyasicMiner)]
    emit("driver_discover_s", time.perf_counter() - t0, "s", n, found=len(miners))

    results = await read_fleet(miners)  # warm-up: profile ladders cached, connections primed
    emit("driver_warmup_ok", count_ok(results), "miners", n)

    # Price spike: command all asleep, then confirm by telemetry.
    t_spike = time.perf_counter()
    commanded = await sleep_fleet(miners)
    t_commanded = time.perf_counter() - t_spike
    failed = sum(r is not None for r in commanded.values())
    emit("spike_to_all_commanded_s", t_commanded, "s", n, failed=failed)
    _, polls = await until_all(miners, MinerMode.SLEEPING, 60.0)
    emit("spike_to_all_confirmed_asleep_s", time.perf_counter() - t_spike, "s", n, polls=polls)

    await wake_fleet(miners)
    await until_all(miners, MinerMode.MINING, 60.0)
    emit("driver_peak_rss_mb", peak_rss_mb(), "MB", n, note="before any baseline objects")

    # Baseline objects: plain pyasic, identified by get_miner (bounded: an unbounded
    # get_miner of 1,000 hosts times out on 2 cores; identification is not what we time).
    import pyasic

    async def ident(a: str) -> Any:
        async with semaphore:
            return await pyasic.get_miner(a)

    baseline = [m for m in await asyncio.gather(*(ident(a) for a in addresses)) if m]
    emit("baseline_identified", len(baseline), "miners", n)

    ours: list[float] = []
    theirs: list[float] = []
    for r in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        results = await read_fleet(miners)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ours.append(wall)
        emit("driver_poll_s", wall, "s", n, round=r, ok=count_ok(results), cpu_s=round(cpu, 3))

        c0, t0 = time.process_time(), time.perf_counter()
        data = await asyncio.gather(*(m.get_data() for m in baseline), return_exceptions=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        theirs.append(wall)
        ok = sum(not isinstance(d, BaseException) and d.wattage is not None for d in data)
        emit("baseline_poll_s", wall, "s", n, round=r, ok=ok, cpu_s=round(cpu, 3))

    emit("driver_poll_median_s", statistics.median(ours), "s", n, rounds=rounds)
    emit("baseline_poll_median_s", statistics.median(theirs), "s", n, rounds=rounds)
    emit("speedup_vs_baseline", statistics.median(theirs) / statistics.median(ours), "x", n)

    c0 = time.process_time()
    for _ in range(rounds):
        await read_fleet(miners)
    emit("driver_cpu_s_per_poll", (time.process_time() - c0) / rounds, "s", n, rounds=rounds)
    emit("process_peak_rss_mb", peak_rss_mb(), "MB", n, note="including baseline objects")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=200, help="fleet semaphore size")
    p.add_argument("--base", default="127.1.0.1")
    args = p.parse_args()

    raise_open_file_limit()  # 1,000 concurrent baseline connections need the fds
    proc, addresses = start_simulator(args.miners, args.base)
    try:
        asyncio.run(bench(args.miners, args.rounds, args.concurrency, addresses))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
