"""The dispatch policy: a pure function from a Snapshot to a Plan.

``decide(snapshot, config, now)`` does no I/O and reads no clock, so the same function runs
live, in ``plan --dry-run`` and in the backtest. The rule (design.md): rank every operating-point
step by value per MWh, run the best while their value beats the effective energy price, never
exceed any limit, shed the least valuable first, restore the most valuable first, and do not
flap (hysteresis on price, minimum on and off times per device).

v1 dispatches miners. GPU nodes and AI jobs are held at their commanded state and counted at
their worst-case power, so limits stay safe while the GPU merit order is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.config import AgentConfig
from agent.domain import (
    SLEEP,
    Action,
    ActionKind,
    ActiveEvent,
    MinerView,
    Plan,
    Snapshot,
)
from agent.economics import energy_cost_usd_per_h, mining_revenue_usd_per_h


@dataclass(slots=True)
class _Step:
    """Moving one miner from rung ``index - 1`` to rung ``index`` of its ladder."""

    miner: MinerView
    index: int
    delta_w: float  # per unit; the block total is × miner.count
    value_usd_per_mwh: float  # marginal revenue of the step per MWh it adds
    currently_on: bool
    forced_on: bool  # minimum on time keeps it running
    blocked: bool  # minimum off time keeps it asleep


def effective_limit_w(snapshot: Snapshot, config: AgentConfig) -> tuple[float, list[str]]:
    """The strictest site limit in force now, and the names of the limits that set it."""
    site = config.site
    limit = (site.interconnect_limit_kw - site.safety_margin_kw) * 1000.0
    binding = ["interconnect"]
    for active in snapshot.events:
        target = event_limit_w(active)
        if target is None:
            continue
        target -= site.safety_margin_kw * 1000.0
        if target < limit:
            limit, binding = target, [f"event:{active.event.event_id}"]
    return max(limit, 0.0), binding


def event_limit_w(active: ActiveEvent) -> float | None:
    """The site-load ceiling an event asks for (the stricter of its two target forms)."""
    event = active.event
    limits = []
    if event.max_site_kw is not None:
        limits.append(event.max_site_kw * 1000.0)
    if event.shed_kw is not None:
        limits.append(active.baseline_w - event.shed_kw * 1000.0)
    return min(limits) if limits else None


def decide(snapshot: Snapshot, config: AgentConfig, now: datetime) -> Plan:
    """Choose every device's operating point for the next cycle, with a reason per change."""
    control = config.control
    prices = config.prices
    fee = config.economics.pool_fee
    hashprice = snapshot.hashprice_usd_per_ph_day
    limit_w, binding = effective_limit_w(snapshot, config)

    price_note = ""
    if snapshot.price is None or snapshot.price.age_s > prices.max_age_s:
        age = (
            "no price yet"
            if snapshot.price is None
            else f"price is {snapshot.price.age_s:.0f} s old"
        )
        if prices.safe_mode == "hold":
            return _hold_plan(snapshot, limit_w, binding, f"{age}: safe mode hold")
        price = prices.safe_mode_price_usd_per_mwh
        price_note = f"{age}: safe mode, pricing at {price:.0f} $/MWh"
    else:
        price = snapshot.price.usd_per_mwh
    hyst = control.hysteresis_usd_per_mwh

    # Load the policy does not steer this cycle: faulted miners and (v1) GPU nodes.
    fixed_w = 0.0
    for m in snapshot.miners:
        if not m.controllable:
            fixed_w += m.worst_case_power_w * m.count
    for n in snapshot.gpu_nodes:
        fixed_w += n.worst_case_power_w * n.count

    steps: list[_Step] = []
    base_w = fixed_w
    committed_w = fixed_w  # power of what is commanded now, to apply the ramp limit
    for m in snapshot.miners:
        if not m.controllable:
            continue
        base_w += m.points[0].power_w * m.count
        current = _index(m, m.commanded)
        committed_w += m.points[current].power_w * m.count
        held_s = (now - m.commanded_since).total_seconds()
        asleep = current == 0
        for i in range(1, len(m.points)):
            lo, hi = m.points[i - 1], m.points[i]
            delta_w = hi.power_w - lo.power_w
            rev = mining_revenue_usd_per_h(hi.hashrate_ths - lo.hashrate_ths, hashprice, fee)
            value = rev / (delta_w / 1e6) if delta_w > 0 else float("inf")
            steps.append(
                _Step(
                    miner=m,
                    index=i,
                    delta_w=delta_w,
                    value_usd_per_mwh=value,
                    currently_on=current >= i,
                    forced_on=(not asleep) and i == 1 and held_s < control.min_on_s,
                    blocked=asleep and held_s < control.min_off_s,
                )
            )

    # Most valuable first; among equals, keep what runs (no churn), then by id for determinism.
    steps.sort(key=lambda s: (-s.value_usd_per_mwh, not s.currently_on, s.miner.device_id, s.index))

    target: dict[str, int] = {m.device_id: 0 for m in snapshot.miners if m.controllable}
    why: dict[str, str] = {}
    total_w = base_w
    added_w = 0.0  # power above the committed level, bounded by the ramp headroom
    ramp_w = snapshot.ramp_headroom_w

    # Pass 1: steps the minimum on time keeps running, as long as the limit allows.
    for s in steps:
        if s.forced_on and s.currently_on:
            grow = s.delta_w * s.miner.count
            if total_w + grow <= limit_w:
                total_w += grow
                target[s.miner.device_id] = max(target[s.miner.device_id], s.index)
                why[s.miner.device_id] = f"minimum on time ({control.min_on_s:.0f} s) not reached"
    # Pass 2: everything else in merit order.
    for s in steps:
        mid = s.miner.device_id
        if target[mid] >= s.index or target[mid] != s.index - 1:
            continue  # already taken, or its lower rung was not taken
        threshold = price - hyst if s.currently_on else price + hyst
        if s.value_usd_per_mwh < threshold:
            continue
        if s.blocked and not s.currently_on:
            why.setdefault(mid, f"minimum off time ({control.min_off_s:.0f} s) not reached")
            continue
        grow = s.delta_w * s.miner.count
        if total_w + grow > limit_w:
            why.setdefault(mid, f"{binding[0]} limit {limit_w / 1000:,.0f} kW reached")
            continue
        # Power that is already committed does not count against the ramp limit.
        is_new = not s.currently_on
        if is_new and added_w + grow > ramp_w:
            why.setdefault(mid, f"ramp limit: {ramp_w / 1000:,.0f} kW more this cycle")
            continue
        total_w += grow
        if is_new:
            added_w += grow
        target[mid] = s.index

    actions: list[Action] = []
    value_h = 0.0
    points: dict[str, str] = {}
    by_id = {m.device_id: m for m in snapshot.miners}
    for mid, idx in target.items():
        m = by_id[mid]
        point = m.points[idx]
        points[mid] = point.name
        value_h += mining_revenue_usd_per_h(point.hashrate_ths, hashprice, fee) * m.count
        current = _index(m, m.commanded)
        if idx == current:
            continue
        actions.append(_miner_action(m, current, idx, price, hyst, why.get(mid), price_note))
    for m in snapshot.miners:
        if not m.controllable:
            points[m.device_id] = m.commanded

    # Shed before start (design.md); within each, biggest change first.
    actions.sort(key=lambda a: (not a.sheds, -abs(a.delta_power_w)))
    cost_h = energy_cost_usd_per_h(total_w, price)
    summary = (
        f"price {price:.2f} $/MWh, limit {limit_w / 1000:,.0f} kW ({binding[0]}), "
        f"planned {total_w / 1000:,.1f} kW, {len(actions)} action(s)"
    )
    if price_note:
        summary = f"{price_note}; {summary}"
    return Plan(
        at=now,
        limit_w=limit_w,
        planned_power_w=total_w,
        effective_price_usd_per_mwh=price,
        value_usd_per_h=value_h,
        cost_usd_per_h=cost_h,
        miner_points=points,
        actions=tuple(actions),
        summary=summary,
        binding=tuple(binding),
    )


