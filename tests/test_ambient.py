"""Ambient temperature sources and the load model the meter watch builds from them.

An HTTP JSON weather feed (the real HTTP price server's generic number endpoint stands in for
one), the meter's SunSpec model 307, or a constant: implausible, non-finite or stale values are
never used; the cooling model then plans at the configured (hot-day) constant.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.control.config import AgentConfig, parse_config
from agent.runtime.meter import MeterWatch
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource
from simulators.meter import AmbientCurve
from simulators.price_server import PriceServer


class Mono:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def site(**extra: Any) -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "amb", "interconnect_limit_kw": 100},
            "prices": {"realtime": {"type": "constant", "value": 10}},
            "cooling": {"base_frac": 0.04, "per_degree_frac": 0.004, "reference_c": 25},
            **extra,
        }
    )


async def test_weather_feed_drives_the_cooling_model_and_bad_values_are_ignored() -> None:
    async with PriceServer([20.0]) as server:
        server.numbers["ambient"] = 38.5
        feed = {
            "type": "http_json",
            "url": f"{server.url}/ambient",
            "value_path": "data.0.value",
            "time_path": "data.0.time",
            "unit": "raw",
            "timeout_s": 2,
        }
        config = site(ambient={"source": "http_json", "constant_c": 40, "feed": feed})
        assert config.ambient.feed is not None
        source = HttpJsonSource(HttpJsonSettings.model_validate(feed), name="ambient")
        mono = Mono()
        watch = MeterWatch(config, None, ambient_source=source, monotonic=mono)
        try:
            assert watch.current_ambient_c(mono()) == 40.0  # nothing read yet: the hot-day figure
            await watch.poll_ambient()
            assert watch.current_ambient_c(mono()) == 38.5
            model, site_w = watch.load_model(100_000.0, mono())
            assert model.cooling_frac == pytest.approx(0.04 + 0.004 * 13.5)
            assert site_w == pytest.approx(100_000.0 * (1 + model.cooling_frac))
            assert model.source == "devices"

            server.numbers["ambient"] = 150.0  # a feed in Fahrenheit, or garbage
            await watch.poll_ambient()
            assert watch.current_ambient_c(mono()) == 38.5
            assert watch.health["ambient"].last_error == "implausible ambient 150.0"

            server.fault = "nan"
            await watch.poll_ambient()
            assert watch.current_ambient_c(mono()) == 38.5
            assert "ambient" in str(watch.health["ambient"].last_error)

            mono.now += 1801  # older than ambient.max_age_s: back to the constant
            assert watch.current_ambient_c(mono()) == 40.0
        finally:
            await source.aclose()


def test_constant_ambient() -> None:
    config = site(ambient={"source": "constant", "constant_c": 30})
    watch = MeterWatch(config, None, monotonic=Mono())
    model, _ = watch.load_model(None, 0.0)
    assert model.ambient_c == 30.0
    assert model.cooling_frac == pytest.approx(0.06)


def test_the_simulated_day_peaks_mid_afternoon() -> None:
    curve = AmbientCurve(mean_c=30, swing_c=8, peak_hour=15.5, utc_offset_h=-6)
    # 2026-07-01 21:30 UTC is 15:30 in US Central (standard time offset -6 here).
    peak_epoch = 1782941400.0
    assert curve.at(peak_epoch) == pytest.approx(38.0)
    assert curve.at(peak_epoch - 12 * 3600) == pytest.approx(22.0)
    hourly = [curve.at(peak_epoch - 15.5 * 3600 + h * 3600) for h in range(24)]
    assert max(hourly) == hourly[15] or max(hourly) == hourly[16]
