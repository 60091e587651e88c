"""Remote node agents as one fleet of the controller (``remote_nodes:``, ``driver: mqtt-node``).

Each node agent is one device of this fleet. Its published supply curve becomes the operating
points of a :class:`MinerView` (``floor``, ``p1``..``pN``: cumulative power, and the value
expressed as the hashrate that earns it at the controller's hashprice), so the pure policy
dispatches nodes in the same merit order as local miners and GPUs without a line of its own:
its hull keeps a concave ladder whole, its ramp, event and circuit rules apply unchanged, and
every action is audited by the actuator like any other.

:meth:`apply` turns the chosen point into a power *envelope* command with (epoch, seq,
valid_until), publishes it, and waits for the node's ack with a deadline (refused: the action
fails with the node's reason). :meth:`verify` confirms it in the node's own telemetry: the
views report the command applied and, for a shed, measured power at or under the envelope.

A node silent past its ``timeout_s`` (no views) is faulted: the policy leaves it alone and
counts it at its worst case, the last ``max_w`` it reported (the configured ``max_w`` before
it ever reported), so the site sheds elsewhere. Its fault is in ``/metrics`` with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agent.control.config import AgentConfig
from agent.control.domain import Action, ActionKind, MinerView, OperatingPoint
from agent.control.economics import mining_revenue_usd_per_h
from agent.control.node_config import RemoteNodesConfig
from agent.control.node_protocol import (
    AckResult,
    ControllerBeat,
    NodeAck,
    NodeCommand,
    NodeViews,
    ProtocolError,
    decode_ack,
    decode_views,
    encode_beat,
    encode_command,
    topics,
    worst_case_w,
)
from agent.runtime.fleet import FleetViews, NotApplied
from agent.runtime.state import AgentState
from drivers.bus.base import Bus, BusError, BusSession, LastWill
from drivers.errors import CommandRejected, DeviceError, DeviceTimeout, DeviceUnavailable

log = logging.getLogger(__name__)

FLOOR = "floor"
SHED_TOLERANCE = 1.02  # a node's own meter may read 2 % above its envelope while confirming


@dataclass(slots=True)
class _Node:
    node_id: str
    max_w: float
    timeout_s: float
    views: NodeViews | None = None
    heard_at: float | None = None  # monotonic time of the last views
    commanded: str | None = None  # None: no envelope granted, the node runs at its top
    commanded_since: datetime = field(default_factory=lambda: datetime.min.replace(tzinfo=UTC))
    envelope_w: float | None = None
    pending: tuple[int, float, float, bool] | None = None  # (seq, envelope, deadline, shed)
    fault: str | None = None
    journaled: bool = False


class RemoteNodeFleet:
    """The fleet of node agents behind one broker."""

    def __init__(
        self,
        config: AgentConfig,
        bus: Bus,
        *,
        state: AgentState | None = None,
        epoch: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.remote_nodes is not None, "remote_nodes: is not configured"
        self.config = config
        self.settings: RemoteNodesConfig = config.remote_nodes
        self.bus = bus
        self.state = state  # read only: the plan being carried out (its price, its binding)
        self.clock = clock
        self.monotonic = monotonic
        self.site_id = config.site.id
        self.nodes = {n.id: _Node(n.id, n.max_w, n.timeout_s) for n in self.settings.nodes}
        # A restarted controller starts a new epoch: its seq restarts, and nodes accept it. The
        # wiring passes the epoch its broker will (last will) was built with.
        self.epoch = epoch if epoch is not None else int(clock().timestamp() * 1000)
        self.seq = 0
        self._session: BusSession | None = None
        self._acks: dict[tuple[str, int], asyncio.Future[NodeAck]] = {}
        self._polled = asyncio.Event()
        self._connected_at: float | None = None
        self.connected = asyncio.Event()
        self.refused = 0  # payloads refused by the protocol's parsers
        self.commands_sent = 0
        self.acks: dict[str, int] = dict.fromkeys(self.nodes, 0)  # acks received, per node
        self.hashprice_usd_per_ph_day = config.economics.hashprice.usd_per_ph_day

    # --- fleet protocol: reading -------------------------------------------------------------

    @property
    def name(self) -> str:
        return "nodes"

    @property
    def polled(self) -> asyncio.Event:
        return self._polled

    def owns(self, device_id: str) -> bool:
        return device_id in self.nodes

    async def poll(self) -> str | None:
        """Views arrive on the bus; polling only ages them. Silent nodes become faults."""
        now = self.monotonic()
        silent = []
        for n in self.nodes.values():
            age = None if n.heard_at is None else now - n.heard_at
            if age is None or age > n.timeout_s:
                why = "never reported" if age is None else f"silent for {age:.0f} s"
                n.fault = f"node {why}: counted at its worst case"
                silent.append(n.node_id)
            elif n.fault is not None and n.fault.startswith("node "):
                n.fault = None
        # The first decision waits until every node has reported, or a node timeout has passed
        # since the broker answered (a dead node must not hold the site's first decision).
        if self._connected_at is None and self.connected.is_set():
            self._connected_at = now
        waited = self._connected_at is not None and now - self._connected_at > max(
            n.timeout_s for n in self.nodes.values()
        )
        if not silent or waited:
            self._polled.set()
        if silent and len(silent) == len(self.nodes) and not self.connected.is_set():
            return f"broker unreachable; {len(silent)} node(s) silent"
        return f"{len(silent)} node(s) silent: {', '.join(silent[:5])}" if silent else None

    def _usd_h_per_ths(self) -> float:
        snap = None if self.state is None else self.state.snapshot
        hashprice = self.hashprice_usd_per_ph_day if snap is None else snap.hashprice_usd_per_ph_day
        # A node values its ladder at its own hashprice; both come from the same feed on a site.
        return max(mining_revenue_usd_per_h(1.0, hashprice, self.config.economics.pool_fee), 1e-9)

    def _view(self, n: _Node, now: datetime) -> MinerView:
        v = n.views
        worst = worst_case_w(v, n.max_w)
        per_ths = self._usd_h_per_ths()
        if v is None:
            points: tuple[OperatingPoint, ...] = (OperatingPoint(FLOOR, worst, 0.0),)
        else:
            rungs = [
                OperatingPoint(f"p{i + 1}", p.power_w, max(p.value_usd_per_h, 0.0) / per_ths)
                for i, p in enumerate(v.points)
            ]
            points = (OperatingPoint(FLOOR, v.floor_w, 0.0), *rungs)
        known = any(p.name == n.commanded for p in points)
        commanded = n.commanded if known and n.commanded is not None else points[-1].name
        age = None if n.heard_at is None else self.monotonic() - n.heard_at
        if n.fault is not None:
            measured: float | None = worst
        else:
            measured = None if v is None else v.measured_w
        return MinerView(
            device_id=n.node_id,
            model=f"node:{n.node_id}",  # one group per node: their ladders differ
            points=points,
            nameplate_w=worst,
            commanded=commanded,
            commanded_since=n.commanded_since,
            measured_power_w=measured,
            reading_age_s=age,
            fault=n.fault,
        )

    def views(self, now: datetime) -> FleetViews:
        return FleetViews(miners=tuple(self._view(n, now) for n in self.nodes.values()))

    def faults(self) -> Mapping[str, str]:
        return {n.node_id: n.fault for n in self.nodes.values() if n.fault is not None}

    def largest_step_w(self) -> float:
        return max(
            (
                n.views.points[-1].power_w - n.views.floor_w
                for n in self.nodes.values()
                if n.views is not None and n.views.points
            ),
            default=0.0,
        )

    # --- fleet protocol: commands ------------------------------------------------------------

    def _envelope_for(self, n: _Node, target: str) -> float:
        if n.views is None:
            raise DeviceError(n.node_id, "node has not reported its views yet")
        if target == FLOOR:
            return n.views.floor_w
        try:
            return n.views.points[int(target.removeprefix("p")) - 1].power_w
        except (ValueError, IndexError):
            raise CommandRejected(n.node_id, f"no point {target!r} on its ladder") from None

    async def apply(self, action: Action) -> None:
        n = self.nodes.get(action.device_id)
        if n is None:
            raise DeviceError(action.device_id, "not a configured node")
        if action.kind not in (ActionKind.SLEEP, ActionKind.WAKE, ActionKind.SET_PROFILE):
            raise CommandRejected(n.node_id, f"a node takes envelopes, not {action.kind.value}")
        envelope = self._envelope_for(n, action.target)
        await self.send_envelope(n.node_id, envelope, action.reason)
        n.commanded, n.commanded_since = action.target, self.clock()

    async def send_envelope(self, node_id: str, envelope_w: float, reason: str = "") -> NodeAck:
        """Publish one envelope command and wait for its ack (the deadline is ``ack_timeout_s``)."""
        n = self.nodes[node_id]
        session = self._session
        if session is None:
            raise DeviceUnavailable(node_id, "broker unreachable")
        self.seq += 1
        seq = self.seq
        now = self.clock()
        plan = None if self.state is None else self.state.plan
        # The plan being carried out: nodes decide at its price, and stay shed if it is an event.
        price = 0.0 if plan is None else plan.effective_price_usd_per_mwh
        snap_event = plan is not None and any(b.startswith("event") for b in plan.binding)
        cmd = NodeCommand(
            epoch=self.epoch,
            seq=seq,
            issued_at=now,
            valid_until=now + timedelta(seconds=self.settings.validity_s),
            envelope_w=envelope_w,
            price_usd_per_mwh=price,
            event=snap_event,
            reason=reason[:200],
        )
        fut: asyncio.Future[NodeAck] = asyncio.get_running_loop().create_future()
        self._acks[(node_id, seq)] = fut
        t = topics(self.site_id, node_id)
        try:
            await session.publish(t["cmd"], encode_command(cmd), 1, False)
            self.commands_sent += 1
            async with asyncio.timeout(self.settings.ack_timeout_s):
                ack = await fut
        except BusError as exc:
            raise DeviceUnavailable(node_id, f"command not sent: {exc}") from exc
        except TimeoutError:
            raise DeviceTimeout(
                node_id, f"no ack for seq {seq} within {self.settings.ack_timeout_s:g} s"
            ) from None
        finally:
            self._acks.pop((node_id, seq), None)
        self.acks[node_id] += 1
        if ack.result is AckResult.REFUSED:
            raise CommandRejected(node_id, f"refused seq {seq}: {ack.reason}")
        shed = n.envelope_w is None or envelope_w < n.envelope_w
        n.envelope_w = envelope_w
        n.pending = (seq, envelope_w, self.monotonic() + self.config.control.verify_after_s, shed)
        return ack

    def command_failed(self, action: Action, message: str) -> None:
        n = self.nodes.get(action.device_id)
        if n is not None and n.fault is None:
            n.fault = f"command failed: {message}"[:200]

    def unconfirmed(self, device_id: str) -> bool:
        n = self.nodes.get(device_id)
        return n is not None and n.pending is not None and n.pending[3]

    def pending(self) -> frozenset[str]:
        return frozenset(n.node_id for n in self.nodes.values() if n.pending is not None)

    def confirmed(self, n: _Node) -> bool:
        if n.pending is None or n.views is None:
            return n.pending is None
        seq, envelope, _deadline, shed = n.pending
        v = n.views
        applied = (v.applied_epoch, v.applied_seq) >= (self.epoch, seq)
        return applied and (not shed or v.measured_w <= envelope * SHED_TOLERANCE)

    def verify(self) -> list[NotApplied]:
        out: list[NotApplied] = []
        now = self.monotonic()
        for n in self.nodes.values():
            if n.pending is None:
                if n.fault is not None and n.fault.startswith("command failed") and n.views:
                    n.fault = None  # the node reports again: the next grant retries it
                continue
            if self.confirmed(n):
                n.pending = None
                if n.fault is not None and not n.fault.startswith("node "):
                    n.fault = None
                continue
            seq, envelope, deadline, _shed = n.pending
            if now > deadline:
                n.pending = None
                why = f"telemetry did not confirm envelope {envelope:.0f} W (seq {seq})"
                n.fault = why
                out.append(
                    NotApplied(
                        Action(n.node_id, ActionKind.SET_PROFILE, n.commanded or FLOOR, why, 0.0),
                        why,
                    )
                )
        return out

    def resume(self, commanded: Mapping[str, tuple[str, datetime]]) -> int:
        known = 0
        for node_id, (point, since) in commanded.items():
            n = self.nodes.get(node_id)
            if n is None:
                continue
            n.commanded, n.commanded_since, n.journaled = point, since, True
            known += 1
        return known

    def _observed(self, v: NodeViews) -> str | None:
        """The point a node's reported envelope corresponds to (None: no envelope, its top)."""
        if v.envelope_w is None:
            return None
        name = FLOOR if v.envelope_w < v.floor_w + 1e-6 else None
        for i, p in enumerate(v.points):
            if p.power_w <= v.envelope_w + 1e-6:
                name = f"p{i + 1}"
        return name

    def adopt_observed(self) -> int:
        """Nodes hold their own journal; the controller takes their envelope's point."""
        adopted = 0
        for n in self.nodes.values():
            if n.journaled or n.views is None or n.views.envelope_w is None:
                continue
            n.commanded = self._observed(n.views)
            adopted += 1
        return adopted

    def reconcile(self) -> list[tuple[str, str, str]]:
        """Adopt the envelope a node reports when it differs from what we think we granted.

        A command whose ack came after our deadline was applied all the same (the node keeps
        it); a node in failsafe holds its floor. Either way the node's own report is the truth,
        and the next decision starts from it (dated back, so no dwell time protects it).
        """
        drifted = []
        since = self.clock() - timedelta(
            seconds=max(self.config.control.min_on_s, self.config.control.min_off_s)
        )
        for n in self.nodes.values():
            if n.pending is not None or n.views is None or n.fault is not None:
                continue
            observed = self._observed(n.views)
            if observed != n.commanded:
                top = f"p{len(n.views.points)}" if n.views.points else FLOOR
                was, now = n.commanded or top, observed or top
                n.commanded, n.commanded_since = observed, since
                n.envelope_w = n.views.envelope_w
                if was != now:
                    drifted.append((n.node_id, was, now))
        return drifted

    def commanded(self) -> Iterable[tuple[str, str, datetime]]:
        return [
            (n.node_id, n.commanded, n.commanded_since)
            for n in self.nodes.values()
            if n.commanded is not None
        ]

    def link_metrics(self) -> dict[str, dict[str, float]]:
        """Per node, what the controller's ``/metrics`` shows: its own reading, the envelope
        granted, acks received, the last (seq) it reported applied, and whether it is faulted."""
        out: dict[str, dict[str, float]] = {}
        for n in self.nodes.values():
            row = {"acks": float(self.acks[n.node_id]), "faulted": float(n.fault is not None)}
            if n.views is not None:
                row["measured_w"] = n.views.measured_w
                row["applied_seq"] = float(n.views.applied_seq)
            if n.envelope_w is not None:
                row["envelope_w"] = n.envelope_w
            out[n.node_id] = row
        return out

    # --- the bus -----------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        # site-agent/<site>/node/<id>/<kind>
        if len(parts) != 5 or parts[2] != "node":
            return
        node_id, kind = parts[3], parts[4]
        n = self.nodes.get(node_id)
        if n is None:
            return
        try:
            if kind == "views":
                views = decode_views(payload, node_id)
                if n.views is not None and views.seq <= n.views.seq and views.at <= n.views.at:
                    return  # an older retained copy
                n.views, n.heard_at = views, self.monotonic()
            elif kind == "ack":
                ack = decode_ack(payload, node_id)
                fut = self._acks.get((node_id, ack.seq))
                if ack.epoch == self.epoch and fut is not None and not fut.done():
                    fut.set_result(ack)
        except ProtocolError as exc:
            self.refused += 1
            log.warning("node %s: %s refused: %s", node_id, kind, exc)

    async def run(self, stop: asyncio.Event) -> None:
        broker = self.settings.broker
        delay = broker.reconnect_initial_s
        while not stop.is_set():
            try:
                await self._run_session(stop)
                delay = broker.reconnect_initial_s
            except BusError as exc:
                log.warning("remote nodes: broker: %s; retrying in %.1f s", exc, delay)
            finally:
                self._session = None
                self.connected.clear()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, broker.reconnect_max_s)

    async def _run_session(self, stop: asyncio.Event) -> None:
        base = f"site-agent/{self.site_id}"
        async with self.bus.session() as s:
            await s.subscribe(f"{base}/node/+/views", qos=1)
            await s.subscribe(f"{base}/node/+/ack", qos=1)
            self._session = s
            self.connected.set()

            async def receive() -> None:
                async for msg in s.messages():
                    self.handle(msg.topic, msg.payload)

            async def beat() -> None:
                while True:
                    payload = encode_beat(ControllerBeat(self.epoch, self.clock()))
                    await s.publish(f"{base}/controller/status", payload, 1, True)
                    await asyncio.sleep(self.settings.beat_interval_s)

            tasks = [asyncio.create_task(receive()), asyncio.create_task(beat())]
            stopper = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopper:
                        t.result()
            finally:
                for t in (*tasks, stopper):
                    t.cancel()
                for t in (*tasks, stopper):
                    with contextlib.suppress(asyncio.CancelledError, BusError):
                        await t
            if stop.is_set():
                with contextlib.suppress(BusError):
                    payload = encode_beat(ControllerBeat(self.epoch, self.clock(), "offline"))
                    await s.publish(f"{base}/controller/status", payload, 1, True)


def controller_will(site_id: str, epoch: int) -> LastWill:
    """The controller's last will: its beat says offline (nodes start counting silence)."""
    return LastWill(
        f"site-agent/{site_id}/controller/status",
        encode_beat(ControllerBeat(epoch, datetime.now(UTC), "offline")),
    )
