"""``site-agent backtest``: a price year through the live ``decide()``, scored in dollars.

Reads a site config, a real-time price CSV (one column), optionally day-ahead prices, system
load (for 4CP) and a hashprice series, replays every interval through the same
:func:`agent.control.policy.decide` that runs live (see :mod:`agent.backtest.engine` for the
rules), and scores it against the perfect-foresight oracle and the ``always_on``, ``strike`` and
``strike+4cp`` baselines. Prints a table; ``--json`` writes one document; ``--plot`` draws a week.

Only argparse loads until the command runs: the engine and matplotlib are imported inside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any


def _when(text: str) -> datetime:
    """A date (UTC midnight) or an ISO instant; naive instants are taken as UTC."""
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date like 2023-06-01, got {text!r}") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def parse_week(text: str) -> datetime:
    """``2023-W36`` (ISO week, from Monday 00:00 UTC) or a start date."""
    if "-W" in text:
        try:
            year, week = text.split("-W")
            return datetime.combine(
                date.fromisocalendar(int(year), int(week), 1), datetime.min.time(), UTC
            )
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an ISO week like 2023-W36, got {text!r}"
            ) from None
    return _when(text)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "backtest",
        help="replay a price year through the live policy; score against oracle and baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, type=Path, help="site YAML")
    p.add_argument("--prices", required=True, type=Path, help="real-time price CSV")
    p.add_argument("--column", required=True, help="settlement point column, e.g. HB_WEST")
    p.add_argument("--day-ahead", type=Path, help="day-ahead price CSV (same column)")
    p.add_argument("--system-load", type=Path, help="system load CSV (4CP): total_mwh column")
    p.add_argument(
        "--no-4cp",
        action="store_true",
        help="price no 4CP (without it, a system load file must cover the whole period)",
    )
    hp = p.add_mutually_exclusive_group()
    hp.add_argument("--hashprice", type=float, help="USD per PH/s per day (default: config)")
    hp.add_argument(
        "--hashprice-csv",
        type=Path,
        help="daily hashprice CSV: time or date first, then hashprice_usd_per_ph_day "
        "(or the second column), e.g. shared/data/btc/btc_daily_2021_2024.csv",
    )
    p.add_argument("--events", type=Path, help="demand-response events CSV (see the README)")
    p.add_argument("--jobs-seed", type=int, default=1, help="seed of the AI job trace")
    p.add_argument(
        "--block-size",
        type=int,
        help="identical miners simulated as one block (live runs per miner; default 50)",
    )
    p.add_argument("--start", type=_when, help="first interval (date or ISO instant, UTC)")
    p.add_argument("--end", type=_when, help="end (exclusive)")
    p.add_argument("--strike", type=float, help="strike price USD/MWh (default: fleet breakeven)")
    p.add_argument("--strike-n", type=int, default=1, help="intervals above strike to curtail")
    p.add_argument(
        "--wake-lost-s",
        type=float,
        help="seconds of hashing every miner model loses per wake, for the policy, the planner "
        "and the settlement alike (default: each model's miner_models.*.wake_lost_s, else "
        "control.miner_wake_lost_s, 0; 0: a wake loses no hashing)",
    )
    p.add_argument(
        "--no-planner",
        action="store_true",
        help="with --day-ahead, do not follow a day-ahead horizon plan (the rule alone)",
    )
    p.add_argument(
        "--optimum",
        action="store_true",
        help="also the constrained optimum: perfect foresight with switching costs and dwell, "
        "a MILP per day",
    )
    p.add_argument("--plot", type=parse_week, metavar="WEEK", help="ISO week (2023-W36) or date")
    p.add_argument("--plot-out", type=Path, help="PNG path (default: backtest-WEEK.png)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the JSON document here")
    p.set_defaults(func=cli)


def cli(ns: argparse.Namespace) -> int:
    from agent.backtest.engine import BacktestError
    from agent.backtest.runner import BacktestArgs, result_json, run_backtest, table
    from agent.control.config import ConfigError
    from drivers.errors import AgentError

    if (ns.block_size is not None and ns.block_size < 1) or ns.strike_n < 1:
        print("backtest: --block-size and --strike-n must be at least 1", file=sys.stderr)
        return 2
    args = BacktestArgs(
        config_path=ns.config,
        prices=ns.prices,
        column=ns.column,
        day_ahead=ns.day_ahead,
        system_load=ns.system_load,
        hashprice=ns.hashprice,
        hashprice_csv=ns.hashprice_csv,
        jobs_seed=ns.jobs_seed,
        start=ns.start,
        end=ns.end,
        strike_usd_per_mwh=ns.strike,
        strike_n=ns.strike_n,
        events=ns.events,
        no_4cp=ns.no_4cp,
        planner=not ns.no_planner,
        optimum=ns.optimum,
        **({} if ns.block_size is None else {"block_size": ns.block_size}),
        wake_lost_s=ns.wake_lost_s,
    )
    try:
        res = run_backtest(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except AgentError as exc:
        print(f"backtest: {exc}", file=sys.stderr)
        return 1
    print(table(res))
    if ns.json is not None:
        ns.json.write_text(json.dumps(result_json(res), indent=2) + "\n")
        print(f"wrote {ns.json}")
    if ns.plot is not None:
        from agent.backtest.plot import plot_week

        out = ns.plot_out or Path(f"backtest-{ns.plot:%Y-%m-%d}.png")
        try:
            plot_week(res, ns.plot, ns.plot + timedelta(days=7), out)
        except BacktestError as exc:
            print(f"backtest: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    return 0