def _index(m: MinerView, name: str) -> int:
    for i, p in enumerate(m.points):
        if p.name == name:
            return i
    return 0


def _miner_action(
    m: MinerView, current: int, idx: int, price: float, hyst: float, why: str | None, note: str
) -> Action:
    old, new = m.points[current], m.points[idx]
    delta_w = (new.power_w - old.power_w) * m.count
    if idx == 0:
        kind = ActionKind.SLEEP
    elif current == 0:
        kind = ActionKind.WAKE
    else:
        kind = ActionKind.SET_PROFILE
    if why is None:
        shed = idx < current
        rung = old.name if shed else new.name
        why = f"price {price:.2f} $/MWh {'above' if shed else 'below'} the value of {rung}"
    reason = f"{m.model} {old.name} -> {new.name}: {why}"
    if note:
        reason = f"{reason} ({note})"
    return Action(
        device_id=m.device_id, kind=kind, target=new.name, reason=reason, delta_power_w=delta_w
    )


def _hold_plan(snapshot: Snapshot, limit_w: float, binding: list[str], why: str) -> Plan:
    """Keep every device where it was commanded (safe mode ``hold``), except to meet a limit."""
    points = {m.device_id: m.commanded for m in snapshot.miners}
    total = sum(m.point(m.commanded).power_w * m.count for m in snapshot.miners if m.controllable)
    total += sum(m.worst_case_power_w * m.count for m in snapshot.miners if not m.controllable)
    total += sum(n.worst_case_power_w * n.count for n in snapshot.gpu_nodes)
    actions: list[Action] = []
    if total > limit_w:
        # Holding must still respect limits: sleep the least efficient until under the limit.
        running = sorted(
            (m for m in snapshot.miners if m.controllable and m.commanded != SLEEP),
            key=lambda m: (
                m.point(m.commanded).hashrate_ths / max(m.point(m.commanded).power_w, 1.0)
            ),
        )
        for m in running:
            if total <= limit_w:
                break
            delta = (m.points[0].power_w - m.point(m.commanded).power_w) * m.count
            total += delta
            points[m.device_id] = SLEEP
            actions.append(
                Action(
                    m.device_id, ActionKind.SLEEP, SLEEP, f"{why}; over {binding[0]} limit", delta
                )
            )
    return Plan(
        at=snapshot.at,
        limit_w=limit_w,
        planned_power_w=total,
        effective_price_usd_per_mwh=snapshot.price.usd_per_mwh if snapshot.price else 0.0,
        value_usd_per_h=0.0,
        cost_usd_per_h=0.0,
        miner_points=points,
        actions=tuple(actions),
        summary=why,
        binding=tuple(binding),
    )
