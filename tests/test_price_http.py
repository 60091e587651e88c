"""HTTP JSON price poller and hashprice against the real HTTP price server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from drivers.errors import BadInput, SourceError
from drivers.prices.base import PriceSource
from drivers.prices.hashprice import (
    ComputedHashprice,
    ConstantHashprice,
    HashpriceSettings,
    hashprice_usd_per_ph_day,
)
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource, resolve_path
from simulators.price_server import PriceServer
from tests.servers import free_port


@pytest.fixture
async def server() -> AsyncIterator[PriceServer]:
    async with PriceServer([41.5, -3.0, 5333.97], interval_s=900, speed=1) as srv:
        yield srv


def settings(server: PriceServer, **kw: object) -> HttpJsonSettings:
    base: dict[str, object] = {
        "url": f"{server.url}/price",
        "value_path": "data.0.price",
        "time_path": "data.0.time",
        "timeout_s": 1.0,
    }
    base.update(kw)
    return HttpJsonSettings.model_validate(base)


async def test_reads_price_with_timestamp_and_age(server: PriceServer) -> None:
    async with HttpJsonSource(settings(server), name="rt") as source:
        assert isinstance(source, PriceSource)
        before = datetime.now(UTC)
        reading = await source.latest()
        assert reading.value == 41.5
        assert reading.source == "rt"
        assert abs((reading.interval_start - before).total_seconds()) < 2
        assert source.last_good == reading
        age_s = source.age_s()
        assert age_s is not None
        assert 0 <= age_s < 2
        assert server.requests == 1


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("USD/kWh", 41500.0),
        ("cents/kWh", 415.0),
        ("usd_per_kwh", 41500.0),
        ("cents_per_kwh", 415.0),
    ],
)
async def test_unit_conversion(server: PriceServer, unit: str, expected: float) -> None:
    async with HttpJsonSource(settings(server, unit=unit)) as source:
        assert (await source.latest()).value == pytest.approx(expected)


FAULTS = [
    ("garbage", BadInput, "malformed JSON"),
    ("nan", BadInput, "data.0.price: expected a finite number, got NaN"),
    ("missing", BadInput, "field 'data.0.price' is missing"),
    ("string", BadInput, "(in USD/MWh): expected a number, got '41.5'"),
    ("stale", BadInput, "s old (at most 3600 s accepted)"),
    ("future", BadInput, "in the future (tolerance 300 s)"),
    ("down", SourceError, "answered HTTP 503"),
    ("slow", SourceError, "no complete answer from"),
]


@pytest.mark.parametrize(("mode", "error", "words"), FAULTS)
async def test_every_fault_is_a_clear_error_and_keeps_the_last_good(
    server: PriceServer, mode: str, error: type[SourceError], words: str
) -> None:
    server.slow_s = 2.0
    async with HttpJsonSource(settings(server)) as source:
        good = await source.latest()
        server.fault = mode
        with pytest.raises(error) as info:
            await source.latest()
        assert words in str(info.value)
        if error is SourceError:
            assert not isinstance(info.value, BadInput)  # transport, not content
        assert source.last_good == good  # nothing changed
        assert source.last_error is info.value
        server.fault = "ok"
        assert (await source.latest()).value == 41.5
        assert source.last_error is None


async def test_fault_mode_set_over_http_and_unknown_mode_refused(server: PriceServer) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{server.url}/fault", json={"mode": "nan"})
        assert answer.status_code == 200
        assert server.fault == "nan"
        refused = await client.post(f"{server.url}/fault", json={"mode": "melt"})
        assert refused.status_code == 400
        assert "unknown mode" in refused.text
    assert server.fault == "nan"


async def test_connection_refused_is_a_source_error() -> None:
    port = free_port()
    cfg = HttpJsonSettings(url=f"http://127.0.0.1:{port}/price", value_path="price", timeout_s=1)
    async with HttpJsonSource(cfg) as source:
        with pytest.raises(SourceError, match="cannot reach") as info:
            await source.latest()
        assert not isinstance(info.value, BadInput)
        assert source.last_good is None
        assert source.age_s() is None


async def test_series_advances_with_accelerated_time() -> None:
    srv = PriceServer([10.0, 20.0], interval_s=900, speed=9000)  # 0.1 s per price
    async with srv, HttpJsonSource(settings(srv)) as source:
        seen = set()
        for _ in range(30):
            seen.add((await source.latest()).value)
            await asyncio.sleep(0.02)
        assert seen == {10.0, 20.0}


async def test_run_loop_polls_until_stopped(server: PriceServer) -> None:
    async with HttpJsonSource(settings(server, poll_interval_s=0.05)) as source:
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 1.0)
    assert server.requests >= 3
    assert source.last_good is not None


def test_settings_and_paths() -> None:
    with pytest.raises(ValidationError, match="extra"):
        HttpJsonSettings.model_validate({"url": "http://127.0.0.1/", "value_path": "p", "x": 1})
    with pytest.raises(ValidationError, match="http:// or https://"):
        HttpJsonSettings(url="ftp://127.0.0.1/", value_path="p")
    with pytest.raises(ValidationError):
        HttpJsonSettings.model_validate(
            {"url": "http://127.0.0.1/", "value_path": "p", "unit": "EUR"}
        )
    doc = json.loads('{"data": [{"price": 1}, {"price": 2}]}')
    assert resolve_path(doc, "data.1.price") == 2
    assert resolve_path(doc, "data.-1.price") == 2


def test_hashprice_formula_by_hand() -> None:
    # 3.125 BTC × 100,000 USD × 86,400 s × 1e15 H/PH = 2.7e25; difficulty 1e14 × 2^32
    # = 4.294967296e23 hashes per block; 2.7e25 / 4.294967296e23 = 62.8643 USD/PH/day.
    assert hashprice_usd_per_ph_day(100_000, 1e14) == pytest.approx(62.8643, abs=1e-4)
    # Fees add linearly to the subsidy: +0.125 BTC a block is +4%.
    with_fees = hashprice_usd_per_ph_day(100_000, 1e14, fees_btc_per_block=0.125)
    assert with_fees == pytest.approx(62.8643 * 3.25 / 3.125, abs=1e-4)
    # Late-2025 order of magnitude (BTC ~90k, difficulty ~1.5e14): the 35–55 band of design.md.
    assert 35 < hashprice_usd_per_ph_day(90_000, 1.5e14, fees_btc_per_block=0.03) < 55
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="difficulty"):
            hashprice_usd_per_ph_day(100_000, bad)


async def test_constant_and_http_hashprice(server: PriceServer) -> None:
    reading = await ConstantHashprice(48.0).latest()
    assert reading.value == 48.0
    with pytest.raises(ValueError, match="positive"):
        ConstantHashprice(float("nan"))
    cfg = TypeAdapter(HashpriceSettings).validate_python(
        {
            "type": "http_json",
            "url": f"{server.url}/hashprice",
            "value_path": "data.0.value",
            "unit": "USD/TH/day",
        }
    )
    assert isinstance(cfg, HttpJsonSettings)
    server.numbers["hashprice"] = 0.052
    async with HttpJsonSource(cfg) as source:
        assert (await source.latest()).value == pytest.approx(52.0)


async def test_computed_hashprice_from_live_feeds(server: PriceServer) -> None:
    cfg = TypeAdapter(HashpriceSettings).validate_python(
        {
            "type": "computed",
            "btc_usd": {"url": f"{server.url}/btc", "value_path": "data.0.value", "unit": "raw"},
            "difficulty": {
                "url": f"{server.url}/difficulty",
                "value_path": "data.0.value",
                "unit": "raw",
            },
            "fees_btc_per_block": 0.125,
        }
    )
    assert not isinstance(cfg, HttpJsonSettings)
    assert cfg.type == "computed"
    source = ComputedHashprice.from_settings(cfg)
    try:
        assert (await source.latest()).value == pytest.approx(62.8643 * 3.25 / 3.125, abs=1e-4)
        server.numbers["difficulty"] = -5.0  # a feed that answers nonsense
        with pytest.raises(BadInput, match="difficulty must be a positive"):
            await source.latest()
        server.fault = "nan"
        with pytest.raises(BadInput, match="finite"):
            await source.latest()
    finally:
        await source.aclose()
