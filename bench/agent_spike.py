"""Benchmark: the whole agent (coordinator, policy, actuator) against N simulated miners.

The miners run in a separate process (``python -m simulators.luxos``); this process runs the
real :class:`agent.runtime.loop.Agent` with the pyasic driver and the HTTP price server. Figures:

* ``agent_poll_s``: the coordinator's full fleet poll (median over the steady state);
* ``agent_cpu_s_per_cycle``: this process's CPU seconds per control cycle in steady state
  (polls included);
* ``spike_to_all_commanded_s`` / ``spike_to_all_confirmed_asleep_s``: from the price step
  (500 $/MWh, above every miner's breakeven) to every miner commanded asleep, and to every miner
  asleep in the simulators' true state;
* ``agent_peak_rss_mb``: this process's peak memory, measured before the baseline runs;
* ``baseline_pyasic_poll_s``: plain pyasic, ``asyncio.gather(get_data())`` over the same
  miners at default settings, in the same run after the agent stopped.

Prints one JSON line per figure. Run: ``.venv/bin/python bench/agent_spike.py [--miners 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.control.config import parse_config  # noqa: E402
from agent.runtime.loop import Agent  # noqa: E402
from agent.runtime.state import AgentState  # noqa: E402
from agent.runtime.wiring import build_components  # noqa: E402
from simulators.luxos import control_request, raise_open_file_limit  # noqa: E402
from simulators.luxos_model import S19J_PRO  # noqa: E402
from simulators.luxos_model import S21 as S21_MODEL  # noqa: E402
from simulators.price_server import PriceServer  # noqa: E402

MODELS = {"s19jpro": S19J_PRO.site_config(), "s21": S21_MODEL.site_config()}


def emit(figure: str, value: float, unit: str, n: int, **extra: Any) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, "n": n, **extra}))
    sys.stdout.flush()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_simulator(
    n: int, base: str, control_port: int
) -> tuple[subprocess.Popen[str], list[Any]]:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "simulators.luxos", "--miners", str(n), "--base", base,
            "--control-port", str(control_port), "--wake-ramp-s", "2", "--sleep-ramp-s", "0.3",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    rows: list[Any] = []
    for line in proc.stdout:
        row = json.loads(line)
        if row.get("event") == "ready":
            return proc, rows
        rows.append(row)
    raise RuntimeError(f"simulator exited with {proc.wait()} before it was ready")


async def all_asleep(control_port: int) -> int:
    reply = await control_request(control_port, {"op": "states"})
    return sum(1 for s in reply["states"] if s["sleeping"] and s["power_w"] < 100)


async def bench(n: int, base: str) -> None:
    raise_open_file_limit()
    control_port = free_port()
    proc, rows = start_simulator(n, base, control_port)
    try:
        async with PriceServer([20.0], interval_s=3600) as prices:
            config = parse_config(
                {
                    "site": {"id": "bench", "interconnect_limit_kw": n * 5},
                    "control": {
                        "interval_s": 2,
                        "poll_interval_s": 2,
                        "poll_jitter_s": 0.1,
                        "device_timeout_s": 5,
                        "verify_after_s": 20,
                        "max_concurrency": 200,
                        "min_on_s": 0,
                        "min_off_s": 600,
                    },
                    "miner_models": MODELS,
                    "miners": [
                        {"id": f"m{i:04d}", "address": r["address"], "model": r["model"]}
                        for i, r in enumerate(rows)
                    ],
                    "prices": {
                        "realtime": {
                            "type": "http_json",
                            "url": f"{prices.url}/price",
                            "value_path": "data.0.price",
                            "time_path": "data.0.time",
                            "poll_interval_s": 1,
                        }
                    },
                }
            )
            state = AgentState(site_id=config.site.id, started_at=datetime.now(UTC))
            agent = Agent(config, build_components(config, state), state=state)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            # Steady state: wait for the first cycles, then measure CPU over ~10 s.
            while agent.state.cycles < 3:  # noqa: ASYNC110 (polling a counter is the point)
                await asyncio.sleep(0.2)
            polls: list[float] = []
            c0, cycles0, t0 = cpu_s(), agent.state.cycles, time.perf_counter()
            while time.perf_counter() - t0 < 10:
                await asyncio.sleep(0.5)
                polls.append(agent.state.sources["miners"].last_duration_s)
            cycles = agent.state.cycles - cycles0
            emit("agent_poll_s", statistics.median(polls), "s", n)
            emit("agent_cpu_s_per_cycle", (cpu_s() - c0) / max(cycles, 1), "s", n, cycles=cycles)
            # The spike.
            spike = time.perf_counter()
            prices.prices[0] = 500.0
            commanded = confirmed = None
            while time.perf_counter() - spike < 60:
                if commanded is None and agent.state.actions[("sleep", "ok")] >= n:
                    commanded = time.perf_counter() - spike
                if commanded is not None and await all_asleep(control_port) >= n:
                    confirmed = time.perf_counter() - spike
                    break
                await asyncio.sleep(0.1)
            emit("spike_to_all_commanded_s", commanded or float("nan"), "s", n)
            emit("spike_to_all_confirmed_asleep_s", confirmed or float("nan"), "s", n)
            emit(
                "agent_peak_rss_mb",
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "MB",
                n,
            )
            stop.set()
            await task
        await baseline(n, [r["address"] for r in rows])
    finally:
        proc.terminate()
        proc.wait()


async def baseline(n: int, addresses: list[str]) -> None:
    """Plain pyasic at default settings: get_miner (bounded), then gather(get_data) twice."""
    from pyasic import get_miner

    # Identification itself is bounded: pyasic's unbounded get_miner over 1,000 addresses times
    # out on a 2-core machine and finds none (miner-protocols.md). The poll is left unbounded.
    sem = asyncio.Semaphore(200)

    async def identify(address: str) -> Any:
        async with sem:
            return await get_miner(address)

    found = await asyncio.gather(*(identify(a) for a in addresses))
    miners = [m for m in found if m is not None]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        data = await asyncio.gather(*(m.get_data() for m in miners), return_exceptions=True)
        times.append(time.perf_counter() - t0)
        ok = sum(1 for d in data if not isinstance(d, BaseException))
    emit("baseline_pyasic_poll_s", statistics.median(times), "s", n, identified=len(miners), ok=ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miners", type=int, default=1000)
    parser.add_argument("--base", default="127.60.0.1")
    args = parser.parse_args()
    asyncio.run(bench(args.miners, args.base))


if __name__ == "__main__":
    main()
