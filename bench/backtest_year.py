"""Benchmark: a full year of 15-minute intervals for the reference site, every strategy.

Prints one JSON line per figure (issue 13 target: the whole year in at most 15 s on the 2-core
dev machine). Needs the shared data folder (``--data``, else ``$SITE_AGENT_SHARED_DATA``, else
../shared/data); exits 2 with a message when it is missing.

    .venv/bin/python bench/backtest_year.py [--hashprice 55] [--block-size 50] [--config F]
        [--optimum]

The policy follows a day-ahead horizon plan (one MILP per day); its solve time per call is
printed (``planner_seconds_mean``, ``..._max``; the first call includes loading scipy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backtest.runner import DEFAULT_BLOCK_SIZE, BacktestArgs, run_backtest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hashprice", type=float, default=55.0)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    default_data = os.environ.get("SITE_AGENT_SHARED_DATA") or ROOT.parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "reference-site.yaml")
    parser.add_argument("--optimum", action="store_true", help="also the constrained optimum")
    ns = parser.parse_args()
    ercot = ns.data / "ercot"
    if not ercot.is_dir():
        print(f"bench: real data folder {ercot} is missing", file=sys.stderr)
        return 2
    args = BacktestArgs(
        config_path=ns.config,
        prices=ercot / "rtm_hub_prices_15min_2023.csv",
        column="HB_WEST",
        day_ahead=ercot / "dam_prices_hourly_2022_2024.csv",
        system_load=ercot / "generation_by_fuel_15min_2023.csv",
        hashprice=ns.hashprice,
        block_size=ns.block_size,
        optimum=ns.optimum,
    )
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = run_backtest(args)
    total_s = time.perf_counter() - t0
    # CPU time too: on a shared 2-core machine the wall time includes other processes' turns.
    cpu_s = time.process_time() - c0
    n = len(res.market)
    common = {"hashprice": ns.hashprice, "block_size": ns.block_size, "intervals": n}
    blocks = len(res.site.blocks)

    def line(figure: str, value: float, unit: str, **extra: object) -> None:
        print(
            json.dumps(
                {
                    "bench": "backtest_year",
                    "figure": figure,
                    "value": value,
                    "unit": unit,
                    **common,
                    **extra,
                }
            )
        )

    line("year_seconds", round(total_s, 3), "s", miner_blocks=blocks, target_s=15)
    line("year_cpu_seconds", round(cpu_s, 3), "s")
    line("intervals_per_s", round(n / total_s, 1), "1/s")
    for name, secs in res.seconds.items():
        line(f"{name}_seconds", round(secs, 3), "s")
    line("policy_intervals_per_s", round(n / res.seconds["policy"], 1), "1/s")
    line("capture", round(res.capture or float("nan"), 5), "ratio")
    line("flex_capture", round(res.flex_capture or float("nan"), 5), "ratio")
    for name, led in res.ledgers.items():
        line(f"{name}_profit_usd", round(led.profit_usd, 2), "USD")
    for label, stats in (("planner", res.planner), ("optimum_solver", res.optimum_stats)):
        if stats is not None:
            times_s = stats.seconds
            line(f"{label}_solves", len(times_s), "1", statuses=stats.statuses)
            if times_s:
                line(f"{label}_seconds_total", round(sum(times_s), 3), "s")
                line(f"{label}_seconds_mean", round(sum(times_s) / len(times_s), 5), "s")
                line(f"{label}_seconds_max", round(max(times_s), 5), "s")
                line(f"{label}_cpu_seconds_total", round(stats.cpu_s, 3), "s")
    if res.capture_optimum is not None:
        line("capture_optimum", round(res.capture_optimum, 5), "ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
