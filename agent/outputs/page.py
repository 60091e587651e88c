"""The operator's page: plain files and a server-sent-events stream of the site, read-only.

:class:`OperatorPage` hangs off the metrics listener (:class:`agent.outputs.metrics.MetricsServer`,
127.0.0.1 by default) and answers these paths, ``GET`` only (anything else gets 405):

==================  ===============================================================
``/``               ``page/index.html`` (package data, no JavaScript build chain)
``/page.css``       the style sheet; ``/page.js`` the script
``/view.json``      the latest view of the site, as JSON (what each SSE message holds)
``/events``         ``text/event-stream``: one ``view`` message per control cycle
==================  ===============================================================

The view is built from :class:`agent.runtime.state.AgentState` only (the latest Snapshot and Plan,
counters, faults): no I/O to devices. A watcher task notices a finished control cycle (the
runtime counts a cycle after its plan, actions and observers), records the cycle's per-workload
figures in a bounded ring buffer (:class:`History`, the last 24 h), serialises the view once and
hands the same bytes to every client. Clients never slow the control loop: the view is built and
handed out between cycles, never inside one, and handing it out is one non-blocking write per
client (into the socket, or that client's bounded buffer); a client that cannot keep up within
the write deadline or the cap on queued bytes is dropped. The number of stream clients is
bounded; the excess gets 503 (the page then falls back to polling ``/view.json``).

Workloads and how their money is counted (rates, USD/h; energy at the real-time price):

* ``mining``: measured miner power; revenue at the measured hashrate and the snapshot's
  hashprice, after the pool fee (as ``/metrics``).
* ``ai_sla``, ``ai_preemptible``, ``ai_filler``: a GPU node's measured power is shared per GPU
  (host overhead spread over its GPUs); each running job's GPUs go to its class, with its
  contracted revenue at the node's cap. ``ai_idle``: GPUs with no running job and their host share.
* ``grid_events``: power given back (baseline − measured site power, the largest over the events
  in force); revenue is each event's payment on that shed, cost its penalty on any shortfall
  above the event's target.

Strings that come from outside (event ids, fault reasons, action reasons) are cut to a bounded
length, lists to a bounded count; the page's script puts them in the DOM as text, never markup,
and the responses carry a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from agent.control.config import AgentConfig
from agent.control.domain import Plan, Snapshot
from agent.control.economics import (
    ai_revenue_usd_per_h,
    energy_cost_usd_per_h,
    mining_revenue_usd_per_h,
)
from agent.control.settlement import event_target_w, shortfall_w
from agent.runtime.state import AgentState
from drivers.jobs.base import JobClass, JobState

log = logging.getLogger(__name__)

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

WORKLOADS: tuple[tuple[str, str], ...] = (
    ("mining", "Mining"),
    ("ai_sla", "AI: SLA jobs"),
    ("ai_preemptible", "AI: preemptible jobs"),
    ("ai_filler", "AI: filler jobs"),
    ("ai_idle", "AI: idle GPUs and hosts"),
    ("grid_events", "Grid events (power given back)"),
)
_KEYS = tuple(key for key, _ in WORKLOADS)
_CONSUMING = frozenset(_KEYS) - {"grid_events"}
_AI_KEY = {
    JobClass.SLA: "ai_sla",
    JobClass.PREEMPTIBLE: "ai_preemptible",
    JobClass.FILLER: "ai_filler",
}

MAX_TEXT = 200  # characters of any outside string shown on the page
MAX_ITEMS = 100  # entries of any list (actions, faults, events, derates) in one view
HISTORY_POINTS = 144  # points of the 24-h power chart
DAY = timedelta(hours=24)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _num(value: float | None, digits: int = 3) -> float | None:
    """A JSON-safe number: None for missing or non-finite (JSON has no NaN or Infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _finite(value: float | None) -> float | None:
    """The value if it is a finite number (a NaN reading must not look compliant), else None."""
    return value if value is not None and math.isfinite(value) else None


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat(timespec="seconds")


# --- per-workload figures -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadRate:
    """One workload's power and money rates at one cycle."""

    power_w: float = 0.0
    revenue_usd_per_h: float = 0.0
    cost_usd_per_h: float = 0.0

    @property
    def margin_usd_per_h(self) -> float:
        return self.revenue_usd_per_h - self.cost_usd_per_h


def energy_price_usd_per_mwh(snapshot: Snapshot, plan: Plan | None) -> float:
    """The price energy is paid at: the real-time price, else what the plan was made against."""
    if snapshot.price is not None:
        return snapshot.price.usd_per_mwh
    return plan.effective_price_usd_per_mwh if plan is not None else 0.0


def workload_rates(
    snapshot: Snapshot, price_usd_per_mwh: float, pool_fee: float
) -> dict[str, WorkloadRate]:
    """Power, revenue and cost per workload (see the module docstring for the rules)."""
    power = dict.fromkeys(_KEYS, 0.0)
    revenue = dict.fromkeys(_KEYS, 0.0)
    cost = dict.fromkeys(_KEYS, 0.0)
    for m in snapshot.miners:
        if m.measured_power_w is not None:
            power["mining"] += m.measured_power_w * m.count
        if m.measured_hashrate_ths is not None:
            revenue["mining"] += mining_revenue_usd_per_h(
                m.measured_hashrate_ths * m.count, snapshot.hashprice_usd_per_ph_day, pool_fee
            )
    for n in snapshot.gpu_nodes:
        free_gpus = n.gpu_count
        per_gpu_w = (
            n.measured_power_w / n.gpu_count
            if n.measured_power_w is not None and n.gpu_count > 0
            else None
        )
        for j in n.jobs:
            if j.state is not JobState.RUNNING:
                continue
            key = _AI_KEY[j.job_class]
            revenue[key] += n.count * ai_revenue_usd_per_h(
                j.gpus, j.usd_per_gpu_hour, n.cap_w, n.max_cap_w, n.min_cap_w
            )
            gpus = min(j.gpus, free_gpus)
            free_gpus -= gpus
            if per_gpu_w is not None:
                power[key] += per_gpu_w * gpus * n.count
        if per_gpu_w is not None:
            power["ai_idle"] += per_gpu_w * free_gpus * n.count
    site_w = _finite(snapshot.measured_site_power_w)
    if site_w is not None:
        for a in snapshot.events:
            shed_w = max(0.0, a.baseline_w - site_w)
            power["grid_events"] = max(power["grid_events"], shed_w)
            revenue["grid_events"] += a.event.payment_usd_per_mwh * shed_w / 1e6
            target = event_target_w(a.event, a.baseline_w)
            if target is not None:
                short_w = shortfall_w(site_w, target)
                cost["grid_events"] += a.event.penalty_usd_per_mwh * short_w / 1e6
    for key in _CONSUMING:
        cost[key] = energy_cost_usd_per_h(power[key], price_usd_per_mwh)
    return {k: WorkloadRate(power[k], revenue[k], cost[k]) for k in _KEYS}


def _total(rates: Mapping[str, WorkloadRate]) -> WorkloadRate:
    return WorkloadRate(
        sum(r.power_w for k, r in rates.items() if k in _CONSUMING),
        sum(r.revenue_usd_per_h for r in rates.values()),
        sum(r.cost_usd_per_h for r in rates.values()),
    )


# --- the last 24 hours --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CycleFigures:
    """One control cycle as the page remembers it (``flat``: power, revenue, cost per workload)."""

    at: datetime
    dt_s: float  # the span this cycle's rates are integrated over
    site_w: float | None
    limit_w: float
    flat: tuple[float, ...]


class History:
    """A bounded ring buffer of per-cycle figures with running 24-h energy and money totals.

    At most ``max_cycles`` cycles and ``window`` of time are kept (whichever is shorter: at a
    fast cycle the buffer covers less than 24 h, and :attr:`since` says from when). A cycle's
    rates count over the time since the previous cycle, capped at ``max_gap_s`` so that a gap
    (the agent was down) is not filled with a stale rate.
    """

    def __init__(
        self,
        *,
        max_cycles: int = 10_000,
        window: timedelta = DAY,
        max_gap_s: float = 60.0,
    ) -> None:
        if max_cycles < 2:
            raise ValueError("History needs room for two cycles or more")
        self.max_cycles = max_cycles
        self.window = window
        self.max_gap_s = max_gap_s
        self._cycles: deque[CycleFigures] = deque()
        self._sums = [0.0] * (3 * len(_KEYS))  # energy MWh, revenue USD, cost USD per workload
        self._since_rebuild = 0

    def __len__(self) -> int:
        return len(self._cycles)

    @property
    def since(self) -> datetime | None:
        return self._cycles[0].at if self._cycles else None

    def record(
        self,
        at: datetime,
        site_w: float | None,
        limit_w: float,
        rates: Mapping[str, WorkloadRate],
    ) -> None:
        dt_s = 0.0
        if self._cycles:
            last = self._cycles[-1].at
            if at <= last:
                return  # the same cycle again, or a clock that stepped back: nothing to add
            dt_s = min((at - last).total_seconds(), self.max_gap_s)
        flat: list[float] = []
        for key in _KEYS:
            r = rates[key]
            flat += (r.power_w, r.revenue_usd_per_h, r.cost_usd_per_h)
        cycle = CycleFigures(at, dt_s, site_w, limit_w, tuple(flat))
        self._cycles.append(cycle)
        self._add(cycle, 1.0)
        while len(self._cycles) > self.max_cycles or at - self._cycles[0].at > self.window:
            self._add(self._cycles.popleft(), -1.0)
        self._since_rebuild += 1
        if self._since_rebuild >= self.max_cycles:
            self._rebuild()  # running sums drift by rounding; start them afresh now and then

    def _add(self, cycle: CycleFigures, sign: float) -> None:
        h = cycle.dt_s / 3600.0 * sign
        sums, flat = self._sums, cycle.flat
        for i in range(0, len(flat), 3):
            sums[i] += flat[i] / 1e6 * h
            sums[i + 1] += flat[i + 1] * h
            sums[i + 2] += flat[i + 2] * h

    def _rebuild(self) -> None:
        self._sums = [0.0] * (3 * len(_KEYS))
        for cycle in self._cycles:
            self._add(cycle, 1.0)
        self._since_rebuild = 0

    def totals(self) -> dict[str, dict[str, float]]:
        """Per workload: ``energy_mwh``, ``revenue_usd``, ``cost_usd``, ``margin_usd``."""
        out = {}
        for i, key in enumerate(_KEYS):
            energy, revenue, cost = self._sums[3 * i : 3 * i + 3]
            out[key] = {
                "energy_mwh": energy,
                "revenue_usd": revenue,
                "cost_usd": cost,
                "margin_usd": revenue - cost,
            }
        return out

    def series(self, points: int = HISTORY_POINTS) -> list[list[float | None]]:
        """About ``points`` evenly spaced cycles: ``[unix s, site W, limit W, margin USD/h]``."""
        n = len(self._cycles)
        step = max(1, math.ceil(n / points))
        out: list[list[float | None]] = []
        for i, c in enumerate(self._cycles):
            if i % step and i != n - 1:
                continue
            margin = sum(c.flat[j + 1] - c.flat[j + 2] for j in range(0, len(c.flat), 3))
            out.append(
                [round(c.at.timestamp(), 3), _num(c.site_w, 1), _num(c.limit_w, 1), _num(margin)]
            )
        return out


# --- the view -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Derates:
    derates: Mapping[str, str]


def _thermal_derates(snap: Snapshot | None, config: AgentConfig | None) -> dict[str, str] | None:
    """Devices held derated for heat now (device id -> why), read from the snapshot's views;
    None when the site has no thermal limit and nothing is derated (the page hides the field)."""
    found: dict[str, str] = {}
    if snap is not None:
        found.update((m.device_id, m.derate) for m in snap.miners if m.derate is not None)
        found.update((n.device_id, n.derate) for n in snap.gpu_nodes if n.derate is not None)
    thermal = None if config is None else config.thermal
    limited = thermal is not None and (thermal.miner is not None or thermal.gpu is not None)
    return found if found or limited else None


def _derates(*holders: object) -> list[dict[str, str]] | None:
    """Thermal derates when some part of the agent reports them (``derates``), else None.

    Accepts a mapping of device id to reason, or a sequence of items with ``device_id`` and
    ``reason`` (or anything printable); the page shows the field only when one is present.
    """
    for holder in holders:
        found = getattr(holder, "derates", None)
        if found is None:
            continue
        rows: list[dict[str, str]] = []
        items: Iterable[Any] = found.items() if isinstance(found, Mapping) else found
        for item in items:
            if len(rows) >= MAX_ITEMS:
                break
            if isinstance(item, tuple) and len(item) == 2:
                device, reason = item
            else:
                device = getattr(item, "device_id", "")
                reason = getattr(item, "reason", item)
            rows.append({"device": _text(device), "reason": _text(reason)})
        return rows
    return None


def _money(rate: WorkloadRate) -> dict[str, float | None]:
    return {
        "power_w": _num(rate.power_w, 1),
        "revenue_usd_per_h": _num(rate.revenue_usd_per_h, 4),
        "cost_usd_per_h": _num(rate.cost_usd_per_h, 4),
        "margin_usd_per_h": _num(rate.margin_usd_per_h, 4),
    }


def build_view(
    state: AgentState,
    config: AgentConfig | None,
    history: History,
    rates: Mapping[str, WorkloadRate] | None,
    now: datetime,
) -> dict[str, Any]:
    """The JSON view of the site the page shows; reads only in-memory state."""
    snap, plan = state.snapshot, state.plan
    interval_s = config.control.interval_s if config is not None else None
    view: dict[str, Any] = {
        "version": 1,
        "site": _text(state.site_id),
        "generated_at": _iso(now),
        "mode": state.mode,
        "safe_reason": None if state.safe_reason is None else _text(state.safe_reason),
        "cycle": {
            "count": state.cycles,
            "last_at": _iso(state.last_cycle_at),
            "duration_s": _num(state.last_cycle_duration_s, 4),
            "interval_s": interval_s,
        },
    }
    interconnect_w = None
    margin_w = None
    if config is not None:
        interconnect_w = config.site.interconnect_limit_kw * 1000.0
        margin_w = config.site.safety_margin_kw * 1000.0
    site_w = snap.measured_site_power_w if snap is not None else None
    meter = state.meter
    view["power"] = {
        "site_w": _num(site_w, 1),
        "planned_w": _num(plan.planned_power_w, 1) if plan else None,
        "limit_w": _num(plan.limit_w, 1) if plan else None,
        "interconnect_w": _num(interconnect_w, 1),
        "safety_margin_w": _num(margin_w, 1),
        "binding": [_text(b) for b in plan.binding[:MAX_ITEMS]] if plan else [],
        # The revenue meter's last good reading (a metered site only), and the cooling the
        # cooling model adds to the devices' own power.
        "meter_w": _num(meter.meter_w if meter is not None and meter.configured else None, 1),
        "cooling_w": _num(meter.cooling_w if meter is not None and meter.cooling_w else None, 1),
    }
    if snap is not None:
        view["price"] = {
            "realtime_usd_per_mwh": _num(snap.price.usd_per_mwh if snap.price else None, 2),
            "age_s": _num(snap.price.age_s if snap.price else None, 1),
            "effective_usd_per_mwh": _num(plan.effective_price_usd_per_mwh, 2) if plan else None,
            "day_ahead_usd_per_mwh": _num(snap.day_ahead_usd_per_mwh, 2),
            "hashprice_usd_per_ph_day": _num(snap.hashprice_usd_per_ph_day, 2),
            "fourcp_risk": _num(snap.fourcp_risk, 3),
        }
    else:
        view["price"] = None
    totals = history.totals()
    workloads = []
    for key, label in WORKLOADS:
        now_rate = rates.get(key) if rates is not None else None
        day = totals[key]
        workloads.append(
            {
                "key": key,
                "label": label,
                "now": _money(now_rate) if now_rate is not None else None,
                "day": {k: _num(v, 4) for k, v in day.items()},
            }
        )
    view["workloads"] = workloads
    total_now = _total(rates) if rates is not None else None
    view["total"] = {
        "now": _money(total_now) if total_now is not None else None,
        "day": {
            "energy_mwh": _num(sum(totals[k]["energy_mwh"] for k in _CONSUMING), 4),
            "revenue_usd": _num(sum(t["revenue_usd"] for t in totals.values()), 4),
            "cost_usd": _num(sum(t["cost_usd"] for t in totals.values()), 4),
            "margin_usd": _num(sum(t["margin_usd"] for t in totals.values()), 4),
        },
    }
    view["history"] = {
        "since": _iso(history.since),
        "window_h": history.window.total_seconds() / 3600.0,
        "cycles": len(history),
        "points": history.series(),
    }
    view["fourcp"] = _fourcp_view(state)
    view["plan"] = _plan_view(plan) if plan is not None else None
    view["events"] = _events_view(snap, now) if snap is not None else []
    faults = dict(state.faults)
    if snap is not None:
        for m in snap.miners:
            if m.fault is not None:
                faults.setdefault(m.device_id, m.fault)
        for n in snap.gpu_nodes:
            if n.fault is not None:
                faults.setdefault(n.device_id, n.fault)
    view["faults"] = [
        {"device": _text(d), "reason": _text(r)} for d, r in sorted(faults.items())[:MAX_ITEMS]
    ]
    view["faults_total"] = len(faults)
    derated = _thermal_derates(snap, config)
    view["derates"] = _derates(_Derates(derated) if derated is not None else state, plan, snap)
    sources = []
    for name, h in sorted(dict(state.sources).items())[:MAX_ITEMS]:
        since = h.last_success or state.started_at
        sources.append(
            {
                "name": _text(name),
                "up": h.last_success is not None and h.last_error is None,
                "age_s": _num(max(0.0, (now - since).total_seconds()), 1),
                "error": None if h.last_error is None else _text(h.last_error),
            }
        )
    view["sources"] = sources
    return view


def _fourcp_view(state: AgentState) -> dict[str, Any] | None:
    """The live 4CP account's latest month (``None`` before any 4CP-risk interval)."""
    figures = state.fourcp
    if figures is None or not figures.months:
        return None
    month = figures.months[-1]
    return {
        "month": _text(month.month),
        "peak_w": _num(month.peak.demand_w, 1),
        "source": _text(month.peak.source),
        "intervals": month.intervals,
        "charge_usd": _num(month.charge_usd, 2),
        "season_charge_usd": _num(dict(figures.seasons).get(month.month[:4]), 2),
    }


def _plan_view(plan: Plan) -> dict[str, Any]:
    return {
        "at": _iso(plan.at),
        "summary": _text(plan.summary) if plan.summary else "",
        "binding": [_text(b) for b in plan.binding[:MAX_ITEMS]],
        "value_usd_per_h": _num(plan.value_usd_per_h, 4),
        "cost_usd_per_h": _num(plan.cost_usd_per_h, 4),
        "margin_usd_per_h": _num(plan.margin_usd_per_h, 4),
        "actions_total": len(plan.actions),
        "actions": [
            {
                "device": _text(a.device_id),
                "kind": a.kind.value,
                "target": _text(a.target),
                "reason": _text(a.reason),
                "delta_w": _num(a.delta_power_w, 1),
                "job": None if a.job_id is None else _text(a.job_id),
            }
            for a in plan.actions[:MAX_ITEMS]
        ],
    }


def _events_view(snap: Snapshot, now: datetime) -> list[dict[str, Any]]:
    site_w = _finite(snap.measured_site_power_w)
    rows = []
    for a in snap.events[:MAX_ITEMS]:
        e = a.event
        target = event_target_w(a.event, a.baseline_w)
        target = None if target is None else _finite(target)
        shortfall = None
        if target is not None and site_w is not None:
            shortfall = max(0.0, site_w - target)
        rows.append(
            {
                "id": _text(e.event_id),
                "program": _text(e.program),
                "kind": e.kind.value,
                "mandatory": e.mandatory,
                "start": _iso(e.start),
                "end": _iso(e.end),
                "remaining_s": _num(max(0.0, (e.end - now).total_seconds()), 0),
                "target_w": _num(target, 1),
                "baseline_w": _num(a.baseline_w, 1),
                "site_w": _num(site_w, 1),
                "shortfall_w": _num(shortfall, 1),
                "compliant": None if shortfall is None else shortfall <= 0.0,
                "payment_usd_per_mwh": _num(e.payment_usd_per_mwh, 2),
                "penalty_usd_per_mwh": _num(e.penalty_usd_per_mwh, 2),
            }
        )
    return rows


# --- serving ------------------------------------------------------------------------------------

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
PATHS = frozenset({*_STATIC, "/view.json", "/events"})

# The page loads nothing from elsewhere and runs no inline code.
_SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Cache-Control: no-store\r\n"
)
_REASONS = {200: "OK", 405: "Method Not Allowed", 503: "Service Unavailable"}


