"""The site model's snapshot assembly, the one way the coordinator and the backtest build one."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from agent.control.cooling import SiteLoadModel
from agent.control.domain import PriceView
from agent.control.site import assemble_snapshot, device_power_w
from tests.sample_state import NOW, sample_snapshot


def test_device_power_is_the_sum_of_readings_or_none_when_one_is_missing() -> None:
    snap = sample_snapshot()
    # 3510 + 3490 + 30 + 3068 (miners) + 4800 (the GPU node), in W.
    assert device_power_w(snap.miners, snap.gpu_nodes) == 14_898.0
    blind = replace(snap.miners[0], measured_power_w=None)
    assert device_power_w((blind, *snap.miners[1:]), snap.gpu_nodes) is None
    assert device_power_w((), ()) == 0


def test_assembly_carries_every_part_and_ages_the_price() -> None:
    parts = sample_snapshot()
    load = SiteLoadModel(fixed_w=1_000.0)
    start = NOW - timedelta(minutes=15)
    snap = assemble_snapshot(
        NOW,
        price=(812.5, start, 60.0),
        hashprice_usd_per_ph_day=55.0,
        miners=parts.miners,
        gpu_nodes=parts.gpu_nodes,
        events=parts.events,
        day_ahead_usd_per_mwh=300.0,
        fourcp=(0.25, "near the monthly peak"),
        site_power_w=18_898.0,
        device_power_w=14_898.0,
        load_model=load,
        ramp_headroom_w=5_000.0,
        horizon=None,
    )
    assert snap.price == PriceView(812.5, start, 60.0)
    assert (snap.fourcp_risk, snap.fourcp_reason) == (0.25, "near the monthly peak")
    assert (snap.measured_site_power_w, snap.device_power_w) == (18_898.0, 14_898.0)
    assert (snap.load_model, snap.ramp_headroom_w) == (load, 5_000.0)
    assert (snap.miners, snap.gpu_nodes, snap.events) == (
        parts.miners,
        parts.gpu_nodes,
        parts.events,
    )
    assert (snap.at, snap.hashprice_usd_per_ph_day, snap.day_ahead_usd_per_mwh) == (
        NOW,
        55.0,
        300.0,
    )
    no_price = assemble_snapshot(
        NOW,
        price=None,
        hashprice_usd_per_ph_day=55.0,
        miners=(),
        gpu_nodes=(),
        events=(),
        day_ahead_usd_per_mwh=None,
        fourcp=(0.0, ""),
        site_power_w=None,
        device_power_w=None,
        load_model=load,
        ramp_headroom_w=float("inf"),
        horizon=None,
    )
    assert no_price.price is None
