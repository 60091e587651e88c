"""The optional live signals reach the snapshot: hashprice feed, day-ahead forecast, 4CP risk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.control.config import parse_config
from agent.control.policy import decide
from drivers.prices.csv_replay import load_day_ahead_csv
from simulators.price_server import PriceServer
from tests.site_agent import build_agent

BASE = {
    "site": {"id": "sig", "interconnect_limit_kw": 10_000},
    "miner_models": {
        "S19": {"profiles": [{"name": "default", "power_w": 3068, "hashrate_ths": 104}]}
    },
    "miners": [{"id": "m", "address": "10.250.0.1", "model": "S19", "count": 100}],
    "metrics": {"port": 0},
}


async def test_hashprice_feed_is_used_and_a_bad_or_failing_feed_keeps_the_last_good() -> None:
    async with PriceServer([30.0]) as server:
        server.numbers["hashprice"] = 47.5
        feed = {
            "type": "http_json",
            "url": f"{server.url}/hashprice",
            "value_path": "data.0.value",
            "time_path": "data.0.time",
            "unit": "USD/PH/day",
        }
        config = parse_config(
            {
                **BASE,
                "prices": {"realtime": {"type": "constant", "value": 30}},
                "economics": {"hashprice": {"usd_per_ph_day": 55, "feed": feed}},
            }
        )
        agent = build_agent(config)
        coordinator = agent.coordinator
        assert coordinator.snapshot().hashprice_usd_per_ph_day == 55  # the constant until a read
        await coordinator.poll_hashprice()
        assert coordinator.snapshot().hashprice_usd_per_ph_day == 47.5
        for fault in ("nan", "down", "garbage"):
            server.fault = fault
            await coordinator.poll_hashprice()
            assert coordinator.snapshot().hashprice_usd_per_ph_day == 47.5, fault
        health = coordinator.health["hashprice:hashprice"]
        assert health.failures == 3
        assert health.last_error is not None
        server.fault = "ok"
        server.numbers["hashprice"] = 40.0
        await coordinator.poll_hashprice()
        assert coordinator.snapshot().hashprice_usd_per_ph_day == 40.0
        aclose = getattr(agent.components.hashprice_source, "aclose", None)
        assert aclose is not None
        await aclose()


@pytest.mark.shared_data
async def test_day_ahead_and_4cp_risk_follow_the_replayed_market_clock(shared_data: Path) -> None:
    ercot = shared_data / "ercot"
    # 2023-06-27, interval ending 17:00 Central (22:00 UTC): June's system peak by the proxy.
    start = datetime(2023, 6, 27, 21, 46, tzinfo=UTC)
    config = parse_config(
        {
            **BASE,
            "prices": {
                "realtime": {
                    "type": "csv_replay",
                    "path": str(ercot / "rtm_hub_prices_15min_2023.csv"),
                    "column": "HB_WEST",
                    "start": start.isoformat(),
                },
                "day_ahead": {
                    "type": "csv_replay",
                    "path": str(ercot / "dam_prices_hourly_2022_2024.csv"),
                    "column": "HB_WEST",
                },
            },
            "grid": {
                "fourcp": {
                    "enabled": True,
                    "rate_usd_per_kw_year": 60,
                    "risk_threshold": 0.5,
                    "system_load_csv": str(ercot / "generation_by_fuel_15min_2023.csv"),
                }
            },
        }
    )
    agent = build_agent(config)
    await agent.coordinator.poll_price()
    snap = agent.coordinator.snapshot()
    dam = load_day_ahead_csv(ercot / "dam_prices_hourly_2022_2024.csv", "HB_WEST")
    expected = dam.value_for_interval_containing(start.timestamp())
    assert snap.day_ahead_usd_per_mwh == expected
    assert snap.fourcp_risk >= 0.5, snap.fourcp_reason
    assert snap.fourcp_reason
    plan = decide(snap, config, snap.at)
    assert "4cp" in plan.binding or "4CP" in plan.summary
    # A winter night is no 4CP risk.
    agent.coordinator.price_source = None
    assert agent.coordinator.fourcp(datetime(2023, 1, 10, 8, 0, tzinfo=UTC))[0] == 0.0
