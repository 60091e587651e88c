"""The node protocol: what a controller and a node agent say to each other over MQTT.

A node agent (``site-agent node``) owns devices the controller cannot reach: the GPUs of another
host, or a building's miners. It publishes its fleet as one *supply curve*, a short ladder of
cumulative (power, value) points in merit order, and the controller grants it a power
*envelope*: the most the node may draw until the next grant. The node fills its envelope in
merit order with the same pure policy the controller runs, so the site is dispatched in one
merit order without the controller reading 100,000 miners itself.

Topics (``P`` is ``site-agent/<site id>``; every payload is one JSON object with ``"v"``):

========================  ==========  ====  ======  ===========================================
topic                     from        QoS   retain  payload
========================  ==========  ====  ======  ===========================================
``P/node/<id>/views``     node        1     yes     :class:`NodeViews` (every poll)
``P/node/<id>/ack``       node        1     no      :class:`NodeAck` (one per command seq)
``P/node/<id>/status``    node        1     yes     ``{"v", "state"}``; last will ``offline``
``P/node/<id>/cmd``       controller  1     no      :class:`NodeCommand`
``P/controller/status``   controller  1     yes     :class:`ControllerBeat`; will ``offline``
========================  ==========  ====  ======  ===========================================

Integrity rules, each a pure function here so both ends and the tests share one copy:

* **Versioning.** Every payload carries ``v``; a peer of another major version is refused
  with a message that names both versions (``protocol v2 from controller, this node speaks
  v1``), never half-understood.
* **Sequence and validity window.** A command carries the controller's ``epoch`` (its start,
  in ms: a restarted controller starts a new epoch), a ``seq`` that rises within an epoch, and
  ``valid_until``. A node refuses a command from an older epoch or with a seq at or below the
  last it applied (a replay), and one that arrives after ``valid_until`` (stale).
* **Idempotent acks.** A command delivered twice (QoS 1 redelivery after a broker restart) is
  answered with the ack it got the first time, and is not applied again.
* **Envelope when the controller is lost.** A node holds its last envelope and never goes
  above it; inside a mandatory event it stays shed; after ``fail_after_s`` of silence it
  applies its fail direction (``shed``: down to its floor; ``hold``: keep the envelope).
* **Node lost by the controller.** The controller counts a silent node at its worst case, the
  last ``max_w`` it reported, and sheds elsewhere.

Sizes are bounded: a payload is at most :data:`MAX_PAYLOAD_BYTES`, a ladder at most
:data:`MAX_POINTS` points, a fault list at most :data:`MAX_FAULTS` entries. Every number is
finite and in its physical range, or the payload is refused whole (:class:`ProtocolError`).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from drivers.errors import BadInput
from drivers.inputs import InputRejected, finite_in_range, load_json

VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_POINTS: Final = 64  # a node aggregates its devices into this many merit steps
MAX_FAULTS: Final = 256
MAX_VALIDITY_S: Final = 3600.0  # no grant may outlive an hour without renewal
MAX_SITE_W: Final = 2e9  # 2 GW: above any single interconnect
MAX_VALUE_USD_PER_H: Final = 1e8
MAX_PRICE_USD_PER_MWH: Final = 1e6
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOURCE: Final = "node-protocol"


class ProtocolError(BadInput):
    """A payload that is not a valid message of this protocol; it changed nothing."""

    def __init__(self, message: str, reason: str = "bad_type") -> None:
        super().__init__(SOURCE, message)
        self.reason = reason


class NodeKind(StrEnum):
    GPU = "gpu"
    MINERS = "miners"


class AckResult(StrEnum):
    APPLIED = "applied"
    REFUSED = "refused"


class NodeState(StrEnum):
    ONLINE = "online"  # hears the controller, applies its grants
    HOLDING = "holding"  # controller silent: last envelope held
    FAILSAFE = "failsafe"  # silent past fail_after_s: fail direction applied
    OFFLINE = "offline"  # the broker's last will


def topics(site_id: str, node_id: str) -> dict[str, str]:
    """Every topic of one node, by role."""
    base = f"site-agent/{site_id}"
    return {
        "views": f"{base}/node/{node_id}/views",
        "ack": f"{base}/node/{node_id}/ack",
        "status": f"{base}/node/{node_id}/status",
        "cmd": f"{base}/node/{node_id}/cmd",
        "controller": f"{base}/controller/status",
    }


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LadderPoint:
    """Cumulative power and the value it earns, one merit step of a node's supply curve."""

    power_w: float
    value_usd_per_h: float


