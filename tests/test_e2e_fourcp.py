"""Live 4CP accounting on the meter, end to end: LuxOS simulators, the pymodbus meter simulator,
the real agent, a replayed June afternoon flagged as a 4CP risk, and a restart.

The market clock is a price replay of 2023-06-27 from 21:44:25 UTC (16:44 Central, inside the
4CP window) and the system load climbs, so every interval is a 4CP risk. The 4CP rate is low
enough that the miners keep running (the adder is 30 USD/MWh), so the site draws ~20 kW and the
meter reads 6 % above the device sum (cooling at 30 °C). The interval 21:45–22:00 starts after
the agent trusts the meter; its booked demand must be the meter's, not the device sum, and it
must come back from the journal after a restart.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.control.settlement import FourCpInterval, fourcp_charge_usd
from agent.journal.store import Store
from tests.test_e2e_meter import metered_site, metered_w, scrape
from tests.test_e2e_miners import true_site_w, until

RATE = 0.03  # USD/kW-year: the 4CP adder at risk 1 is 30 USD/MWh, below the miners' break-even
START = datetime(2023, 6, 27, 21, 44, 25, tzinfo=UTC)
BOUNDARY = datetime(2023, 6, 27, 21, 45, tzinfo=UTC)


def market_files(tmp_path: Path) -> dict[str, Any]:
    """A replayed price (20 USD/MWh) and a climbing system load around June 27th, 2023."""
    prices = tmp_path / "prices.csv"
    load = tmp_path / "system_load.csv"
    t0 = datetime(2023, 6, 27, 20, 0, tzinfo=UTC)
    steps = [t0 + timedelta(minutes=15 * k) for k in range(16)]
    prices.write_text(
        "interval_start_utc,HB_WEST\n" + "".join(f"{t:%Y-%m-%dT%H:%M:%SZ},20.0\n" for t in steps)
    )
    load.write_text(
        "interval_end_utc,total_mwh\n"
        + "".join(f"{t:%Y-%m-%dT%H:%M:%SZ},{18_000 + 100 * k}\n" for k, t in enumerate(steps))
    )
    return {
        "prices": {
            "realtime": {
                "type": "csv_replay",
                "path": str(prices),
                "column": "HB_WEST",
                "start": START.isoformat(),
            },
            "max_age_s": 3600,
        },
        "grid": {
            "fourcp": {
                "enabled": True,
                "rate_usd_per_kw_year": RATE,
                "risk_threshold": 0.5,
                "system_load_csv": str(load),
            }
        },
    }


async def test_live_4cp_books_the_metered_demand_and_a_restart_keeps_it(tmp_path: Path) -> None:
    extra = market_files(tmp_path)
    async with metered_site(tmp_path, **extra) as (agent, fleet, meter, _store):
        await until(
            lambda: agent.state.meter is not None and agent.state.meter.trusted,
            30,
            "meter trusted",
        )
        assert agent.coordinator.market_now() < BOUNDARY, "meter trusted too late for the test"
        snap = agent.state.snapshot
        assert snap is not None
        assert snap.fourcp_risk >= 0.5, snap.fourcp_reason
        await until(lambda: agent.coordinator.market_now() >= BOUNDARY, 40, "21:45 reached")
        # Sample what the utility's meter and the devices draw through the interval's first
        # seconds, as the agent books them.
        meter_w: list[float] = []
        device_w: list[float] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + 6
        while loop.time() < end:
            meter_w.append(metered_w(meter))
            device_w.append(true_site_w(fleet))
            await asyncio.sleep(0.05)
        booked = agent.fourcp_book.intervals[BOUNDARY]
        assert booked.source == "meter", booked
        assert booked.seconds >= 4, booked
        meter_avg = sum(meter_w) / len(meter_w)
        device_avg = sum(device_w) / len(device_w)
        assert meter_avg > 1.04 * device_avg  # the cooling the devices do not report
        # The booked demand is the meter's, not the device sum.
        assert booked.demand_w == pytest.approx(meter_avg, rel=0.02)
        assert booked.demand_w > 1.03 * device_avg
        (june,) = agent.fourcp_book.figures.months  # the same instant as ``booked``
        assert june.month == "2023-06"
        assert june.peak.demand_w >= booked.demand_w
        assert agent.state.fourcp is not None  # published at the end of every cycle
        m = await scrape(agent)
        labels = f'month="2023-06",source="{june.peak.source}"'
        peak = m[f"site_agent_fourcp_peak_demand_watts{{{labels}}}"]
        assert peak == pytest.approx(june.peak.demand_w, rel=0.05)
        assert m['site_agent_fourcp_season_charge_usd{season="2023"}'] == pytest.approx(
            fourcp_charge_usd(RATE, peak), rel=0.05
        )
    before = agent.fourcp_book.intervals[BOUNDARY]
    journaled = [iv for iv in await _read_journal(tmp_path) if iv.start == BOUNDARY]
    assert journaled == [before]  # every sample was journaled as it was booked

    # A restart: the market replays from 16:44 again, so the 21:45 interval is not touched
    # before the agent shows it, as journaled.
    async with metered_site(tmp_path, **extra) as (agent2, _fleet, _meter, _store):
        await until(lambda: BOUNDARY in agent2.fourcp_book.intervals, 20, "4CP account restored")
        assert agent2.coordinator.market_now() < BOUNDARY
        assert agent2.fourcp_book.intervals[BOUNDARY] == before
        figures = agent2.state.fourcp
        assert figures is not None
        (june,) = figures.months
        assert june.peak.demand_w >= before.demand_w
        assert dict(figures.seasons)["2023"] == pytest.approx(
            fourcp_charge_usd(RATE, june.peak.demand_w)
        )
        await until(lambda: agent2.state.cycles > 0, 20, "a control cycle")
        m = await scrape(agent2)
        assert m['site_agent_fourcp_intervals{month="2023-06"}'] >= 2


async def _read_journal(tmp_path: Path) -> list[FourCpInterval]:
    async with Store.open(tmp_path / "journal.db") as store:
        return await store.fourcp_intervals()
