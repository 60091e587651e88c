"""The operator page without a browser: its figures, its 24-h buffer, its limits, its colours.

Figures are worked out by hand from tests/sample_state.py. The server tests talk to the real
metrics listener over loopback sockets, byte for byte, as a browser's EventSource would.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from agent.control.domain import ActiveEvent
from agent.control.settlement import FourCpInterval, fourcp_figures
from agent.control.thermal import ThermalConfig, ThermalLimit
from agent.outputs.page import (
    MAX_TEXT,
    History,
    OperatorPage,
    WorkloadRate,
    build_view,
    workload_rates,
)
from drivers.grid.base import GridEvent, ProgramKind
from tests.page_helpers import (
    contrast_ratio,
    css_variables,
    http_head,
    next_view,
    open_stream,
    page_server,
)
from tests.sample_state import NOW, sample_config, sample_snapshot, sample_state

# --- figures ------------------------------------------------------------------------------------


def test_workload_rates_of_the_sample_site() -> None:
    rates = workload_rates(sample_snapshot(), 812.5, pool_fee=0.0)
    mining = rates["mining"]
    # Four miners' measured power, faulted and asleep ones included: 3510 + 3490 + 30 + 3068.
    assert mining.power_w == pytest.approx(10_098.0)
    # 55 $/PH/day × (199.5 + 200.5 + 0 + 104) TH/s / 1000 / 24.
    assert mining.revenue_usd_per_h == pytest.approx(55 * 0.504 / 24)
    assert mining.cost_usd_per_h == pytest.approx(10_098 / 1e6 * 812.5)
    # GPU node: 4800 W over 8 GPUs; the SLA job runs on 4, the filler job is suspended.
    assert rates["ai_sla"].power_w == pytest.approx(2400.0)
    assert rates["ai_sla"].revenue_usd_per_h == pytest.approx(4 * 2.5)
    assert rates["ai_filler"].power_w == 0.0
    assert rates["ai_filler"].revenue_usd_per_h == 0.0
    assert rates["ai_idle"].power_w == pytest.approx(2400.0)
    assert rates["ai_idle"].margin_usd_per_h == pytest.approx(-2400 / 1e6 * 812.5)
    # The event's baseline was 20 kW and the site measures 18.898 kW: 1.102 kW given back.
    assert rates["grid_events"].power_w == pytest.approx(1102.0)


def test_grid_event_pays_on_the_shed_and_is_penalised_on_the_shortfall() -> None:
    snap = sample_snapshot()
    event = GridEvent(
        "ev-2",
        "grid:mqtt",
        "econ-dr",
        ProgramKind.ECONOMIC,
        NOW - timedelta(minutes=1),
        NOW + timedelta(minutes=30),
        max_site_kw=18.0,
        payment_usd_per_mwh=1000.0,
        penalty_usd_per_mwh=2000.0,
    )
    snap = replace(snap, events=(ActiveEvent(event, baseline_w=25_000.0),))
    grid = workload_rates(snap, 812.5, 0.0)["grid_events"]
    assert grid.power_w == pytest.approx(25_000 - 18_898)
    assert grid.revenue_usd_per_h == pytest.approx(1000 * (25_000 - 18_898) / 1e6)
    assert grid.cost_usd_per_h == pytest.approx(2000 * (18_898 - 18_000) / 1e6)


def test_history_integrates_rates_caps_gaps_and_forgets_after_its_window() -> None:
    history = History(max_cycles=100, window=timedelta(hours=2), max_gap_s=60)
    rates = {
        k: WorkloadRate()
        for k in ("ai_sla", "ai_preemptible", "ai_filler", "ai_idle", "grid_events")
    }
    rates["mining"] = WorkloadRate(power_w=1e6, revenue_usd_per_h=100.0, cost_usd_per_h=40.0)
    t0 = NOW
    for i in range(3):
        history.record(t0 + timedelta(seconds=20 * i), 1e6, 2e6, rates)
    history.record(t0 + timedelta(seconds=40), 1e6, 2e6, rates)  # the same cycle again: ignored
    mining = history.totals()["mining"]
    # 40 s at 1 MW, 100 $/h, 40 $/h (the first cycle starts the clock).
    assert mining["energy_mwh"] == pytest.approx(40 / 3600)
    assert mining["revenue_usd"] == pytest.approx(100 * 40 / 3600)
    assert mining["margin_usd"] == pytest.approx(60 * 40 / 3600)
    # The agent was away for an hour: the gap counts 60 s, not an hour of a stale rate.
    history.record(t0 + timedelta(seconds=3640), 1e6, 2e6, rates)
    assert history.totals()["mining"]["energy_mwh"] == pytest.approx(100 / 3600)
    # Two hours later still: every cycle older than the 2-h window is forgotten, with its sums.
    history.record(t0 + timedelta(seconds=3640 + 7200), 1e6, 2e6, rates)
    assert len(history) == 2
    assert history.since == t0 + timedelta(seconds=3640)
    assert history.totals()["mining"]["energy_mwh"] == pytest.approx(120 / 3600)
    assert history.totals()["mining"]["cost_usd"] == pytest.approx(40 * 120 / 3600)


def test_history_is_bounded_by_cycles() -> None:
    history = History(max_cycles=50, window=timedelta(days=1), max_gap_s=60)
    rates = {k: WorkloadRate(power_w=1000.0) for k in History().totals()}
    for i in range(500):
        history.record(NOW + timedelta(seconds=i), 1000.0, 2000.0, rates)
    assert len(history) == 50
    assert history.since == NOW + timedelta(seconds=450)
    # 50 one-second steps of 1 kW in the buffer (each cycle counts the second before it).
    assert history.totals()["mining"]["energy_mwh"] == pytest.approx(50 * 1000 / 1e6 / 3600)
    assert len(history.series(points=10)) <= 11


def test_view_is_json_safe_and_bounds_hostile_text() -> None:
    state = sample_state()
    assert state.snapshot is not None
    long_id = "<script>alert(1)</script>" + "x" * 10_000
    event = GridEvent(
        long_id,
        "grid:mqtt",
        "p",
        ProgramKind.EMERGENCY,
        NOW - timedelta(minutes=1),
        NOW + timedelta(minutes=5),
        max_site_kw=10.0,
    )
    state.snapshot = replace(
        state.snapshot,
        measured_site_power_w=math.nan,
        events=(ActiveEvent(event, baseline_w=math.inf),),
    )
    state.faults = {f"m-{i:05d}": "y" * 5000 for i in range(1000)}
    page = OperatorPage(state, sample_config(), clock=lambda: NOW)
    view = page.publish()
    text = json.dumps(view, allow_nan=False)  # no NaN/Infinity: browsers' JSON.parse rejects them
    assert view["power"]["site_w"] is None
    ev = view["events"][0]
    assert len(ev["id"]) == MAX_TEXT
    assert ev["id"].startswith("<script>")  # kept as text: the page never parses it as markup
    assert ev["compliant"] is None  # no finite measurement: not judged
    assert len(view["faults"]) == 100
    assert view["faults_total"] == 1001  # and m-004, faulted in the snapshot
    assert all(len(f["reason"]) == MAX_TEXT for f in view["faults"])
    assert len(text) < 200_000


def test_view_shows_derates_only_when_the_agent_reports_them() -> None:
    state = sample_state()
    view = build_view(state, sample_config(), History(), None, NOW)
    assert view["derates"] is None  # nothing reports derates: the page hides the field

    class PlanWithDerates:
        def __init__(self) -> None:
            self.derates = {"m-001": "hottest board 92 °C above 90 °C: stock → -1"}

    # Any holder with a ``derates`` mapping (or list) is shown, bounded and as text.
    from agent.outputs.page import _derates

    assert _derates(state, PlanWithDerates()) == [
        {"device": "m-001", "reason": "hottest board 92 °C above 90 °C: stock → -1"}
    ]


def test_view_shows_the_meter_the_cooling_and_the_devices_derated_for_heat() -> None:
    state = sample_state()  # a trusted meter: 18,898 W, of which 716 W cooling
    view = build_view(state, sample_config(), History(), None, NOW)
    assert view["power"]["meter_w"] == 18_898.0
    assert view["power"]["cooling_w"] == 716.0
    assert view["derates"] is None  # no thermal limit, nothing derated: hidden
    snap = state.snapshot
    assert snap is not None
    why = "hottest chip 104 °C > 100 °C"
    miners = tuple(replace(m, max_point="sleep", derate=why) if m.device_id == "m-002" else m
                   for m in snap.miners)  # fmt: skip
    state.snapshot = replace(snap, miners=miners)
    state.meter = replace(state.meter, configured=False, meter_w=None)  # no meter: cooling only
    view = build_view(state, sample_config(), History(), None, NOW)
    assert view["derates"] == [{"device": "m-002", "reason": why}]
    assert view["power"]["meter_w"] is None
    assert view["power"]["cooling_w"] == 716.0
    # A site with a thermal limit and nothing hot shows the (empty) list.
    cooled = sample_config().model_copy(
        update={"thermal": ThermalConfig(miner=ThermalLimit(max_c=100, resume_c=92))}
    )
    state.snapshot = snap
    assert build_view(state, cooled, History(), None, NOW)["derates"] == []


# --- colours ------------------------------------------------------------------------------------

# (foreground, background, minimum ratio): 4.5 for text (WCAG 1.4.3 AA), 3.0 for graphics
# that carry meaning (1.4.11: the power bar, its limit mark and border, the chart lines).
COLOUR_PAIRS = [
    ("ink", "card", 4.5),
    ("ink", "page", 4.5),
    ("muted", "card", 4.5),
    ("muted", "page", 4.5),
    ("stale", "card", 4.5),
    ("accent", "card", 4.5),
    ("accent", "page", 4.5),
    ("bad", "card", 4.5),
    ("badge-ink", "ok", 4.5),
    ("badge-ink", "bad", 4.5),
    ("badge-ink", "warn", 4.5),
    ("badge-ink", "accent", 4.5),
    ("badge-ink", "stale", 4.5),
    ("banner-ink", "banner-bg", 4.5),
    ("header-ink", "header-bg", 4.5),
    ("header-muted", "header-bg", 4.5),
    ("accent", "track", 3.0),
    ("bad", "track", 3.0),
    ("stale", "track", 3.0),
    ("ink", "track", 3.0),
    ("muted", "card", 3.0),
    ("warn", "banner-bg", 3.0),
]


def test_wcag_formula_matches_known_values() -> None:
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((255, 255, 255), (255, 255, 255)) == pytest.approx(1.0)
    # #767676 on white is the classic lightest AA grey: 4.54:1.
    assert contrast_ratio((0x76, 0x76, 0x76), (255, 255, 255)) == pytest.approx(4.54, abs=0.01)


@pytest.mark.parametrize(("fg", "bg", "minimum"), COLOUR_PAIRS)
def test_colour_pairs_meet_wcag_aa(fg: str, bg: str, minimum: float) -> None:
    colours = css_variables()
    ratio = contrast_ratio(colours[fg], colours[bg])
    assert ratio >= minimum, f"--{fg} on --{bg}: {ratio:.2f}:1 < {minimum}:1"


def test_every_declared_colour_is_in_a_tested_pair() -> None:
    used = {name for fg, bg, _ in COLOUR_PAIRS for name in (fg, bg)}
    assert set(css_variables()) - used <= {"rule"}  # table rules are decoration, not content


# --- the server ---------------------------------------------------------------------------------


async def test_stream_sends_a_view_per_publish_and_the_files_are_served() -> None:
    state = sample_state()
    async with page_server(state, sample_config()) as srv:
        reader, writer = await open_stream(srv.server.port)
        status, headers = await http_head(reader)
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert "default-src 'none'" in headers["content-security-policy"]
        first = json.loads(await next_view(reader))
        assert first["site"] == "west-1"
        assert first["power"]["site_w"] == 18_898.0
        # The runtime swaps in a new snapshot and plan, and counts the cycle when it has
        # finished: the watcher publishes them then.
        assert state.snapshot is not None
        assert state.plan is not None
        state.snapshot = replace(state.snapshot, measured_site_power_w=12_345.0)
        state.plan = replace(state.plan, summary="a new cycle")
        state.cycles += 1
        view = json.loads(await next_view(reader))
        while view["plan"]["summary"] != "a new cycle":
            view = json.loads(await next_view(reader))
        assert view["power"]["site_w"] == 12_345.0
        writer.close()
        for path, ctype in [("/", "text/html"), ("/page.js", "text/javascript")]:
            r, w = await open_stream(srv.server.port, path)
            status, headers = await http_head(r)
            assert (status, headers["content-type"].split(";")[0]) == (200, ctype)
            w.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/events", "/view.json", "/page.js"])
async def test_page_is_get_only(method: str, path: str) -> None:
    async with page_server(sample_state(), sample_config()) as srv:
        reader, writer = await open_stream(srv.server.port, path, method=method)
        status, headers = await http_head(reader)
        writer.close()
        assert status == 405
        assert headers["allow"] == "GET"


async def test_metrics_still_served_beside_the_page() -> None:
    async with page_server(sample_state(), sample_config()) as srv:
        reader, writer = await open_stream(srv.server.port, "/metrics")
        status, _ = await http_head(reader)
        body = await reader.read()
        writer.close()
        assert status == 200
        assert b"site_agent_site_power_watts 18898.0" in body


async def test_clients_beyond_the_bound_get_503_and_a_freed_slot_is_reused() -> None:
    async with page_server(sample_state(), sample_config(), max_clients=2) as srv:
        streams = [await open_stream(srv.server.port) for _ in range(2)]
        for reader, _ in streams:
            assert (await http_head(reader))[0] == 200
        reader, writer = await open_stream(srv.server.port)
        status, headers = await http_head(reader)
        assert status == 503
        assert headers["retry-after"] == "10"
        assert b"too many page clients" in await reader.read()
        writer.close()
        assert srv.page.refused == 1
        streams[0][1].close()
        # The server notices the closed client at its next write (a view or a keep-alive).
        deadline = time.monotonic() + 10
        while srv.page.client_count > 1:
            srv.page.publish()
            assert time.monotonic() < deadline, "closed client never released"
            await asyncio.sleep(0.05)
        reader, writer = await open_stream(srv.server.port)
        assert (await http_head(reader))[0] == 200
        writer.close()
        streams[1][1].close()


async def test_a_client_that_stops_reading_is_dropped_and_never_stalls_publishing() -> None:
    state = sample_state()
    # Big views (1000 faults, reasons cut to 200 characters: ~25 kB a view) fill buffers fast.
    state.faults = {f"m-{i:05d}": "z" * 300 for i in range(1000)}
    async with page_server(
        state, sample_config(), write_timeout_s=0.3, max_buffer_bytes=64 * 1024
    ) as srv:
        slow_reader, slow_writer = await open_stream(srv.server.port, rcvbuf=4096)
        fast_reader, fast_writer = await open_stream(srv.server.port)
        assert (await http_head(fast_reader))[0] == 200
        worst_publish_s = 0.0
        deadline = time.monotonic() + 20
        received = 0
        while srv.page.dropped_slow == 0:
            assert time.monotonic() < deadline, "slow client never dropped"
            started = time.perf_counter()
            srv.page.publish()
            worst_publish_s = max(worst_publish_s, time.perf_counter() - started)
            await next_view(fast_reader)  # the reading client gets every view meanwhile
            received += 1
        while srv.page.client_count > 1:  # the drop is at once; its task ends next
            assert time.monotonic() < deadline, "dropped client still counted"
            await asyncio.sleep(0.01)
        # Publishing builds the view once and hands it over; a stuck socket costs it nothing.
        assert worst_publish_s < 0.25, worst_publish_s
        assert received > 5
        slow_writer.close()
        fast_writer.close()
        del slow_reader


async def test_closing_the_server_ends_every_stream() -> None:
    async with page_server(sample_state(), sample_config()) as srv:
        reader, writer = await open_stream(srv.server.port)
        await next_view(reader)
        await srv.close()
        async with asyncio.timeout(5):
            rest = await reader.read()
        assert reader.at_eof()
        assert b"event: view" not in rest or rest.endswith(b"\n\n")
        writer.close()


async def test_a_stream_client_that_hangs_up_is_gone_before_the_next_heartbeat() -> None:
    async with page_server(sample_state(), sample_config(), heartbeat_s=30.0) as srv:
        reader, writer = await open_stream(srv.server.port)
        assert (await http_head(reader))[0] == 200
        await next_view(reader)
        assert srv.page.client_count == 1
        writer.close()
        # Found at once from its end of stream, not at the next heartbeat 30 s away: no view
        # is written to it again.
        deadline = asyncio.get_running_loop().time() + 5
        while srv.page.client_count:
            assert asyncio.get_running_loop().time() < deadline, "closed client still held"
            await asyncio.sleep(0.02)
        # A client that streams data at the page after its request is dropped too.
        reader, writer = await open_stream(srv.server.port)
        assert (await http_head(reader))[0] == 200
        writer.write(b"x" * 70_000)
        deadline = asyncio.get_running_loop().time() + 5
        while srv.page.client_count:
            assert asyncio.get_running_loop().time() < deadline, "chatty client still held"
            await asyncio.sleep(0.02)
        writer.close()


def test_view_shows_the_live_4cp_account_of_the_latest_month() -> None:
    state = sample_state()
    assert build_view(state, sample_config(), History(), None, NOW)["fourcp"] is None
    at = datetime(2023, 7, 18, 21, 45, tzinfo=UTC)
    june = FourCpInterval(datetime(2023, 6, 27, 21, 45, tzinfo=UTC), 30_000 * 900, 900, 900, 1)
    july = FourCpInterval(at, 20_000 * 600, 600, 600, 1)
    state.fourcp = fourcp_figures([june, july], 60.0)
    view = build_view(state, sample_config(), History(), None, NOW)
    assert view["fourcp"] == {
        "month": "2023-07",
        "peak_w": 20_000.0,
        "source": "meter",
        "intervals": 1,
        "charge_usd": 300.0,  # 60 USD/kW-year / 4 x 20 kW
        "season_charge_usd": 750.0,  # June's 30 kW (450 USD) too
    }