@dataclass(frozen=True, slots=True)
class NodeViews:
    """A node's fleet as the controller dispatches it: floor, ladder, worst case and faults.

    ``floor_w`` is what the node draws fully shed (standby, host overhead), ``points`` rise
    from there in merit order, ``max_w`` is the worst case the controller must count if the
    node goes silent (every device at nameplate, unknown ones included), and ``measured_w`` is
    the node's own reading. ``applied`` is the (epoch, seq) of the last command applied.
    """

    node_id: str
    kind: NodeKind
    seq: int
    at: datetime
    floor_w: float
    max_w: float
    measured_w: float
    envelope_w: float | None
    points: tuple[LadderPoint, ...]
    devices: int
    faults: tuple[str, ...] = ()
    applied_epoch: int = 0
    applied_seq: int = 0
    state: NodeState = NodeState.ONLINE


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """One grant from the controller: the envelope, the price it was decided at, and why."""

    epoch: int
    seq: int
    issued_at: datetime
    valid_until: datetime
    envelope_w: float
    price_usd_per_mwh: float
    event: bool = False  # a mandatory grid event is in force: stay shed if the controller goes
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NodeAck:
    node_id: str
    epoch: int
    seq: int
    result: AckResult
    reason: str
    at: datetime
    envelope_w: float | None = None


@dataclass(frozen=True, slots=True)
class ControllerBeat:
    epoch: int
    at: datetime
    state: str = "online"


