"""Hostile HTTP feeds over real sockets: slow, trickling, huge, deep, garbage, overflowing.

The peer is the real price server on loopback (``simulators/price_server.py``) in its hostile
modes; the client is the unmodified :class:`~drivers.prices.http_json.HttpJsonSource` (httpx).
Each attack gives one documented error line and one ``rejected_inputs_total{source,reason}``
increment, keeps the last good price, and the feed recovers by itself once the peer behaves.
The slow-feed test runs the real agent (its price poller) and reads ``source_up`` from the real
Prometheus collector.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from agent.control.config import AgentConfig
from agent.outputs.metrics import build_registry
from drivers.inputs import InputRejected, RejectionCounter, SourceTimeout
from drivers.prices.hashprice import ComputedHashprice
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource
from simulators.price_server import PriceServer
from tests.site_agent import build_agent

pytestmark = pytest.mark.hostile


@pytest.fixture
async def server() -> AsyncIterator[PriceServer]:
    async with PriceServer([41.5], interval_s=900, speed=1) as srv:
        yield srv


def feed(server: PriceServer, **kw: object) -> HttpJsonSettings:
    base: dict[str, object] = {
        "url": f"{server.url}/price",
        "value_path": "data.0.price",
        "time_path": "data.0.time",
        "timeout_s": 1.0,
    }
    base.update(kw)
    return HttpJsonSettings.model_validate(base)


ATTACKS = [
    # (fault mode, unit, reason, words in the one-line error)
    ("trickle", "USD/MWh", "timeout", "no complete answer from http://"),
    ("huge", "USD/MWh", "too_large", "a body of 2000038 bytes (limit 262,144)"),
    ("flood", "USD/MWh", "too_large", "the body passed the 262,144-byte limit"),
    ("deep", "USD/MWh", "too_deep", "is nested deeper than 32 levels"),
    ("garbage", "USD/MWh", "bad_syntax", "malformed JSON"),
    ("nan", "USD/MWh", "not_finite", "data.0.price: expected a finite number, got NaN"),
    ("overflow", "USD/kWh", "not_finite", "expected a finite number, got 1e+308 (×1000 is inf)"),
    ("overflow", "USD/MWh", "out_of_range", "expected -100000 to 100000 USD/MWh, got 1e+308"),
    ("bool", "USD/MWh", "bool_as_number", "expected a number, got True"),
    ("duplicate", "USD/MWh", "duplicate_key", "duplicate key 'price'"),
]


@pytest.mark.parametrize(("mode", "unit", "reason", "words"), ATTACKS)
async def test_each_hostile_answer_is_one_line_counted_and_changes_nothing(
    server: PriceServer, mode: str, unit: str, reason: str, words: str
) -> None:
    counter = RejectionCounter()
    server.trickle_s = 0.3
    async with HttpJsonSource(feed(server, unit=unit), name="rt", rejections=counter) as source:
        good = await source.latest()
        server.fault = mode
        started = time.monotonic()
        with pytest.raises((InputRejected, SourceTimeout)) as info:
            await source.latest()
        took_s = time.monotonic() - started
        text = str(info.value)
        assert text.startswith("rt: ")
        assert "\n" not in text
        assert words in text, text
        assert info.value.reason == reason
        assert counter.counts() == {("rt", reason): 1}
        assert source.last_good == good  # nothing changed
        # The whole poll, body included, ends by the deadline (plus scheduling slack).
        assert took_s < 1.0 + 2.0
        server.fault = "ok"
        assert (await source.latest()).value == pytest.approx(
            41.5 * (1000 if unit == "USD/kWh" else 1)
        )
        assert source.last_error is None


async def test_declared_huge_body_is_refused_before_it_is_read(server: PriceServer) -> None:
    counter = RejectionCounter()
    settings = feed(server, max_body_bytes=1024)
    async with HttpJsonSource(settings, name="rt", rejections=counter) as source:
        server.fault = "huge"
        with pytest.raises(InputRejected, match=r"a body of \d+ bytes \(limit 1,024\)"):
            await source.latest()
    assert counter.get("rt", "too_large") == 1


async def test_hashprice_out_of_its_physical_range_is_refused(server: PriceServer) -> None:
    counter = RejectionCounter()
    settings = feed(
        server,
        url=f"{server.url}/hashprice",
        value_path="data.0.value",
        unit="USD/PH/day",
    )
    async with HttpJsonSource(settings, name="hashprice", rejections=counter) as source:
        for bad in (0.0, -5.0, 2e6):
            server.numbers["hashprice"] = bad
            with pytest.raises(InputRejected, match="expected 1e-06 to 100000 USD/PH/day"):
                await source.latest()
        server.numbers["hashprice"] = 48.0
        assert (await source.latest()).value == 48.0
    assert counter.get("hashprice", "out_of_range") == 3


async def test_computed_hashprice_out_of_range_is_refused(server: PriceServer) -> None:
    def raw(name: str) -> HttpJsonSettings:
        return feed(server, url=f"{server.url}/{name}", value_path="data.0.value", unit="raw")

    hp = ComputedHashprice(HttpJsonSource(raw("btc")), HttpJsonSource(raw("difficulty")))
    try:
        server.numbers["difficulty"] = 1e-3  # each input finite, the result absurd
        with pytest.raises(InputRejected, match="computed hashprice: expected 1e-06 to 100000"):
            await hp.latest()
    finally:
        await hp.aclose()


def up(registry: CollectorRegistry, source: str) -> float | None:
    return registry.get_sample_value("site_agent_source_up", {"source": source})


async def until(predicate: object, deadline_s: float) -> float:
    """Seconds until ``predicate()`` holds; fails after ``deadline_s``."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > deadline_s:
            pytest.fail(f"condition not met within {deadline_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_slow_feed_goes_down_within_the_deadline_and_recovers_within_a_poll(
    server: PriceServer,
) -> None:
    timeout_s, poll_s = 1.0, 0.5
    settings = feed(server, timeout_s=timeout_s, poll_interval_s=poll_s)
    config = AgentConfig.model_validate(
        {
            "site": {"id": "hostile", "interconnect_limit_kw": 100},
            # The agent polls its price source every min(poll_interval_s, interval_s).
            "control": {"interval_s": poll_s, "poll_interval_s": poll_s, "poll_jitter_s": 0.0},
            "prices": {"realtime": settings.model_dump()},
        }
    )
    counter = RejectionCounter()
    source = HttpJsonSource(settings, name="rt", rejections=counter)
    agent = build_agent(config, fleets=[], price_source=source)
    registry = build_registry(agent.state, config, rejections=counter)
    name = "price:rt"
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop, grace_s=timeout_s + 1.0))
    try:
        await until(lambda: up(registry, name) == 1.0, 5.0)
        # A peer that sends headers at once and then one byte every 0.5 s: per-read timeouts
        # never fire, the total deadline does.
        server.trickle_s = 0.5
        server.fault = "trickle"
        down_after_s = await until(lambda: up(registry, name) == 0.0, 10.0)
        # At most one poll interval until the next poll starts, then the deadline.
        assert down_after_s <= poll_s + timeout_s + 1.0, down_after_s
        rejected = registry.get_sample_value(
            "site_agent_rejected_inputs_total", {"source": "rt", "reason": "timeout"}
        )
        assert rejected is not None
        assert rejected >= 1
        assert agent.coordinator.price is not None
        assert agent.coordinator.price.value == 41.5  # the last good price is kept
        # Fixed: the poll in flight may still be trickling (its deadline ends it), then the
        # next poll succeeds.
        server.fault = "ok"
        back_after_s = await until(lambda: up(registry, name) == 1.0, 10.0)
        assert back_after_s <= timeout_s + poll_s + 1.0, back_after_s
    finally:
        stop.set()
        await asyncio.wait_for(running, 10.0)  # the agent closes its price source
