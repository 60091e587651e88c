"""Thermal derates in the runtime: one ceiling per device, moved by the pure rule each snapshot.

The coordinator hands every snapshot's views through :meth:`ThermalGuard.apply_miners` and
:meth:`ThermalGuard.apply_gpu_nodes`. Each view carries its temperature, set by its fleet from
fresh readings only: a miner's hottest chip on any board, a GPU node's hottest card. A derated
miner's view carries ``max_point`` (the policy plans nothing above it) and the reason; a derated
node's view has ``max_cap_w`` lowered to its ceiling cap. Step-downs are counted per kind for
``/metrics``; the loop publishes the counts and the derated devices.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

from agent.control.domain import GpuNodeView, MinerView
from agent.control.policy import cap_levels_w
from agent.control.thermal import Ceiling, ThermalConfig, next_ceiling

log = logging.getLogger(__name__)


class ThermalGuard:
    """Keeps each device's derate ceiling with its hysteresis."""

    def __init__(self, config: ThermalConfig, gpu_cap_step_w: float) -> None:
        self.config = config
        self.gpu_cap_step_w = gpu_cap_step_w
        self.ceilings: dict[str, Ceiling] = {}
        # For outputs, through the loop: kind -> step-downs so far; derated device -> kind.
        self.derates: Counter[str] = Counter()
        self.derated: dict[str, str] = {}

    def apply_miners(self, views: tuple[MinerView, ...], now_s: float) -> tuple[MinerView, ...]:
        limit = self.config.miner
        if limit is None:
            return views
        out = []
        for v in views:
            current = next((i for i, p in enumerate(v.points) if p.name == v.commanded), 0)
            old = self.ceilings.get(v.device_id)
            temp = v.temperature_c if v.fault is None else None
            new = next_ceiling(limit, temp, current, len(v.points) - 1, old, now_s)
            self._record(v.device_id, "miner", old, new, temp)
            if new is None:
                out.append(v)
                continue
            point = v.points[new.index]
            why = f"hottest chip {new.temperature_c:.0f} °C > {limit.max_c:g} °C"
            if temp is not None and temp <= limit.max_c:
                why = (
                    f"held at {point.name} until below {limit.resume_c:g} °C "
                    f"(now {temp:.0f} °C; stepped down at {new.temperature_c:.0f} °C)"
                )
            out.append(replace(v, max_point=point.name, derate=why))
        return tuple(out)

    def apply_gpu_nodes(
        self, views: tuple[GpuNodeView, ...], now_s: float
    ) -> tuple[GpuNodeView, ...]:
        limit = self.config.gpu
        if limit is None:
            return views
        out = []
        for v in views:
            levels = cap_levels_w(v.min_cap_w, v.max_cap_w, self.gpu_cap_step_w)
            temp = v.temperature_c if v.fault is None else None
            current = max((i for i, c in enumerate(levels) if c <= v.cap_w + 0.5), default=0)
            old = self.ceilings.get(v.device_id)
            new = next_ceiling(limit, temp, current, len(levels) - 1, old, now_s)
            self._record(v.device_id, "gpu_node", old, new, temp)
            if new is None:
                out.append(v)
                continue
            why = f"hottest GPU {new.temperature_c:.0f} °C > {limit.max_c:g} °C"
            out.append(replace(v, max_cap_w=levels[new.index], derate=why))
        return tuple(out)

    def _record(
        self,
        device_id: str,
        kind: str,
        old: Ceiling | None,
        new: Ceiling | None,
        temp: float | None,
    ) -> None:
        if new is None:
            self.ceilings.pop(device_id, None)
            if self.derated.pop(device_id, None) is not None:
                log.info("%s %s: thermal derate lifted (%.0f °C)", kind, device_id, temp or 0.0)
            return
        self.ceilings[device_id] = new
        self.derated[device_id] = kind
        if old is None or new.index < old.index:
            self.derates[kind] += 1
            log.warning(
                "%s %s: thermal derate to step %d at %.0f °C",
                kind,
                device_id,
                new.index,
                new.temperature_c,
            )