# --- encoding -------------------------------------------------------------------------------


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _dump(obj: dict[str, Any]) -> bytes:
    data = json.dumps({"v": VERSION, **obj}, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return data


def encode_views(v: NodeViews) -> bytes:
    return _dump(
        {
            "type": "views",
            "node_id": v.node_id,
            "kind": v.kind.value,
            "seq": v.seq,
            "at": _iso(v.at),
            "floor_w": v.floor_w,
            "max_w": v.max_w,
            "measured_w": v.measured_w,
            "envelope_w": v.envelope_w,
            "points": [[p.power_w, p.value_usd_per_h] for p in v.points],
            "devices": v.devices,
            "faults": list(v.faults),
            "applied": [v.applied_epoch, v.applied_seq],
            "state": v.state.value,
        }
    )


def encode_command(c: NodeCommand) -> bytes:
    return _dump(
        {
            "type": "cmd",
            "epoch": c.epoch,
            "seq": c.seq,
            "issued_at": _iso(c.issued_at),
            "valid_until": _iso(c.valid_until),
            "envelope_w": c.envelope_w,
            "price_usd_per_mwh": c.price_usd_per_mwh,
            "event": c.event,
            "reason": c.reason[:200],
        }
    )


def encode_ack(a: NodeAck) -> bytes:
    return _dump(
        {
            "type": "ack",
            "node_id": a.node_id,
            "epoch": a.epoch,
            "seq": a.seq,
            "result": a.result.value,
            "reason": a.reason[:200],
            "at": _iso(a.at),
            "envelope_w": a.envelope_w,
        }
    )


def encode_beat(b: ControllerBeat) -> bytes:
    return _dump({"type": "beat", "epoch": b.epoch, "at": _iso(b.at), "state": b.state})


def encode_status(state: NodeState, detail: str = "") -> bytes:
    return _dump({"type": "status", "state": state.value, "detail": detail[:200]})


# --- decoding (hostile input) ---------------------------------------------------------------


def _rewrap(exc: InputRejected) -> ProtocolError:
    return ProtocolError(str(exc).removeprefix(f"{SOURCE}: "), exc.reason)


def _load(payload: bytes, kind: str, sender: str) -> dict[str, Any]:
    try:
        doc = load_json(payload, SOURCE, max_bytes=MAX_PAYLOAD_BYTES, max_depth=4, what=kind)
    except InputRejected as exc:
        raise _rewrap(exc) from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{kind}: expected a JSON object")
    v = doc.get("v")
    if v != VERSION:
        raise ProtocolError(
            f"protocol v{v!s:.8} from {sender}, this peer speaks v{VERSION}", "version"
        )
    if doc.get("type") != kind:
        raise ProtocolError(f"expected a {kind!r} message, got type {doc.get('type')!s:.20}")
    return doc


def _num(doc: dict[str, Any], key: str, lo: float, hi: float, kind: str) -> float:
    if key not in doc:
        raise ProtocolError(f"{kind}: missing {key!r}", "missing")
    try:
        return finite_in_range(doc[key], lo, hi, f"{kind}.{key}", source=SOURCE)
    except InputRejected as exc:
        raise _rewrap(exc) from None


def _int(doc: dict[str, Any], key: str, lo: int, hi: int, kind: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{kind}.{key}: expected an integer, got {value!s:.20}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{kind}.{key}: {value} outside {lo}..{hi}", "out_of_range")
    return value


def _text(doc: dict[str, Any], key: str, kind: str, limit: int = 200) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{kind}.{key}: expected text of at most {limit} characters")
    return value


def _time(doc: dict[str, Any], key: str, kind: str) -> datetime:
    text = doc.get(key)
    if not isinstance(text, str) or len(text) > 40:
        raise ProtocolError(f"{kind}.{key}: expected an ISO-8601 time")
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ProtocolError(f"{kind}.{key}: expected an ISO-8601 time, got {text!r}") from None
    if at.tzinfo is None:
        raise ProtocolError(f"{kind}.{key}: a time without a zone is ambiguous")
    return at.astimezone(UTC)


def _node_id(doc: dict[str, Any], kind: str) -> str:
    value = doc.get("node_id")
    if not isinstance(value, str) or not NODE_ID.match(value):
        raise ProtocolError(f"{kind}.node_id: expected a node id ([A-Za-z0-9_.-], 64 at most)")
    return value


SEQ_MAX: Final = 2**53  # exact in JSON doubles


def decode_views(payload: bytes, expected_node: str) -> NodeViews:
    doc = _load(payload, "views", f"node {expected_node}")
    node_id = _node_id(doc, "views")
    if node_id != expected_node:
        raise ProtocolError(f"views from {node_id!r} on the topic of {expected_node!r}", "spoofed")
    kind = doc.get("kind")
    if kind not in {k.value for k in NodeKind}:
        raise ProtocolError(f"views.kind: expected gpu or miners, got {kind!s:.20}")
    raw_points = doc.get("points")
    if not isinstance(raw_points, list) or len(raw_points) > MAX_POINTS:
        raise ProtocolError(f"views.points: expected a list of at most {MAX_POINTS} points")
    points = []
    for i, p in enumerate(raw_points):
        if not isinstance(p, list) or len(p) != 2:
            raise ProtocolError(f"views.points[{i}]: expected [power_w, value_usd_per_h]")
        pd = {"power_w": p[0], "value_usd_per_h": p[1]}
        points.append(
            LadderPoint(
                _num(pd, "power_w", 0, MAX_SITE_W, f"views.points[{i}]"),
                _num(pd, "value_usd_per_h", -MAX_VALUE_USD_PER_H, MAX_VALUE_USD_PER_H, "views"),
            )
        )
    if any(b.power_w < a.power_w for a, b in itertools.pairwise(points)):
        raise ProtocolError("views.points: cumulative power must not fall", "out_of_range")
    faults = doc.get("faults", [])
    if (
        not isinstance(faults, list)
        or len(faults) > MAX_FAULTS
        or not all(isinstance(f, str) and len(f) <= 200 for f in faults)
    ):
        raise ProtocolError(f"views.faults: expected at most {MAX_FAULTS} short texts")
    applied = doc.get("applied", [0, 0])
    if not isinstance(applied, list) or len(applied) != 2:
        raise ProtocolError("views.applied: expected [epoch, seq]")
    ad = {"epoch": applied[0], "seq": applied[1]}
    envelope = doc.get("envelope_w")
    state = doc.get("state", "online")
    if state not in {s.value for s in NodeState}:
        raise ProtocolError(f"views.state: unknown state {state!s:.20}")
    floor_w = _num(doc, "floor_w", 0, MAX_SITE_W, "views")
    max_w = _num(doc, "max_w", 0, MAX_SITE_W, "views")
    if max_w < floor_w:
        raise ProtocolError("views: max_w below floor_w", "out_of_range")
    return NodeViews(
        node_id=node_id,
        kind=NodeKind(kind),
        seq=_int(doc, "seq", 0, SEQ_MAX, "views"),
        at=_time(doc, "at", "views"),
        floor_w=floor_w,
        max_w=max_w,
        measured_w=_num(doc, "measured_w", 0, MAX_SITE_W, "views"),
        envelope_w=None if envelope is None else _num(doc, "envelope_w", 0, MAX_SITE_W, "views"),
        points=tuple(points),
        devices=_int(doc, "devices", 0, 10_000_000, "views"),
        faults=tuple(faults),
        applied_epoch=_int(ad, "epoch", 0, SEQ_MAX, "views.applied"),
        applied_seq=_int(ad, "seq", 0, SEQ_MAX, "views.applied"),
        state=NodeState(state),
    )


def decode_command(payload: bytes) -> NodeCommand:
    doc = _load(payload, "cmd", "controller")
    issued = _time(doc, "issued_at", "cmd")
    until = _time(doc, "valid_until", "cmd")
    if until < issued or (until - issued).total_seconds() > MAX_VALIDITY_S:
        raise ProtocolError(f"cmd: validity window must be 0..{MAX_VALIDITY_S:g} s", "out_of_range")
    event = doc.get("event", False)
    if not isinstance(event, bool):
        raise ProtocolError("cmd.event: expected true or false")
    return NodeCommand(
        epoch=_int(doc, "epoch", 1, SEQ_MAX, "cmd"),
        seq=_int(doc, "seq", 1, SEQ_MAX, "cmd"),
        issued_at=issued,
        valid_until=until,
        envelope_w=_num(doc, "envelope_w", 0, MAX_SITE_W, "cmd"),
        price_usd_per_mwh=_num(
            doc, "price_usd_per_mwh", -MAX_PRICE_USD_PER_MWH, MAX_PRICE_USD_PER_MWH, "cmd"
        ),
        event=event,
        reason=_text(doc, "reason", "cmd"),
    )


def decode_ack(payload: bytes, expected_node: str) -> NodeAck:
    doc = _load(payload, "ack", f"node {expected_node}")
    node_id = _node_id(doc, "ack")
    if node_id != expected_node:
        raise ProtocolError(f"ack from {node_id!r} on the topic of {expected_node!r}", "spoofed")
    result = doc.get("result")
    if result not in {r.value for r in AckResult}:
        raise ProtocolError(f"ack.result: expected applied or refused, got {result!s:.20}")
    envelope = doc.get("envelope_w")
    return NodeAck(
        node_id=node_id,
        epoch=_int(doc, "epoch", 0, SEQ_MAX, "ack"),
        seq=_int(doc, "seq", 0, SEQ_MAX, "ack"),
        result=AckResult(result),
        reason=_text(doc, "reason", "ack"),
        at=_time(doc, "at", "ack"),
        envelope_w=None if envelope is None else _num(doc, "envelope_w", 0, MAX_SITE_W, "ack"),
    )


def decode_beat(payload: bytes) -> ControllerBeat:
    doc = _load(payload, "beat", "controller")
    return ControllerBeat(
        epoch=_int(doc, "epoch", 0, SEQ_MAX, "beat"),
        at=_time(doc, "at", "beat"),
        state=_text(doc, "state", "beat", 20),
    )


def decode_status(payload: bytes, sender: str) -> tuple[NodeState, str]:
    doc = _load(payload, "status", sender)
    state = doc.get("state")
    if state not in {s.value for s in NodeState}:
        raise ProtocolError(f"status.state: unknown state {state!s:.20}")
    return NodeState(state), _text(doc, "detail", "status")


# --- the rules both ends share --------------------------------------------------------------


@dataclass(slots=True)
class CommandLedger:
    """A node's memory of commands: the last applied (epoch, seq) and the acks it gave.

    The node journals ``epoch`` and ``seq`` after each applied command, so a restarted node
    refuses a replay of a command it applied before the restart.
    """

    epoch: int = 0
    seq: int = 0
    acks: dict[tuple[int, int], NodeAck] = field(default_factory=dict)
    keep: int = 64

    def remember(self, ack: NodeAck) -> None:
        self.acks[(ack.epoch, ack.seq)] = ack
        while len(self.acks) > self.keep:
            self.acks.pop(next(iter(self.acks)))


@dataclass(frozen=True, slots=True)
class Admission:
    """What a node does with one command: apply it, answer with an earlier ack, or refuse."""

    apply: bool
    ack: NodeAck | None  # an earlier ack to publish again (a duplicate delivery)
    refusal: str | None


def admit(cmd: NodeCommand, ledger: CommandLedger, now: datetime, node_id: str) -> Admission:
    """Whether a node applies ``cmd``: duplicates are answered, replays and stale ones refused."""
    earlier = ledger.acks.get((cmd.epoch, cmd.seq))
    if earlier is not None:
        return Admission(False, earlier, None)
    if cmd.epoch < ledger.epoch:
        return Admission(False, None, f"replay: epoch {cmd.epoch} is older than {ledger.epoch}")
    if cmd.epoch == ledger.epoch and cmd.seq <= ledger.seq:
        return Admission(
            False, None, f"replay: seq {cmd.seq} is not after the applied seq {ledger.seq}"
        )
    if now > cmd.valid_until:
        late = (now - cmd.valid_until).total_seconds()
        return Admission(False, None, f"stale: arrived {late:.1f} s after its validity window")
    if cmd.issued_at - now > timedelta(seconds=30):
        return Admission(False, None, "issued in the future: the two clocks disagree by > 30 s")
    return Admission(True, None, None)


@dataclass(frozen=True, slots=True)
class LostControllerRule:
    """What a node does when the controller falls silent (the node's config)."""

    fail_after_s: float
    fail_direction: str  # "shed" or "hold"


def envelope_when_silent(
    last: NodeCommand | None,
    last_heard: datetime | None,
    now: datetime,
    rule: LostControllerRule,
    floor_w: float,
) -> tuple[float | None, NodeState]:
    """The envelope a node holds while it hears nothing from the controller, and its state.

    ``None`` means no limit: a node that has never been granted anything runs unlimited only
    until its fail time (it starts ``holding`` its nameplate, which the controller counts).
    Inside a mandatory event the node keeps the event's (shed) envelope whatever the rule.
    """
    if last is None or last_heard is None:
        silent_s = float("inf") if last_heard is None else (now - last_heard).total_seconds()
        if silent_s >= rule.fail_after_s and rule.fail_direction == "shed":
            return floor_w, NodeState.FAILSAFE
        return None, NodeState.HOLDING
    silent_s = (now - last_heard).total_seconds()
    if silent_s < rule.fail_after_s:
        return last.envelope_w, (NodeState.ONLINE if now <= last.valid_until else NodeState.HOLDING)
    if last.event or rule.fail_direction == "hold":
        return last.envelope_w, NodeState.FAILSAFE
    return min(last.envelope_w, floor_w), NodeState.FAILSAFE


def worst_case_w(views: NodeViews | None, configured_max_w: float) -> float:
    """The power a controller counts for a node it cannot hear: the last ``max_w`` it reported,
    or the configured nameplate if it never reported."""
    return configured_max_w if views is None else max(views.max_w, views.measured_w)


def grant_for(views: NodeViews, envelope_w: float) -> tuple[float, float]:
    """The point of the node's ladder an envelope buys: (power_w, value_usd_per_h).

    Points are cumulative: the last one at or under the envelope (the floor, with no value,
    when none fits)."""
    best = (views.floor_w, 0.0)
    for p in views.points:
        if p.power_w <= envelope_w + 1e-6:
            best = (p.power_w, p.value_usd_per_h)
    return best
