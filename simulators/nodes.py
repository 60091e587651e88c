"""Many virtual node agents in one process, each a real peer on the broker (issue 11).

Each virtual node is its own MQTT connection with its own username, and speaks the node
protocol as the README writes it down ("Node agents: the protocol"), implemented here from that
description, not imported from ``agent/`` (a simulator imports neither ``agent/`` nor
``drivers/``): it publishes its views (retained, QoS 1) with a supply curve of merit steps, takes
envelope commands on its ``cmd`` topic, refuses other protocol versions, replays (epoch, seq at
or below the last applied) and stale commands (after ``valid_until``), answers a duplicate with
its first ack, and "draws" at most its envelope after ``apply_delay_s`` (its devices ramping),
which its next views report.

A miner partition is ``miners`` identical miners in ``blocks`` blocks (one ladder step each); a
GPU host is ``gpus`` GPUs whose step runs from the minimum cap to the maximum.

Run: ``python -m simulators.nodes --host 127.0.0.1 --port 1883 --partitions 200 --gpu-hosts 64``
(user and password per node: ``<node id>`` / ``<node id>-secret`` unless ``--password``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt

VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class VirtualNode:
    """One node's devices and its memory of commands."""

    node_id: str
    kind: str  # "miners" or "gpu"
    floor_w: float
    steps: list[tuple[float, float]]  # (power_w, value_usd_per_h), best value per watt first
    devices: int
    apply_delay_s: float = 0.2
    envelope_w: float | None = None
    drawn_w: float = 0.0
    epoch: int = 0
    seq: int = 0
    acks: dict[tuple[int, int], bytes] = field(default_factory=dict)
    views_seq: int = 0
    applied: list[tuple[int, int]] = field(default_factory=list)

    @property
    def max_w(self) -> float:
        return self.floor_w + sum(p for p, _ in self.steps)

    def __post_init__(self) -> None:
        self.drawn_w = self.max_w

    def points(self) -> list[list[float]]:
        out, power, value = [], self.floor_w, 0.0
        for step_w, step_value in self.steps:
            power += step_w
            value += step_value
            out.append([power, value])
        return out

    def target_w(self) -> float:
        """What the node draws under its envelope: whole merit steps, best first."""
        if self.envelope_w is None:
            return self.max_w
        drawn = self.floor_w
        for step_w, _ in self.steps:
            if drawn + step_w > self.envelope_w + 1e-6:
                break
            drawn += step_w
        return drawn

    def views(self) -> bytes:
        self.views_seq += 1
        doc = {
            "v": VERSION,
            "type": "views",
            "node_id": self.node_id,
            "kind": self.kind,
            "seq": self.views_seq,
            "at": _now_iso(),
            "floor_w": self.floor_w,
            "max_w": self.max_w,
            "measured_w": self.drawn_w,
            "envelope_w": self.envelope_w,
            "points": self.points(),
            "devices": self.devices,
            "faults": [],
            "applied": [self.epoch, self.seq],
            "state": "online",
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def ack(self, epoch: int, seq: int, result: str, reason: str) -> bytes:
        doc = {
            "v": VERSION,
            "type": "ack",
            "node_id": self.node_id,
            "epoch": epoch,
            "seq": seq,
            "result": result,
            "reason": reason[:200],
            "at": _now_iso(),
            "envelope_w": self.envelope_w if result == "applied" else None,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def command(self, payload: bytes) -> bytes | None:
        """The ack to publish for one command payload (None: not a command we can answer)."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            return None
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(doc, dict) or doc.get("type") != "cmd":
            return None
        epoch, seq = doc.get("epoch"), doc.get("seq")
        if not isinstance(epoch, int) or not isinstance(seq, int) or isinstance(seq, bool):
            return None
        if doc.get("v") != VERSION:
            return self.ack(epoch, seq, "refused", f"protocol v{doc.get('v')}, node speaks v1")
        earlier = self.acks.get((epoch, seq))
        if earlier is not None:
            return earlier
        envelope = doc.get("envelope_w")
        try:
            until = datetime.fromisoformat(str(doc.get("valid_until")))
        except ValueError:
            return self.ack(epoch, seq, "refused", "valid_until is not a time")
        if (
            not isinstance(envelope, int | float)
            or isinstance(envelope, bool)
            or not math.isfinite(envelope)
            or not 0 <= envelope <= 2e9
        ):
            return self.ack(epoch, seq, "refused", "envelope_w out of range")
        if (epoch, seq) <= (self.epoch, self.seq):
            return self.ack(epoch, seq, "refused", f"replay: ({epoch}, {seq}) already passed")
        if datetime.now(UTC) > until:
            return self.ack(epoch, seq, "refused", "stale: after its validity window")
        self.epoch, self.seq, self.envelope_w = epoch, seq, float(envelope)
        self.applied.append((epoch, seq))
        ack = self.ack(epoch, seq, "applied", "within envelope")
        self.acks[(epoch, seq)] = ack
        if len(self.acks) > 64:
            self.acks.pop(next(iter(self.acks)))
        return ack


def miner_partition(node_id: str, miners: int, blocks: int = 10) -> VirtualNode:
    """``miners`` S19j Pro-class miners (3,068 W at 104 TH/s, 30 W asleep) in ``blocks`` steps."""
    per_block = [miners // blocks + (1 if i < miners % blocks else 0) for i in range(blocks)]
    # Newer blocks are a little more efficient: the merit order inside a partition.
    steps = [
        (n * 3038.0, n * 104.0 * (1.0 + 0.02 * (blocks - i)) * 55 / 1000 / 24 * 0.98)
        for i, n in enumerate(per_block)
        if n
    ]
    steps.sort(key=lambda s: s[1] / s[0], reverse=True)
    return VirtualNode(node_id, "miners", miners * 30.0, steps, miners)


def gpu_host(node_id: str, gpus: int = 8) -> VirtualNode:
    """An 8-GPU host: 1.5 kW of host, GPUs capped 200..700 W, jobs worth ~2 $/GPU-h."""
    return VirtualNode(node_id, "gpu", 1500.0 + gpus * 200.0, [(gpus * 500.0, gpus * 2.0)], gpus)


@dataclass
class Peer:
    node: VirtualNode
    site_id: str

    def topic(self, kind: str) -> str:
        return f"site-agent/{self.site_id}/node/{self.node.node_id}/{kind}"


async def run_peer(
    peer: Peer,
    host: str,
    port: int,
    password: str | None,
    stop: asyncio.Event,
    views_interval_s: float,
) -> None:
    node = peer.node
    will = aiomqtt.Will(
        peer.topic("status"),
        json.dumps({"v": VERSION, "type": "status", "state": "offline"}).encode(),
        1,
        True,
    )
    while not stop.is_set():
        try:
            async with aiomqtt.Client(
                host,
                port,
                username=node.node_id,
                password=password if password is not None else f"{node.node_id}-secret",
                identifier=f"sim-{node.node_id}",
                will=will,
                keepalive=30,
                clean_session=True,
            ) as client:
                await client.subscribe(peer.topic("cmd"), qos=1)
                await client.publish(peer.topic("views"), node.views(), qos=1, retain=True)
                changed = asyncio.Event()

                async def apply_later(changed: asyncio.Event = changed) -> None:
                    await asyncio.sleep(node.apply_delay_s)
                    node.drawn_w = node.target_w()
                    changed.set()

                async def receive() -> None:
                    async for msg in client.messages:
                        payload = msg.payload
                        if not isinstance(payload, bytes | bytearray):
                            continue
                        ack = node.command(bytes(payload))
                        if ack is not None:
                            await client.publish(peer.topic("ack"), ack, qos=1)
                            asyncio.get_running_loop().create_task(apply_later())

                async def publish_views(changed: asyncio.Event = changed) -> None:
                    while True:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), views_interval_s)
                        changed.clear()
                        await client.publish(peer.topic("views"), node.views(), qos=1, retain=True)

                tasks = [asyncio.create_task(receive()), asyncio.create_task(publish_views())]
                stopper = asyncio.create_task(stop.wait())
                try:
                    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (*tasks, stopper):
                        t.cancel()
                    await asyncio.gather(*tasks, stopper, return_exceptions=True)
        except aiomqtt.MqttError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


def virtual_site(partitions: int, miners: int, gpu_hosts: int) -> list[VirtualNode]:
    nodes = [miner_partition(f"part-{i:03d}", miners // partitions) for i in range(partitions)]
    nodes += [gpu_host(f"gpu-{i:03d}") for i in range(gpu_hosts)]
    return nodes


async def serve(args: argparse.Namespace) -> None:
    nodes = virtual_site(args.partitions, args.miners, args.gpu_hosts)
    stop = asyncio.Event()
    peers = [Peer(n, args.site) for n in nodes]
    started = time.monotonic()
    tasks = [
        asyncio.create_task(
            run_peer(p, args.host, args.port, args.password, stop, args.views_interval_s)
        )
        for p in peers
    ]
    print(
        json.dumps(
            {
                "nodes": len(nodes),
                "miners": sum(n.devices for n in nodes if n.kind == "miners"),
                "started_s": round(time.monotonic() - started, 3),
            }
        ),
        flush=True,
    )
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--site", default="bench")
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--miners", type=int, default=100_000)
    parser.add_argument("--gpu-hosts", type=int, default=64)
    parser.add_argument("--password", default=None)
    parser.add_argument("--views-interval-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
