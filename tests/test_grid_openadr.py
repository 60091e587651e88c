"""OpenADR 2.0b VEN against a real openleadr VTN on loopback: register, events, opt, report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from drivers.grid.base import FailDirection, GridEvent, GridEventSource, ProgramKind
from drivers.grid.common import Rejection
from drivers.grid.openadr import (
    OpenAdrSettings,
    OpenAdrVen,
    _Reject,
    grid_events_from_openadr,
)
from simulators.openadr_vtn import OpenAdrVtn
from tests.servers import free_port

ERS = "oadr://ercot/ers"
ECON = "oadr://aggregator/economic"
PROGRAMS = {
    ERS: {"name": "ers", "kind": "emergency", "fail": "curtail", "penalty_usd_per_mwh": 1000},
    ECON: {"name": "econ-dr", "kind": "economic", "fail": "release", "payment_usd_per_mwh": 150},
}


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@dataclass
class Site:
    vtn: OpenAdrVtn
    ven: OpenAdrVen
    asked: list[GridEvent] = field(default_factory=list)
    audit: list[Rejection] = field(default_factory=list)

    def push(self, **kw: Any) -> str:
        now = datetime.now(UTC)
        kw.setdefault("start", now + timedelta(seconds=30))
        kw.setdefault("duration", timedelta(hours=1))
        kw.setdefault("value", 500.0)
        kw.setdefault("market_context", ERS)
        return self.vtn.push_event("site-1", **kw)


def settings(port: int, **kw: Any) -> OpenAdrSettings:
    base: dict[str, Any] = {
        "vtn_url": f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b",
        "ven_name": "site-1",
        "programs": PROGRAMS,
        "simple_level_max_site_kw": {1: 2000, 2: 1000, 3: 0},
        "report_sampling_s": 1,
        "register_retry_min_s": 0.2,
        "register_retry_max_s": 0.5,
    }
    base.update(kw)
    return OpenAdrSettings.model_validate(base)


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    port = free_port()
    asked: list[GridEvent] = []
    audit: list[Rejection] = []

    def economic_rule(event: GridEvent) -> bool:
        asked.append(event)
        return event.payment_usd_per_mwh >= 200  # the margin lost is worth 200 USD/MWh

    async with OpenAdrVtn(port=port, poll_s=1) as vtn:
        ven = OpenAdrVen(
            settings(port),
            opt_rule=economic_rule,
            site_power_w=lambda: 812_345.0,
            on_rejected=audit.append,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(ven.run(stop))
        await until(lambda: ven.registered)
        yield Site(vtn, ven, asked, audit)
        stop.set()
        await asyncio.wait_for(task, 15)
    assert audit == ven.rejected


async def test_registers_and_reports_site_power(site: Site) -> None:
    assert isinstance(site.ven, GridEventSource)
    assert site.vtn.registrations == {"site-1": "ven-site-1"}
    assert site.ven.ven_id == "ven-site-1"
    await until(lambda: len(site.vtn.reports) > 0)
    report = site.vtn.reports[0]
    assert report.ven_id == "ven-site-1"
    assert report.resource_id == "site"
    assert report.value == 812_345.0


async def test_dispatch_event_becomes_grid_event_then_cancelled(site: Site) -> None:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
    site.ven.changed.clear()
    eid = site.push(start=start, duration=timedelta(minutes=45), value=500.0)
    await until(lambda: len(site.ven.events()) == 1)
    assert site.ven.changed.is_set()
    (event,) = site.ven.events()
    assert event.event_id == eid
    assert (event.start, event.end) == (start, start + timedelta(minutes=45))
    assert event.max_site_kw == 500.0
    assert event.shed_kw is None
    assert event.kind is ProgramKind.EMERGENCY
    assert event.program == "ers"
    assert event.fail is FailDirection.CURTAIL
    await until(lambda: site.vtn.opt_responses.get(eid) == "optIn")
    assert set(site.vtn.delivered) == {eid}  # openleadr may deliver it again at a later poll
    site.vtn.cancel_event("site-1", eid)
    await until(lambda: site.ven.events() == ())
    assert site.ven.rejected == []


async def test_economic_event_opted_out_by_rule_is_not_reported(site: Site) -> None:
    eid = site.push(market_context=ECON, signal_type="delta", value=300.0)
    await until(lambda: site.vtn.opt_responses.get(eid) == "optOut")
    assert site.ven.events() == ()
    (asked,) = site.asked
    assert asked.shed_kw == 300.0
    assert asked.payment_usd_per_mwh == 150  # what the rule weighed
    assert site.ven.rejected == []  # a refusal by rule is a decision, not bad input


async def test_mandatory_event_is_opted_in_whatever_the_rule(site: Site) -> None:
    eid = site.push(market_context=ERS, value=0.0)
    await until(lambda: site.vtn.opt_responses.get(eid) == "optIn")
    assert site.asked == []  # the rule is not even asked
    assert [e.max_site_kw for e in site.ven.events()] == [0.0]


async def test_simple_levels_over_several_intervals(site: Site) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)
    spans = [
        (t0, timedelta(minutes=10), 1.0),
        (t0 + timedelta(minutes=10), timedelta(minutes=10), 0.0),
        (t0 + timedelta(minutes=20), timedelta(minutes=10), 3.0),
    ]
    eid = site.push(signal_name="SIMPLE", signal_type="level", intervals=spans)
    await until(lambda: len(site.ven.events()) == 2)
    events = sorted(site.ven.events(), key=lambda e: e.start)
    assert [e.event_id for e in events] == [f"{eid}/0", f"{eid}/2"]
    assert [e.max_site_kw for e in events] == [2000, 0]
    assert events[1].start == t0 + timedelta(minutes=20)


BAD = [
    ({"market_context": "oadr://nobody/knows"}, "unknown market context"),
    ({"signal_name": "ELECTRICITY_PRICE", "signal_type": "price"}, "unsupported signal"),
    ({"value": -5.0}, "expected a value ≥ 0"),
    ({"signal_type": "multiplier"}, "LOAD_DISPATCH signal of type 'multiplier'"),
    (
        {"start": datetime(2020, 1, 1, tzinfo=UTC), "duration": timedelta(minutes=15)},
        "window already over",
    ),
]


async def test_bad_events_are_opted_out_and_change_nothing(site: Site) -> None:
    keep = site.push(value=900.0)
    await until(lambda: len(site.ven.events()) == 1)
    before = site.ven.events()
    # All pushed at once (one VTN, one poll) to keep the suite fast; each is judged alone.
    pushed = [(site.push(**kw), reason) for kw, reason in BAD]
    await until(lambda: len(site.ven.rejected) == len(BAD))
    by_event = {r.topic.split("#")[1]: r.reason for r in site.ven.rejected}
    for eid, reason in pushed:
        assert reason in by_event[eid], (reason, by_event[eid])
        assert site.ven.opted[eid] == "optOut"
        assert site.vtn.opt_responses.get(eid, "optOut") == "optOut"
    assert site.ven.events() == before
    assert site.ven.opted[keep] == "optIn"


async def test_registers_once_the_vtn_comes_up_and_fails_safe_when_it_goes_silent() -> None:
    port = free_port()
    ven = OpenAdrVen(settings(port, max_silence_s=2.5))
    stop = asyncio.Event()
    task = asyncio.create_task(ven.run(stop))
    try:
        await asyncio.sleep(0.6)  # a few refused registrations
        assert not ven.registered
        async with OpenAdrVtn(port=port, poll_s=1) as vtn:
            await until(lambda: ven.registered)
            eid = vtn.push_event(
                "site-1",
                start=datetime.now(UTC),
                duration=timedelta(hours=1),
                value=10.0,
                market_context=ECON,
                signal_type="delta",
            )
            await until(lambda: len(ven.events()) == 1)
            assert ven.events()[0].event_id == eid
        # The VTN is gone: after 2.5 s of silence, ers (curtail) sheds all, econ (release) drops.
        await until(lambda: ven.silence_s() > 2.5, 6.0)
        (lost,) = ven.events()
        assert lost.program == "ers"
        assert lost.max_site_kw == 0.0
        assert lost.active_at(datetime.now(UTC))
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_vtn_control_endpoint_pushes_an_event_over_http(site: Site) -> None:
    control = f"http://127.0.0.1:{site.vtn.port}/control"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{control}/event",
            json={
                "ven_name": "site-1",
                "start": start.isoformat(),
                "duration_s": 600,
                "value": 250,
                "signal_type": "delta",
                "market_context": ERS,
            },
        )
        assert answer.status_code == 200, answer.text
        eid = answer.json()["event_id"]
        await until(lambda: len(site.ven.events()) == 1)
        (event,) = site.ven.events()
        assert (event.event_id, event.shed_kw, event.start) == (eid, 250.0, start)
        bad = await http.post(f"{control}/event", json={"ven_name": "site-1"})
        assert bad.status_code == 400
        await http.post(f"{control}/cancel", json={"ven_name": "site-1", "event_id": eid})
        await until(lambda: site.ven.events() == ())


async def test_refused_ven_keeps_retrying_without_events() -> None:
    port = free_port()
    async with OpenAdrVtn(port=port, poll_s=1, allowed_vens={"someone-else"}) as vtn:
        ven = OpenAdrVen(settings(port))
        stop = asyncio.Event()
        task = asyncio.create_task(ven.run(stop))
        await until(lambda: len(vtn.refused) >= 2)  # refused, and retried
        assert not ven.registered
        assert vtn.registrations == {}
        assert ven.events() == ()
        stop.set()
        await asyncio.wait_for(task, 15)


def test_units_and_settings() -> None:
    now = datetime(2026, 7, 1, 20, tzinfo=UTC)
    event: dict[str, Any] = {
        "event_descriptor": {"event_id": "x", "market_context": ERS},
        "active_period": {"dtstart": now, "duration": timedelta(hours=1)},
        "event_signals": [
            {
                "signal_name": "LOAD_CONTROL",
                "signal_type": "x-loadControlSetpoint",
                "measurement": {"scale": "M"},
                "intervals": [{"duration": timedelta(hours=1), "signal_payload": 1.5}],
            }
        ],
    }
    s = settings(1)
    (grid,) = grid_events_from_openadr(
        event,
        source="t",
        programs=s.programs,
        simple_level_max_site_kw=s.simple_level_max_site_kw,
        now=now,
    )
    assert grid.max_site_kw == 1500.0  # 1.5 MW
    assert (grid.start, grid.end) == (now, now + timedelta(hours=1))
    # openleadr's VTN refuses to send a SIMPLE level outside 0–3; a foreign VTN might.
    event["event_signals"][0].update(
        signal_name="SIMPLE",
        signal_type="level",
        measurement=None,
        intervals=[{"duration": timedelta(hours=1), "signal_payload": 7.0}],
    )
    with pytest.raises(_Reject, match=r"SIMPLE level must be 0, 1, 2 or 3, got 7\.0"):
        grid_events_from_openadr(
            event,
            source="t",
            programs=s.programs,
            simple_level_max_site_kw=s.simple_level_max_site_kw,
            now=now,
        )
    event["event_signals"][0]["intervals"][0]["signal_payload"] = float("nan")
    with pytest.raises(_Reject, match="expected a finite number, got nan"):
        grid_events_from_openadr(
            event,
            source="t",
            programs=s.programs,
            simple_level_max_site_kw=s.simple_level_max_site_kw,
            now=now,
        )
    # An unknown market context falls back to default_program when one is configured.
    event["event_descriptor"]["market_context"] = "oadr://other"
    event["event_signals"][0]["intervals"][0]["signal_payload"] = 2.0
    with pytest.raises(_Reject, match="unknown market context"):
        grid_events_from_openadr(
            event,
            source="t",
            programs=s.programs,
            simple_level_max_site_kw=s.simple_level_max_site_kw,
            now=now,
        )
    fallback = settings(1, default_program={"name": "any", "kind": "economic"})
    (grid,) = grid_events_from_openadr(
        event,
        source="t",
        programs=fallback.programs,
        simple_level_max_site_kw=fallback.simple_level_max_site_kw,
        now=now,
        default_program=fallback.default_program,
    )
    assert (grid.program, grid.max_site_kw) == ("any", 1000)
    with pytest.raises(ValueError, match="at least one program"):
        settings(1, programs={})
    with pytest.raises(ValueError, match="extra"):
        OpenAdrSettings.model_validate({**s.model_dump(), "colour": "red"})
    with pytest.raises(ValueError, match="levels 1–3"):
        settings(1, simple_level_max_site_kw={4: 0})
