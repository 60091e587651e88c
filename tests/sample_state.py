"""A realistic, hand-built AgentState (real Snapshot/Plan objects) for output tests.

The site: 4 miners of two models (one faulted, one asleep), one GPU node with two jobs, one
active grid event, a price, counters and source health. Every figure is chosen so a test can
work out the expected metric by hand.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from agent.control.config import AgentConfig, parse_config
from agent.control.domain import (
    SLEEP,
    Action,
    ActionKind,
    ActiveEvent,
    GpuNodeView,
    JobView,
    MinerView,
    OperatingPoint,
    Plan,
    PriceView,
    Snapshot,
)
from agent.runtime.meter import MeterStatus
from agent.runtime.state import AgentState, SourceHealth
from drivers.gpus.base import GpuReading
from drivers.grid.base import GridEvent, ProgramKind
from drivers.jobs.base import JobClass, JobState

NOW = datetime(2023, 9, 6, 20, 0, tzinfo=UTC)
STARTED = NOW - timedelta(hours=1)


def sample_config() -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "west-1", "interconnect_limit_kw": 500},
            "prices": {"realtime": {"type": "constant", "value": 40.0}},
            "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 55.0}},
            "miner_models": {
                "S19jPro": {"profiles": [{"name": "stock", "power_w": 3068, "hashrate_ths": 104}]},
                "S21": {"profiles": [{"name": "stock", "power_w": 3500, "hashrate_ths": 200}]},
            },
            "mqtt": {"command_tokens": {"operator": "op-token-123"}},
        }
    )


def _points(power_w: float, ths: float) -> tuple[OperatingPoint, ...]:
    return (OperatingPoint(SLEEP, 30.0), OperatingPoint("stock", power_w, ths))


def sample_snapshot(at: datetime = NOW) -> Snapshot:
    since = at - timedelta(minutes=30)
    miners = (
        MinerView("m-001", "S21", _points(3500, 200), 3500, "stock", since, 3510.0, 199.5, 5.0),
        MinerView("m-002", "S21", _points(3500, 200), 3500, "stock", since, 3490.0, 200.5, 5.0),
        MinerView("m-003", "S19jPro", _points(3068, 104), 3068, SLEEP, since, 30.0, 0.0, 5.0),
        MinerView(
            "m-004",
            "S19jPro",
            _points(3068, 104),
            3068,
            "stock",
            since,
            3068.0,
            104.0,
            5.0,
            fault="ignored sleep command",
        ),
    )
    jobs = (
        JobView("j1", JobClass.SLA, JobState.RUNNING, 4, "g-01", 2.5, 500.0, since),
        JobView("j2", JobClass.FILLER, JobState.SUSPENDED, 4, "g-01", 0.6, 0.0, since),
    )
    node = GpuNodeView("g-01", 8, 200.0, 700.0, 70.0, 1500.0, 700.0, jobs, 4800.0, 3.0)
    event = GridEvent(
        "ev-1",
        "grid:openadr",
        "ercot-ers",
        ProgramKind.EMERGENCY,
        at - timedelta(minutes=5),
        at + timedelta(hours=1),
        max_site_kw=14.0,
    )
    return Snapshot(
        at=at,
        price=PriceView(812.5, at - timedelta(minutes=15), 60.0),
        hashprice_usd_per_ph_day=55.0,
        miners=miners,
        gpu_nodes=(node,),
        events=(ActiveEvent(event, baseline_w=20_000.0),),
        day_ahead_usd_per_mwh=300.0,
        fourcp_risk=0.25,
        measured_site_power_w=18_898.0,
    )


def sample_plan(at: datetime = NOW) -> Plan:
    return Plan(
        at=at,
        limit_w=14_000.0,
        planned_power_w=13_800.0,
        effective_price_usd_per_mwh=812.5,
        value_usd_per_h=12.5,
        cost_usd_per_h=11.2,
        miner_points={"m-001": "stock", "m-002": SLEEP},
        actions=(
            Action("m-002", ActionKind.SLEEP, SLEEP, "price 812.5 above breakeven 131", -3460.0),
        ),
        summary="shed 1 miner for event ev-1",
        binding=("event:ev-1",),
    )


def sample_state() -> AgentState:
    state = AgentState(site_id="west-1", started_at=STARTED)
    state.snapshot = sample_snapshot()
    state.plan = sample_plan()
    state.cycles = 240
    state.last_cycle_at = NOW - timedelta(seconds=2)
    state.last_cycle_duration_s = 0.125
    state.actions = Counter({("sleep", "ok"): 7, ("wake", "ok"): 5, ("sleep", "not_applied"): 1})
    state.rejected = Counter({("price:realtime", "nan"): 2, ("mqtt", "unauthorized"): 1})
    state.sources = {
        "price:realtime": SourceHealth(
            "price:realtime", NOW - timedelta(seconds=90), None, 0.02, 59, 0
        ),
        "grid:openadr": SourceHealth("grid:openadr", None, "connection refused", 5.0, 0, 12),
        "miners": SourceHealth("miners", NOW - timedelta(seconds=8), None, 1.5, 300, 3),
    }
    state.faults = {"m-004": "ignored sleep command"}
    state.mode = "auto"
    state.gpu_readings = {
        "g-01": tuple(
            GpuReading(
                device_id=f"GPU-0000-{i}",
                index=i,
                name="NVIDIA H100 80GB HBM3",
                at=NOW,
                power_w=400.0 + i,
                power_limit_w=700.0,
                min_limit_w=200.0,
                max_limit_w=700.0,
                default_limit_w=700.0,
                utilization_pct=50.0 + i,
                memory_used_mib=1024.0,
                memory_total_mib=81559.0,
                temperature_c=60.0 + i,
                energy_j=1e6 + i,
            )
            for i in range(2)
        )
    }
    # A trusted revenue meter: the devices' 17,900 W + 4 % cooling + a learned 282 W trim.
    state.meter = MeterStatus(
        configured=True,
        trusted=True,
        source="meter",
        reason=None,
        meter_w=18_898.0,
        meter_age_s=1.5,
        device_w=17_900.0,
        site_w=18_898.0,
        cooling_w=716.0,
        trim_w=282.0,
        ambient_c=31.0,
        fallbacks=1,
        errors=2,
    )
    return state