# What a stream client may send after its request (nothing, normally) before it is dropped.
MAX_UPSTREAM_BYTES = 64 * 1024


class SlowClient(Exception):
    """A page client that did not take its data within the write deadline."""


@dataclass(slots=True)
class _Client:
    """One open event stream: its writer, when its unsent backlog began, and its end."""

    writer: asyncio.StreamWriter
    backlog_since: float | None = None  # monotonic s: unsent bytes waiting since then
    done: asyncio.Event = field(default_factory=asyncio.Event)


def static_file(name: str) -> bytes:
    """One of the page's files, from the package data."""
    return resources.files("agent.outputs").joinpath("page", name).read_bytes()


class OperatorPage:
    """The page's routes, its SSE clients and the watcher that feeds them.

    Hand it to :class:`agent.outputs.metrics.MetricsServer` as ``routes`` and run :meth:`run`
    beside the server (it returns when ``stop`` is set; closing the server ends the streams);
    :class:`agent.outputs.metrics.MetricsService`, the daemon's listener, does both.
    """

    def __init__(
        self,
        state: AgentState,
        config: AgentConfig | None = None,
        *,
        max_clients: int = 32,
        write_timeout_s: float = 2.0,
        max_buffer_bytes: int = 256 * 1024,
        heartbeat_s: float = 5.0,
        watch_s: float = 0.2,
        republish_s: float = 5.0,
        history: History | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.state = state
        self.config = config
        self.max_clients = max_clients
        self.write_timeout_s = write_timeout_s
        self.max_buffer_bytes = max_buffer_bytes
        self.heartbeat_s = heartbeat_s
        self.watch_s = watch_s
        self.republish_s = republish_s
        if history is None:
            interval_s = config.control.interval_s if config is not None else 15.0
            cycles = min(10_000, math.ceil(DAY.total_seconds() / interval_s) + 1)
            history = History(max_cycles=max(2, cycles), max_gap_s=max(60.0, 4 * interval_s))
        self.history = history
        self.clock = clock
        self._files = {path: (static_file(name), ctype) for path, (name, ctype) in _STATIC.items()}
        self._json = b"{}"
        self._message = b""
        self._clients: dict[asyncio.StreamWriter, _Client] = {}
        self._closing = False
        self._emptied = asyncio.Event()
        self._last_plan: Plan | None = None
        self.published_at: datetime | None = None
        self.refused = 0  # stream clients turned away (503)
        self.dropped_slow = 0  # stream clients dropped for missing the write deadline
        self.publishes = 0  # views built and handed out
        self.fanout_s = 0.0  # time spent handing views to stream clients, all publishes

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # --- producing views ------------------------------------------------------------------------

    def _pool_fee(self) -> float:
        return self.config.economics.pool_fee if self.config is not None else 0.0

    def publish(self) -> dict[str, Any]:
        """Build the view from the state now (recording a new cycle once) and send it to all."""
        snap, plan = self.state.snapshot, self.state.plan
        rates = None
        if snap is not None:
            rates = workload_rates(snap, energy_price_usd_per_mwh(snap, plan), self._pool_fee())
            if plan is not None and plan is not self._last_plan:
                self._last_plan = plan
                self.history.record(snap.at, snap.measured_site_power_w, plan.limit_w, rates)
        now = self.clock()
        view = build_view(self.state, self.config, self.history, rates, now)
        payload = json.dumps(view, allow_nan=False, separators=(",", ":")).encode()
        self._json = payload
        # One line of data: compact JSON escapes every newline inside strings. Serialised once
        # per view; every client gets these same bytes.
        self._message = b"event: view\ndata: " + payload + b"\n\n"
        self.published_at = now
        # Fan-out in one pass, no task switch per client: each write goes to the socket at once
        # or into that client's bounded buffer, and a client that cannot keep up is dropped.
        # The only per-client work: one write and a look at its backlog (timed for benches).
        mono = time.monotonic()
        started = time.perf_counter()
        for client in list(self._clients.values()):
            self._offer(client, self._message, mono)
        self.fanout_s += time.perf_counter() - started
        self.publishes += 1
        return view

    def _offer(self, client: _Client, data: bytes, mono: float) -> None:
        writer = client.writer
        if client.done.is_set():
            return
        if writer.is_closing():
            client.done.set()  # the peer went away: its task ends now
            return
        writer.write(data)
        backlog = writer.transport.get_write_buffer_size()
        if backlog == 0:
            client.backlog_since = None
            return
        if client.backlog_since is None:
            client.backlog_since = mono
        if backlog > self.max_buffer_bytes:
            self._drop(client, f"{backlog} bytes unread")
        elif mono - client.backlog_since > self.write_timeout_s:
            self._drop(client, f"no progress in {self.write_timeout_s} s")

    def _drop(self, client: _Client, why: str) -> None:
        self.dropped_slow += 1
        log.info("page: dropped a slow client (%s)", why)
        client.done.set()
        client.writer.transport.abort()  # discard what it did not read

    async def run(self, stop: asyncio.Event) -> None:
        """Publish at every new plan (and every ``republish_s``) until ``stop``.

        Streams stay open when it returns: the listener's ``close()`` ends them after it stops
        accepting, so browsers that reconnect at once find the port closed. (Ending streams
        first invites a reconnect into the listener's close, which Python 3.11's asyncio can
        leak a socket on.)
        """
        loop = asyncio.get_running_loop()
        self._closing = False
        self.publish()
        last, seen = loop.time(), self.state.cycles
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.watch_s):
                    await stop.wait()
            # A cycle counts itself when it has finished (after its plan, actions and
            # observers): publishing on the count, not on the plan swapped in mid-cycle, keeps
            # building the view and the fan-out between cycles, never inside one.
            fresh = self.state.cycles != seen
            if fresh or loop.time() - last >= self.republish_s:
                self.publish()
                last, seen = loop.time(), self.state.cycles

    async def close(self) -> None:
        """End every stream (clients see the connection close) and refuse new ones."""
        self._closing = True
        for client in list(self._clients.values()):
            client.done.set()
            client.writer.close()
        if self._clients:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._emptied.wait()

    # --- serving --------------------------------------------------------------------------------

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Responder | None:
        """The responder for a page path, or None when the path is not the page's."""
        if path not in PATHS:
            return None
        if method != "GET":
            return self._method_not_allowed
        if path == "/events":
            return self._stream
        if path == "/view.json":
            return self._view_json
        body, ctype = self._files[path]
        return lambda _reader, writer: self._send(writer, 200, ctype, body)

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, extra: str = ""
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{_SECURITY_HEADERS}{extra}Connection: close\r\n\r\n"
        ).encode("latin-1")
        await self._write(writer, head + body)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        if writer.transport.get_write_buffer_size() > self.max_buffer_bytes:
            raise SlowClient("too much unread data")
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except TimeoutError as exc:
            raise SlowClient(f"no progress in {self.write_timeout_s} s") from exc

    async def _method_not_allowed(
        self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(SlowClient):
            await self._send(
                writer, 405, "text/plain", b"read-only: GET only\n", extra="Allow: GET\r\n"
            )

    async def _view_json(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(SlowClient):
            await self._send(writer, 200, "application/json", self._json)

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._clients) >= self.max_clients:
            self.refused += 1
            with contextlib.suppress(SlowClient):
                await self._send(
                    writer,
                    503,
                    "text/plain",
                    b"too many page clients: try again later\n",
                    extra="Retry-After: 10\r\n",
                )
            return
        client = _Client(writer)
        self._clients[writer] = client
        try:
            await self._serve_stream(reader, client)
        except SlowClient as exc:
            self._drop(client, str(exc))
        finally:
            del self._clients[writer]
            if not self._clients:
                self._emptied.set()

    async def _serve_stream(self, reader: asyncio.StreamReader, client: _Client) -> None:
        writer = client.writer
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            f"{_SECURITY_HEADERS}X-Accel-Buffering: no\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # A small kernel buffer per stream: a client that stops reading is found (and
            # dropped) after a few hundred KiB, not after megabytes of autotuned buffer.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.max_buffer_bytes)
        # ``retry``: how long the browser waits before reconnecting after the stream ends.
        await self._write(writer, head + b"retry: 2000\n\n" + self._message)
        # Views arrive through publish(); this task only keeps the stream alive and ends it.
        # A peer that hangs up ends it at once (no views written to a closed stream).
        eof = asyncio.create_task(self._until_eof(reader, client))
        try:
            while not (client.done.is_set() or reader.at_eof() or writer.is_closing()):
                try:
                    async with asyncio.timeout(self.heartbeat_s):
                        await client.done.wait()
                except TimeoutError:
                    # A comment line, under the write deadline: keeps proxies from timing out,
                    # finds dead peers and clients that stopped reading between two views.
                    await self._write(writer, b": keep-alive\n\n")
        finally:
            eof.cancel()

    @staticmethod
    async def _until_eof(reader: asyncio.StreamReader, client: _Client) -> None:
        """Ends the stream when the peer hangs up, or sends more than a request's worth."""
        sent = 0
        with contextlib.suppress(OSError):
            while sent <= MAX_UPSTREAM_BYTES:
                data = await reader.read(4096)
                if not data:
                    break
                sent += len(data)
        client.done.set()
