"""Benchmark: the 2023 backtest on every hub of the ERCOT file, both reference sites.

Issue 13 asks the policy to finish ahead of ``strike+4cp`` on every hub in the 2023 file. For
each hub column of ``rtm_hub_prices_15min_2023.csv`` (the day-ahead file's column of the same
name, the system load for 4CP), each site (``configs/reference-site.yaml`` in blocks of 50,
``configs/hybrid-site.yaml`` in blocks of 5, as in the README's tables) and each hashprice
(``--hashprice``, default 55 and 35), one run of the same backtest ``site-agent backtest`` runs
(switching costs on, the day-ahead plan on, jobs seed 1). One JSON line per run:

``{"figure": "hub_run", "hub", "site", "hashprice", "policy", "strike_4cp", "strike",
"oracle", "always_on", "flex_capture", "strike_4cp_flex", "ahead_usd", "ahead", "seconds"}``

then one ``hubs_ahead`` line: in how many runs the policy's profit beat ``strike+4cp``'s.

Run: ``.venv/bin/python bench/backtest_hubs.py [--hub HB_WEST ...] [--site reference|hybrid]
[--hashprice 55 35]``. About 40 s per run on the 2-core machine (28 runs: about 20 min).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backtest.runner import BacktestArgs, run_backtest  # noqa: E402

SITES = {"reference": ("reference-site.yaml", 50), "hybrid": ("hybrid-site.yaml", 5)}


def hub_columns(path: Path) -> list[str]:
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    return [c for c in header[1:] if c.startswith("HB_")]


def flex(policy: float, oracle: float, always_on: float) -> float | None:
    room = oracle - always_on
    return None if room <= 0 else (policy - always_on) / room


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("SITE_AGENT_SHARED_DATA") or ROOT.parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--hub", action="append", help="hub column (default: every HB_ column)")
    parser.add_argument("--site", action="append", choices=sorted(SITES))
    parser.add_argument("--hashprice", type=float, nargs="+", default=[55.0, 35.0])
    ns = parser.parse_args()
    ercot = ns.data / "ercot"
    prices = ercot / "rtm_hub_prices_15min_2023.csv"
    if not prices.is_file():
        print(f"bench: real data file {prices} is missing", file=sys.stderr)
        return 2
    hubs = ns.hub or hub_columns(prices)
    ahead = runs = 0
    for hub in hubs:
        for site in ns.site or list(SITES):
            config, block_size = SITES[site]
            for hashprice in ns.hashprice:
                args = BacktestArgs(
                    config_path=ROOT / "configs" / config,
                    prices=prices,
                    column=hub,
                    day_ahead=ercot / "dam_prices_hourly_2022_2024.csv",
                    system_load=ercot / "generation_by_fuel_15min_2023.csv",
                    hashprice=hashprice,
                    block_size=block_size,
                    jobs_seed=1,
                )
                t0 = time.perf_counter()
                res = run_backtest(args)
                p = {name: led.profit_usd for name, led in res.ledgers.items()}
                margin = p["policy"] - p["strike+4cp"]
                runs += 1
                ahead += margin > 0
                strike_flex = flex(p["strike+4cp"], p["oracle"], p["always_on"])
                print(
                    json.dumps(
                        {
                            "figure": "hub_run",
                            "hub": hub,
                            "site": site,
                            "hashprice": hashprice,
                            "policy": round(p["policy"]),
                            "strike_4cp": round(p["strike+4cp"]),
                            "strike": round(p["strike"]),
                            "oracle": round(p["oracle"]),
                            "always_on": round(p["always_on"]),
                            "flex_capture": None
                            if res.flex_capture is None
                            else round(res.flex_capture, 4),
                            "strike_4cp_flex": None
                            if strike_flex is None
                            else round(strike_flex, 4),
                            "ahead_usd": round(margin),
                            "ahead": margin > 0,
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    ),
                    flush=True,
                )
    print(json.dumps({"figure": "hubs_ahead", "value": ahead, "unit": "runs", "n": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
