"""The node agent's link to its controller: the envelope as a grid limit, views out, acks back.

A node agent is the ordinary agent loop (coordinator, pure policy, actuator, verification,
``/metrics``) over ONE local fleet (GPUs through NVML and local jobs, or a building's miners),
plus this link. Rather than forwarding the controller's per-device actions, the controller grants
the node a power *envelope*; the link offers it to the loop as a mandatory site cap (a grid event
named ``node-envelope``) and the command's price as the energy price. The node then fills its
envelope in merit order with the same policy and actuator the controller runs, verifies it in
its own telemetry, and the controller never reads the node's devices. That is why a
100,000-miner site is 200 views, not 100,000 (see ``agent/control/node_protocol.py``).

The link:

* receives commands, admits them (:func:`~agent.control.node_protocol.admit`: replay, stale and
  duplicate rules), and journals (epoch, seq, envelope, when heard) in a small file written
  atomically, so a node restarted with ``kill -9`` refuses replays and comes back to the
  journaled envelope rather than to full power;
* acknowledges a command once a control cycle has planned under its envelope (``applied``), or
  at once when refused; a duplicate delivery gets the first ack again;
* publishes its supply curve, measured power and faults as :class:`NodeViews` (retained) after
  every cycle and every ``views_interval_s``;
* while the controller is silent holds the last envelope (never above it), stays shed inside an
  event, and applies its fail direction after ``fail_after_s``
  (:func:`~agent.control.node_protocol.envelope_when_silent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from agent.control.config import AgentConfig
from agent.control.domain import Plan, Snapshot
from agent.control.economics import mining_revenue_usd_per_h
from agent.control.node_config import NodeRoleConfig
from agent.control.node_protocol import (
    MAX_POINTS,
    AckResult,
    CommandLedger,
    LadderPoint,
    LostControllerRule,
    NodeAck,
    NodeCommand,
    NodeKind,
    NodeState,
    NodeViews,
    ProtocolError,
    admit,
    decode_beat,
    decode_command,
    encode_ack,
    encode_status,
    encode_views,
    envelope_when_silent,
    topics,
)
from agent.runtime.actuator import ActionResult
from drivers.bus.base import Bus, BusError, LastWill
from drivers.grid.base import GridEvent, ProgramKind
from drivers.jobs.base import JobState
from drivers.prices.base import PriceReading

log = logging.getLogger(__name__)

ENVELOPE_EVENT: Final = "node-envelope"


# --- the supply curve: a node's fleet as a short merit ladder -------------------------------


def supply_curve(
    snapshot: Snapshot, config: AgentConfig
) -> tuple[float, float, float, tuple[LadderPoint, ...], tuple[str, ...], int]:
    """``(floor_w, max_w, measured_w, points, faults, devices)`` of a node's snapshot.

    Each healthy device (a block of ``count`` identical miners, or a GPU node) is one step from
    its floor to its top, valued at what it earns there (mining revenue at the node's
    hashprice; the running jobs' contract value for GPUs). Steps are sorted by value per watt,
    cumulated from the floor, and merged into at most :data:`MAX_POINTS` points, so the ladder is
    concave and the controller's hull keeps every point. Faulted devices count at their
    measured power (or nameplate) in the floor and in the maximum: nothing can move them.
    """
    hashprice = snapshot.hashprice_usd_per_ph_day
    fee = config.economics.pool_fee
    floor_w = max_w = measured_w = 0.0
    steps: list[tuple[float, float]] = []  # (power_w, value_usd_per_h)
    faults: list[str] = []
    devices = 0
    for m in snapshot.miners:
        devices += m.count
        nameplate = m.nameplate_w * m.count
        max_w += nameplate
        # A device without a fresh reading counts at nameplate: unknown is not shed.
        measured_w += nameplate if m.measured_power_w is None else m.measured_power_w * m.count
        if m.fault is not None or not m.points:
            faults.append(f"{m.device_id}: {m.fault or 'no operating points'}")
            floor_w += nameplate if m.measured_power_w is None else m.measured_power_w * m.count
            continue
        base, top = m.points[0], max(m.points, key=lambda p: p.hashrate_ths)
        floor_w += base.power_w * m.count
        step_w = (top.power_w - base.power_w) * m.count
        value = mining_revenue_usd_per_h(top.hashrate_ths, hashprice, fee) * m.count
        if step_w > 0:
            steps.append((step_w, value))
    for n in snapshot.gpu_nodes:
        devices += n.count
        top_w = (n.gpu_count * n.max_cap_w + n.host_overhead_w) * n.count
        max_w += top_w
        measured_w += top_w if n.measured_power_w is None else n.measured_power_w * n.count
        low_w = (n.gpu_count * n.min_cap_w + n.host_overhead_w) * n.count
        if n.fault is not None:
            faults.append(f"{n.device_id}: {n.fault}")
            floor_w += top_w if n.measured_power_w is None else n.measured_power_w * n.count
            continue
        floor_w += low_w
        value = (
            sum(j.usd_per_gpu_hour * j.gpus for j in n.jobs if j.state is JobState.RUNNING)
            * n.count
        )
        if top_w > low_w:
            steps.append((top_w - low_w, value))
    steps.sort(key=lambda s: s[1] / s[0], reverse=True)
    chunk = max(1, -(-len(steps) // MAX_POINTS))
    points: list[LadderPoint] = []
    power, value = floor_w, 0.0
    for i in range(0, len(steps), chunk):
        for step_w, step_value in steps[i : i + chunk]:
            power += step_w
            value += step_value
        points.append(LadderPoint(power, value))
    return floor_w, max(max_w, power), measured_w, tuple(points), tuple(faults[:256]), devices


# --- the journal ----------------------------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def save_journal(path: Path, cmd: NodeCommand, heard_at: datetime) -> None:
    """Write the last applied command atomically (a kill -9 leaves the old or the new file)."""
    doc = {
        "epoch": cmd.epoch,
        "seq": cmd.seq,
        "issued_at": _iso(cmd.issued_at),
        "valid_until": _iso(cmd.valid_until),
        "envelope_w": cmd.envelope_w,
        "price_usd_per_mwh": cmd.price_usd_per_mwh,
        "event": cmd.event,
        "heard_at": _iso(heard_at),
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_journal(path: Path) -> tuple[NodeCommand, datetime] | None:
    """The journaled command and when it was heard; None when there is none or it is unreadable."""
    try:
        raw = path.read_bytes()[:4096]
        doc = json.loads(raw)
        cmd = NodeCommand(
            epoch=int(doc["epoch"]),
            seq=int(doc["seq"]),
            issued_at=datetime.fromisoformat(doc["issued_at"]),
            valid_until=datetime.fromisoformat(doc["valid_until"]),
            envelope_w=float(doc["envelope_w"]),
            price_usd_per_mwh=float(doc["price_usd_per_mwh"]),
            event=bool(doc["event"]),
        )
        return cmd, datetime.fromisoformat(doc["heard_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("node journal %s unreadable (%s): starting without it", path, exc)
        return None


# --- the link -------------------------------------------------------------------------------


class NodeLink:
    """The node side of the protocol: an event source, a price source and a cycle observer."""

    def __init__(
        self,
        config: AgentConfig,
        bus: Bus,
        *,
        wake: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        assert config.node is not None, "a node agent needs a node: section"
        self.config = config
        self.role: NodeRoleConfig = config.node
        self.node_id = self.role.id
        self.bus = bus
        self.clock = clock
        self.topics = topics(config.site.id, self.node_id)
        self.rule = LostControllerRule(self.role.fail_after_s, self.role.fail_direction)
        self.ledger = CommandLedger()
        self.last: NodeCommand | None = None
        self.last_heard: datetime | None = None
        self.unacked: list[NodeCommand] = []
        self.admitted_at: dict[tuple[int, int], datetime] = {}
        self.state = NodeState.HOLDING
        self.floor_w = 0.0
        self.views_seq = 0
        self.started = clock()
        self.outbox: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(maxsize=1000)
        self.connected = asyncio.Event()
        self.refused = 0
        self.applied: list[tuple[int, int]] = []  # (epoch, seq) in the order applied (tests)
        self.wake = wake  # runs the node's control cycle at once (a new envelope)
        self.latest_views: NodeViews | None = None
        journaled = load_journal(self.role.journal_path)
        if journaled is not None:
            cmd, heard = journaled
            self.last, self.last_heard = cmd, heard
            self.ledger.epoch, self.ledger.seq = cmd.epoch, cmd.seq
            log.info(
                "node journal: epoch %d seq %d, envelope %.0f W", cmd.epoch, cmd.seq, cmd.envelope_w
            )

    # -- what the agent loop reads --

    @property
    def name(self) -> str:
        return "controller"

    def envelope_w(self) -> float | None:
        env, state = envelope_when_silent(
            self.last, self.last_heard or self.started, self.clock(), self.rule, self.floor_w
        )
        self.state = state
        return env

    def events(self) -> tuple[GridEvent, ...]:
        """The envelope as a mandatory site cap; always offered, so its target only moves."""
        env = self.envelope_w()
        # No cap above the node's own interconnect: the shared limits refuse a target above it,
        # and an envelope update they refused would leave the node under the previous one.
        limit_kw = self.config.site.interconnect_limit_kw
        kw = limit_kw if env is None else min(env / 1000.0, limit_kw)
        # The end rolls forward in steps of a third of control.max_event_horizon_s, so it stays
        # within the limits every event is held to (agent.control.limits) yet always at least a
        # step ahead; the event is updated (and journaled) once per step, not once per sync.
        step_s = self.config.control.max_event_horizon_s / 3.0
        elapsed_s = max(0.0, (self.clock() - self.started).total_seconds())
        steps = int(elapsed_s // step_s) + 2
        return (
            GridEvent(
                event_id=ENVELOPE_EVENT,
                source="controller",
                program="node-envelope",
                kind=ProgramKind.OVERRIDE,
                start=self.started - timedelta(seconds=1),
                end=self.started + timedelta(seconds=step_s * steps),
                max_site_kw=kw,
            ),
        )

    async def latest(self) -> PriceReading:
        """The price of the last command (the controller's effective price)."""
        price = 0.0 if self.last is None else self.last.price_usd_per_mwh
        at = self.clock() if self.last is None else self.last.issued_at
        # interval_start is the command time: each grant is a new price interval for the loop.
        return PriceReading("controller", at, 900.0, price, at)

    def observe(self, snapshot: Snapshot, plan: Plan, results: Sequence[ActionResult]) -> None:
        """After each control cycle: ack what was applied under its envelope, publish views."""
        floor_w, max_w, measured_w, points, faults, devices = supply_curve(snapshot, self.config)
        self.floor_w = floor_w
        self.observe_plan(plan, results)
        self.publish_views(floor_w, max_w, measured_w, points, faults, devices)

    def observe_plan(self, plan: Plan, results: Sequence[ActionResult] = ()) -> None:
        """Ack every command admitted before this cycle's snapshot: its actions have run.

        ``applied`` means the node took the envelope and acted on it. Whether the devices got
        under it is for telemetry to show (the views' ``measured_w``), so a node that cannot
        meet its envelope (a stuck device) still answers at once, saying why, and the
        controller's verification, not an ack timeout, finds the shortfall.
        """
        failed = [r for r in results if r.result != "ok"]
        for cmd in list(self.unacked):
            if self.admitted_at.get((cmd.epoch, cmd.seq), plan.at) > plan.at:
                continue  # arrived during this cycle: the next one plans under it
            self.unacked.remove(cmd)
            self.admitted_at.pop((cmd.epoch, cmd.seq), None)
            if plan.planned_power_w > cmd.envelope_w + 1.0:
                why = f"planned {plan.planned_power_w:.0f} W: cannot get under the envelope"
            elif failed:
                why = f"{len(failed)} action(s) failed"
            else:
                why = "planned under envelope"
            self._ack(cmd, AckResult.APPLIED, why, cmd.envelope_w)

    def publish_views(
        self,
        floor_w: float,
        max_w: float,
        measured_w: float,
        points: tuple[LadderPoint, ...],
        faults: tuple[str, ...],
        devices: int,
    ) -> None:
        self.views_seq += 1
        kind = NodeKind.GPU if self.config.gpu_nodes and not self.config.miners else NodeKind.MINERS
        views = NodeViews(
            node_id=self.node_id,
            kind=kind,
            seq=self.views_seq,
            at=self.clock(),
            floor_w=floor_w,
            max_w=max_w,
            measured_w=measured_w,
            envelope_w=self.envelope_w(),
            points=points,
            devices=devices,
            faults=faults,
            applied_epoch=self.ledger.epoch,
            applied_seq=self.ledger.seq,
            state=self.state,
        )
        self.latest_views = views
        self._send(self.topics["views"], encode_views(views), retain=True)

    def metrics(self) -> dict[str, float]:
        """What the node's ``/metrics`` shows about its link (read on each scrape)."""
        env = self.envelope_w()
        out: dict[str, float] = {
            "applied_seq": float(self.ledger.seq),
            "refused": float(self.refused),
            f"state_{self.state.value}": 1.0,
        }
        if env is not None:
            out["envelope_w"] = env
        return out

    # -- commands --

    def handle_command(self, payload: bytes) -> None:
        try:
            cmd = decode_command(payload)
        except ProtocolError as exc:
            self.refused += 1
            log.warning("node %s: command refused: %s", self.node_id, exc)
            return
        now = self.clock()
        if any((c.epoch, c.seq) == (cmd.epoch, cmd.seq) for c in self.unacked):
            return  # redelivered before its ack: the ack will come once
        verdict = admit(cmd, self.ledger, now, self.node_id)
        if verdict.ack is not None:
            self._send(self.topics["ack"], encode_ack(verdict.ack), retain=False)
            return
        if not verdict.apply:
            self.refused += 1
            log.warning(
                "node %s: command %d/%d refused: %s",
                self.node_id,
                cmd.epoch,
                cmd.seq,
                verdict.refusal,
            )
            self._ack(cmd, AckResult.REFUSED, verdict.refusal or "refused", None)
            return
        # Journal before acting: a crash between the two must not let a replay through.
        self.last, self.last_heard = cmd, now
        self.ledger.epoch, self.ledger.seq = cmd.epoch, cmd.seq
        save_journal(self.role.journal_path, cmd, now)
        self.unacked.append(cmd)
        self.admitted_at[(cmd.epoch, cmd.seq)] = now
        self.applied.append((cmd.epoch, cmd.seq))
        del self.applied[:-1000]
        if self.wake is not None:
            self.wake()

    def handle_beat(self, payload: bytes) -> None:
        try:
            beat = decode_beat(payload)
        except ProtocolError as exc:
            log.warning("node %s: controller beat refused: %s", self.node_id, exc)
            return
        if beat.state == "online" and beat.epoch >= self.ledger.epoch:
            self.last_heard = self.clock()

    def _ack(self, cmd: NodeCommand, result: AckResult, reason: str, env: float | None) -> None:
        ack = NodeAck(self.node_id, cmd.epoch, cmd.seq, result, reason[:200], self.clock(), env)
        self.ledger.remember(ack)
        self._send(self.topics["ack"], encode_ack(ack), retain=False)

    def _send(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if retain:  # views and status: only the newest matters
            self._drop_queued(topic)
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait((topic, payload, retain))

    def _drop_queued(self, topic: str) -> None:
        kept = []
        while not self.outbox.empty():
            item = self.outbox.get_nowait()
            if item[0] != topic:
                kept.append(item)
        for item in kept:
            self.outbox.put_nowait(item)

    # -- the connection --

    async def run(self, stop: asyncio.Event) -> None:
        """Hold one broker session, reconnecting with backoff; acks survive an outage."""
        broker = self.role.broker
        will = LastWill(self.topics["status"], encode_status(NodeState.OFFLINE, "connection lost"))
        delay = broker.reconnect_initial_s
        while not stop.is_set():
            try:
                await self._session(stop, will)
                delay = broker.reconnect_initial_s
            except BusError as exc:
                self.connected.clear()
                log.warning("node %s: broker: %s; retrying in %.1f s", self.node_id, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, broker.reconnect_max_s)

    async def _session(self, stop: asyncio.Event, will: LastWill) -> None:
        del will  # the bus carries it in its settings (see build_node_bus)
        async with self.bus.session() as s:
            await s.subscribe(self.topics["cmd"], qos=1)
            await s.subscribe(self.topics["controller"], qos=1)
            await s.publish(self.topics["status"], encode_status(NodeState.ONLINE), 1, True)
            if self.latest_views is not None:
                self._send(self.topics["views"], encode_views(self.latest_views), retain=True)
            self.connected.set()

            async def receive() -> None:
                async for msg in s.messages():
                    if msg.topic == self.topics["cmd"]:
                        self.handle_command(msg.payload)
                    elif msg.topic == self.topics["controller"]:
                        self.handle_beat(msg.payload)

            async def send() -> None:
                while True:
                    topic, payload, retain = await self.outbox.get()
                    try:
                        await s.publish(topic, payload, 1, retain)
                    except BusError:
                        if not retain:  # an ack must not be lost to an outage
                            self.outbox.put_nowait((topic, payload, retain))
                        raise

            tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
            stopper = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopper:
                        t.result()  # raises the BusError that ended the session
            finally:
                for t in (*tasks, stopper):
                    t.cancel()
                for t in (*tasks, stopper):
                    with contextlib.suppress(asyncio.CancelledError, BusError):
                        await t
            if stop.is_set():
                with contextlib.suppress(BusError):
                    await s.publish(
                        self.topics["status"], encode_status(NodeState.OFFLINE, "stopped"), 1, True
                    )

    async def tick(self, stop: asyncio.Event) -> None:
        """Republish views between cycles, so the controller hears a node whose loop is slow."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.role.views_interval_s)
            if self.latest_views is not None and not stop.is_set():
                v = self.latest_views
                self.publish_views(v.floor_w, v.max_w, v.measured_w, v.points, v.faults, v.devices)


def node_will(config: AgentConfig) -> LastWill:
    assert config.node is not None
    t = topics(config.site.id, config.node.id)
    return LastWill(t["status"], encode_status(NodeState.OFFLINE, "connection lost"))
