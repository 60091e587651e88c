"""The fleet protocol is the runtime's only door to devices: any implementation can be driven.

A third fleet, written here against :class:`agent.runtime.fleet.Fleet` only (as the node agents
of the next issue will be), joins the real Agent next to nothing else: the coordinator puts its
views in the snapshot, the policy sheds it on a price spike, the actuator hands it the actions
(with retries and audit), its verification reports a command that was accepted but not applied,
and the loop publishes its faults and counters. Its devices are in-process stand-ins for remote
miners: that is what a node agent's fleet sees of them too (views and acknowledgements).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agent.control.config import parse_config
from agent.control.domain import SLEEP, Action, ActionKind, MinerView, OperatingPoint
from agent.runtime.fleet import Fleet, FleetViews, NotApplied
from agent.runtime.loop import Agent, Components
from agent.runtime.wiring import ConstantPrice
from drivers.errors import CommandRejected
from tests.test_e2e_miners import until

POINTS = (OperatingPoint(SLEEP, 30.0), OperatingPoint("default", 3500.0, 200.0))


@dataclass
class RemoteMiner:
    point: str = "default"
    ignores_commands: bool = False  # acknowledges, then stays where it is
    refuses: bool = False  # answers every command with an error


@dataclass
class RemoteFleet:
    """Miners behind a node agent, as the controller sees them: views in, commands out."""

    devices: dict[str, RemoteMiner]
    targets: dict[str, str] = field(default_factory=dict)  # what the controller commanded
    since: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(hours=1))
    awaiting: dict[str, Action] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)
    applied: list[Action] = field(default_factory=list)
    _polled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return "remote"

    @property
    def polled(self) -> asyncio.Event:
        return self._polled

    def owns(self, device_id: str) -> bool:
        return device_id in self.devices

    async def poll(self) -> str | None:
        self._polled.set()
        return None

    def views(self, now: datetime) -> FleetViews:
        return FleetViews(
            miners=tuple(
                MinerView(
                    device_id=d,
                    model="remote",
                    points=POINTS,
                    nameplate_w=3600.0,
                    commanded=self.targets.get(d, m.point),
                    commanded_since=self.since,
                    measured_power_w=next(p.power_w for p in POINTS if p.name == m.point),
                    measured_hashrate_ths=next(p.hashrate_ths for p in POINTS if p.name == m.point),
                    reading_age_s=0.0,
                    fault=self.held.get(d),
                )
                for d, m in self.devices.items()
            )
        )

    def faults(self) -> Mapping[str, str]:
        return dict(self.held)

    def largest_step_w(self) -> float:
        return POINTS[-1].power_w - POINTS[0].power_w

    async def apply(self, action: Action) -> None:
        device = self.devices[action.device_id]
        if device.refuses:
            raise CommandRejected(action.device_id, "node says: firmware busy")
        self.applied.append(action)
        self.targets[action.device_id] = action.target
        if not device.ignores_commands:
            device.point = action.target
        self.awaiting[action.device_id] = action

    def command_failed(self, action: Action, message: str) -> None:
        self.held[action.device_id] = f"{action.kind} failed: {message}"

    def unconfirmed(self, device_id: str) -> bool:
        return False

    def pending(self) -> frozenset[str]:
        return frozenset(self.awaiting)

    def verify(self) -> list[NotApplied]:
        missed = []
        for device_id, action in list(self.awaiting.items()):
            del self.awaiting[device_id]
            if self.devices[device_id].point != action.target:
                reason = f"{action.kind} to {action.target} accepted but not applied"
                self.held[device_id] = reason
                missed.append(NotApplied(action, reason))
        return missed

    def resume(self, commanded: Mapping[str, tuple[str, datetime]]) -> int:
        return 0

    def adopt_observed(self) -> int:
        return 0

    def reconcile(self) -> list[tuple[str, str, str]]:
        return []

    def commanded(self) -> Iterable[tuple[str, str, datetime]]:
        return [(d, p, self.since) for d, p in self.targets.items()]

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


async def test_a_third_fleet_is_dispatched_verified_and_published_through_the_protocol() -> None:
    config = parse_config(
        {
            "site": {"id": "t", "interconnect_limit_kw": 100},
            "control": {
                "interval_s": 0.2,
                "poll_interval_s": 0.2,
                "poll_jitter_s": 0.0,
                "device_timeout_s": 1,
                "retries": 1,
                "min_on_s": 0,
                "min_off_s": 0,
            },
            "economics": {"pool_fee": 0.0, "hashprice": {"usd_per_ph_day": 55}},
            "prices": {"realtime": {"type": "constant", "value": 500}},
        }
    )
    devices = {
        "node-a/m1": RemoteMiner(),
        "node-a/m2": RemoteMiner(ignores_commands=True),
        "node-b/m1": RemoteMiner(refuses=True),
    }
    fleet = RemoteFleet(devices)
    protocol: Fleet = fleet  # mypy checks the protocol is complete
    agent = Agent(config, Components(fleets=[protocol], price_source=ConstantPrice(500.0)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        # 500 $/MWh is above this miner's breakeven: the policy sheds all three.
        await until(lambda: devices["node-a/m1"].point == SLEEP, 15, "the obedient miner shed")
        await until(lambda: len(agent.state.faults) == 2, 15, "both others held faulted")
        assert agent.state.faults["node-a/m2"].endswith("accepted but not applied")
        assert agent.state.faults["node-b/m1"].startswith("sleep failed: node says")
        actions = agent.state.actions
        assert actions[("sleep", "ok")] == 2  # accepted by m1 and m2
        assert actions[("sleep", "not_applied")] == 1  # m2, found out by verification
        assert actions[("sleep", "failed")] == 1  # node-b refused every attempt
        assert [a.device_id for a in fleet.applied].count("node-a/m2") == 1
        # The refusal was not retried (permanent), and held devices are left alone.
        assert all(a.kind is ActionKind.SLEEP for a in fleet.applied)
        assert agent.state.sources["remote"].successes >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
