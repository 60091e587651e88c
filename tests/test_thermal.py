"""Thermal derate: the pure ceiling rule (steps, hysteresis, hold) and the policy honouring it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from agent.control.domain import ActionKind
from agent.control.policy import decide
from agent.control.thermal import Ceiling, ThermalConfig, ThermalLimit, next_ceiling
from agent.runtime.thermal import ThermalGuard
from tests.test_policy import T0, config, miner, node, snapshot

LIMIT = ThermalLimit(max_c=100.0, resume_c=92.0, step_s=60.0)
TOP = 4  # sleep, -2, -1, default, +1


def test_hot_steps_down_one_point_from_where_it_is() -> None:
    c = next_ceiling(LIMIT, 104.0, current_index=4, top_index=TOP, ceiling=None, now_s=0.0)
    assert c == Ceiling(3, 0.0, 104.0)


def test_still_hot_steps_again_only_after_the_hold_time() -> None:
    c = Ceiling(3, 0.0, 104.0)
    assert next_ceiling(LIMIT, 103.0, 3, TOP, c, now_s=30.0) is c  # temperatures lag power
    assert next_ceiling(LIMIT, 103.0, 3, TOP, c, now_s=61.0) == Ceiling(2, 61.0, 103.0)


def test_in_the_hysteresis_band_nothing_moves() -> None:
    c = Ceiling(3, 0.0, 104.0)
    for t in (95.0, 99.9, 92.0, 100.0):
        assert next_ceiling(LIMIT, t, 3, TOP, c, now_s=1000.0) is c


def test_cool_steps_back_up_one_point_per_hold_and_lifts_at_the_top() -> None:
    c = Ceiling(2, 0.0, 104.0)
    assert next_ceiling(LIMIT, 85.0, 2, TOP, c, now_s=10.0) is c  # not held long enough
    up = next_ceiling(LIMIT, 85.0, 2, TOP, c, now_s=60.0)
    assert up == Ceiling(3, 60.0, 85.0)
    assert next_ceiling(LIMIT, 85.0, 3, TOP, up, now_s=120.0) is None


def test_down_to_sleep_and_no_further() -> None:
    c = next_ceiling(LIMIT, 120.0, 1, TOP, None, 0.0)
    assert c == Ceiling(0, 0.0, 120.0)
    assert next_ceiling(LIMIT, 120.0, 0, TOP, c, 100.0) is c
    asleep = next_ceiling(LIMIT, 120.0, 0, TOP, None, 0.0)
    assert asleep is not None
    assert asleep.index == 0


def test_no_fresh_temperature_changes_nothing() -> None:
    c = Ceiling(2, 0.0, 104.0)
    assert next_ceiling(LIMIT, None, 2, TOP, c, 1e6) is c
    assert next_ceiling(LIMIT, float("nan"), 2, TOP, None, 0.0) is None


def test_resume_must_be_below_max() -> None:
    with pytest.raises(ValidationError, match=r"resume_c 100\.0 must be below max_c 100\.0"):
        ThermalLimit(max_c=100, resume_c=100)


def test_policy_never_plans_a_derated_miner_above_its_ceiling_and_says_why() -> None:
    why = "hottest chip 104 °C > 100 °C"
    hot = miner("hot", "S21-ladder", "stock", max_point="eco", derate=why)
    cool = miner("cool", "S21-ladder", "stock")
    plan = decide(snapshot(0.0, [hot, cool]), config(limit_kw=100.0), T0)
    assert plan.miner_points == {"hot": "eco", "cool": "stock"}
    (action,) = [a for a in plan.actions if a.device_id == "hot"]
    assert action.kind is ActionKind.SET_PROFILE
    assert "thermal derate: hottest chip 104 °C > 100 °C" in action.reason
    assert "thermal derate: 1 miner(s), 0 GPU node(s)" in plan.summary


def test_policy_lowers_a_derated_gpu_node_cap_and_says_why() -> None:
    from drivers.jobs.base import JobClass
    from tests.test_policy import job

    hot = node("gpu1", job("j1", JobClass.SLA), cap_w=700.0, max_cap_w=600.0, derate="GPU 91 °C")
    plan = decide(snapshot(0.0, nodes=[hot]), config(limit_kw=100.0), T0)
    assert plan.gpu_caps_w["gpu1"] <= 600.0
    (action,) = [a for a in plan.actions if a.kind is ActionKind.SET_GPU_CAP]
    assert "thermal derate: GPU 91 °C" in action.reason


def test_guard_derates_a_hot_gpu_node_one_cap_step_and_lifts_it_with_hysteresis() -> None:
    cfg = ThermalConfig(gpu=ThermalLimit(max_c=85, resume_c=78, step_s=10))
    guard = ThermalGuard(cfg, gpu_cap_step_w=100.0)
    view = node("gpu1", cap_w=700.0)
    hot = replace(view, temperature_c=88.0)  # the fleet's view: its hottest card
    (derated,) = guard.apply_gpu_nodes((hot,), now_s=0.0)
    assert derated.max_cap_w == 600.0
    assert derated.derate == "hottest GPU 88 °C > 85 °C"
    assert guard.derates["gpu_node"] == 1
    warm = replace(view, cap_w=600.0, temperature_c=80.0)  # in the band: held
    (held,) = guard.apply_gpu_nodes((warm,), now_s=20.0)
    assert held.max_cap_w == 600.0
    cool = replace(view, cap_w=600.0, temperature_c=70.0)
    (lifted,) = guard.apply_gpu_nodes((cool,), now_s=30.0)
    assert lifted.max_cap_w == 700.0
    assert lifted.derate is None
    assert guard.derated == {}


def test_guard_leaves_faulted_and_unread_miners_alone() -> None:
    cfg = ThermalConfig(miner=ThermalLimit(max_c=100, resume_c=90, step_s=0))
    guard = ThermalGuard(cfg, gpu_cap_step_w=100.0)
    a = miner("a", "S21-ladder", "stock")  # no fresh reading: no temperature
    b = miner("b", "S21-ladder", "stock", fault="x", temperature_c=130.0)
    out = guard.apply_miners((a, b), now_s=0.0)
    assert [v.max_point for v in out] == [None, None]
    out = guard.apply_miners((replace(a, temperature_c=104.0), b), now_s=1.0)
    assert [v.max_point for v in out] == ["eco", None]
