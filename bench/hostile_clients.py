"""Benchmark: /metrics and the MQTT bridge keep serving under 200 concurrent hostile clients.

This process runs the real :class:`agent.runtime.Agent` as ``site-agent run`` builds it: LuxOS
simulators in their own process (``python -m simulators.luxos`` on a per-process loopback
net), the pyasic driver, an HTTP price feed, the metrics listener (:class:`MetricsService`) and
the MQTT bridge (:class:`MqttBridge`, the runtime's inbox as its handler) on a real Mosquitto
started as ``tests/servers.py`` does. The attackers are another process, on loopback only:

* slowloris clients on ``/metrics``: a request trickled one byte every 0.5 s;
* clients that send ``GET /metrics`` and never read the answer;
* clients that send a request line of 100 KiB (the server's limit is 64 KiB);
* MQTT clients: some that try to connect without a password (the broker refuses them), the
  others publishing garbage, 32 KiB oversized and bad-token commands at ``P/command/*``.

Each attacker reconnects when the server drops it, so 200 are held for the whole phase. The
same process also runs one well-behaved scraper (``GET /metrics`` every 0.5 s, timed) in every
phase, and this process sends one legitimate operator command (``refresh``, right token) every
second and times its ack. Phases alternate, quiet then hostile, ``--rounds`` times, and every
control cycle's duration (``AgentState.last_cycle_duration_s``, recorded by an observer) goes to
its phase. Figures, one JSON line each:

* ``cycle_ms_quiet`` / ``cycle_ms_hostile``: median cycle, mean and count beside it;
* ``cycle_overhead_pct``: median hostile over median quiet, minus one (``pass``: under 10 %);
* ``scrape_ms_quiet`` / ``scrape_ms_hostile``: the good scraper's latency (median, max, fails);
* ``operator_acks_quiet`` / ``operator_acks_hostile``: legitimate commands acked ``accepted``
  of those sent, with the ack latency;
* ``rejected_hostile``: MQTT commands the agent counted as rejected, by reason, and the
  hostile connections the attackers opened (refused MQTT connects included).

Bounded: a fixed number of clients, phases and seconds; it stops by itself.
Run: ``.venv/bin/python bench/hostile_clients.py [--miners 100] [--clients 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.control.config import parse_config  # noqa: E402
from agent.outputs.metrics import MetricsService  # noqa: E402
from agent.outputs.mqtt import MqttBridge  # noqa: E402
from agent.runtime.inbox import CommandInbox  # noqa: E402
from agent.runtime.loop import CycleHook, Service  # noqa: E402
from agent.runtime.state import AgentState  # noqa: E402
from bench.agent_spike import MODELS, emit, free_port, start_simulator  # noqa: E402
from drivers.bus.base import BusSettings  # noqa: E402
from drivers.bus.mqtt import MqttBus  # noqa: E402
from simulators.luxos import raise_open_file_limit  # noqa: E402
from simulators.price_server import PriceServer  # noqa: E402
from tests.servers import Mosquitto  # noqa: E402
from tests.site_agent import build_agent  # noqa: E402

TOKEN = "bench-operator-token"

# The attackers' process. argv: http_port mqtt_port prefix n_hostile; stdin closing stops it.
# It prints "ready" once every attacker has connected, then on stop one JSON line: the good
# scraper's latencies and failures, and the hostile connections opened per kind.
ATTACKERS = r"""
import asyncio, json, sys, time
http_port, mqtt_port, prefix, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
H = "127.0.0.1"
opened = {}
scrapes, fails = [], 0

def s(b): return len(b).to_bytes(2, "big") + b
def rl(n):
    out = b""
    while True:
        d, n = n % 128, n // 128
        out += bytes([d | (0x80 if n else 0)])
        if not n: return out
def packet(kind, body): return bytes([kind]) + rl(len(body)) + body
def connect(cid, user=None, pw=None):
    flags = 0x02 | (0xC0 if user else 0)
    body = s(b"MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + s(cid.encode())
    if user: body += s(user.encode()) + s(pw.encode())
    return packet(0x10, body)
def publish(topic, payload): return packet(0x30, s(topic.encode()) + payload)

class Once:
    def __init__(self, sem): self.sem, self.done = sem, False
    def release(self):
        if not self.done: self.done = True; self.sem.release()

async def held(kind, sem, body):
    # One hostile client, reconnecting whenever the server drops it, until cancelled.
    ready = Once(sem)
    while True:
        try:
            opened[kind] = opened.get(kind, 0) + 1
            await body(True, ready)
        except (OSError, asyncio.IncompleteReadError):
            pass
        ready.release()  # counted as started even if its first try failed
        await asyncio.sleep(0.2)

async def slowloris(first, ready):
    r, w = await asyncio.open_connection(H, http_port)
    if first: ready.release()
    try:
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10000:
            w.write(bytes([b])); await w.drain(); await asyncio.sleep(0.5)
    finally:
        w.close()

async def never_read(first, ready):
    r, w = await asyncio.open_connection(H, http_port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"); await w.drain()
    if first: ready.release()
    try:
        while True:  # hold the socket and read nothing; notice a close only by writing
            await asyncio.sleep(1.0)
            w.write(b"x"); await w.drain()
    finally:
        w.close()

async def long_line(first, ready):
    r, w = await asyncio.open_connection(H, http_port)
    if first: ready.release()
    try:
        w.write(b"GET /" + b"A" * 100_000 + b" HTTP/1.1\r\n\r\n"); await w.drain()
        await r.read()  # until the server closes
    finally:
        w.close()

async def mqtt_anon(first, ready):
    r, w = await asyncio.open_connection(H, mqtt_port)
    if first: ready.release()
    try:
        w.write(connect(f"anon-{id(w)}")); await w.drain()
        await r.read()  # CONNACK "not authorised", then the broker closes
    finally:
        w.close()

def garbage(i, k):
    c = ["curtail", "release", "set_mode", "refresh", "x" * 40][k % 5]
    kinds = [
        b"\xff\xfe not json",
        b"{" * 5000,
        json.dumps({"id": f"h{i}-{k}", "operator": "operator", "token": "bad", "mode": "manual"})
        .encode(),
        json.dumps({"id": f"h{i}-{k}", "operator": "mallory", "token": "x"}).encode(),
        b'{"id": "big", "pad": "' + b"A" * 32768 + b'"}',
        json.dumps({"id": f"h{i}-{k}", "operator": "operator", "token": "t", "target_kw": 1e308})
        .encode(),
    ]
    return f"{prefix}/command/{c}", kinds[k % len(kinds)]

async def mqtt_garbage(first, ready, i=[0]):
    i[0] += 1; me = i[0]
    r, w = await asyncio.open_connection(H, mqtt_port)
    try:
        w.write(connect(f"hostile-{me}-{time.monotonic_ns()}", "operator", "operator-secret"))
        await w.drain()
        ack = await r.readexactly(4)
        if first: ready.release()
        k = 0
        while True:
            topic, payload = garbage(me, k); k += 1
            w.write(publish(topic, payload)); await w.drain()
            await asyncio.sleep(1.0)
    finally:
        w.close()

async def scraper():
    global fails
    while True:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(5):
                r, w = await asyncio.open_connection(H, http_port)
                w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"); await w.drain()
                data = await r.read()
                w.close()
            if not data.startswith(b"HTTP/1.1 200") or b"site_agent_" not in data:
                raise OSError("bad answer")
            scrapes.append((time.perf_counter() - t0) * 1000)
        except (OSError, TimeoutError):
            fails += 1
        await asyncio.sleep(0.5)

async def main():
    kinds = [slowloris, never_read, long_line, mqtt_anon, mqtt_garbage]
    weights = [0.25, 0.25, 0.15, 0.1, 0.25]
    plan = []
    for kind, wgt in zip(kinds, weights):
        plan += [kind] * int(round(n * wgt))
    plan = plan[:n] + [slowloris] * max(0, n - len(plan))
    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(held(k.__name__, ready, k)) for k in plan]
    for _ in plan:
        async with asyncio.timeout(30):
            await ready.acquire()
    tasks.append(asyncio.create_task(scraper()))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for t in tasks: t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"scrapes_ms": scrapes, "fails": fails, "opened": opened}), flush=True)

asyncio.run(main())
"""


async def bench(n_miners: int, n_clients: int, phase_s: float, rounds: int, base: str) -> None:
    raise_open_file_limit()
    control_port = free_port()
    proc, rows = start_simulator(n_miners, base, control_port)
    with tempfile.TemporaryDirectory(prefix="hostile-bench-") as tmp:
        # The daemon logs every refusal; so does this run (the cost counts), into a file.
        logging.basicConfig(level=logging.INFO, filename=Path(tmp) / "agent.log")
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            async with PriceServer([20.0], interval_s=3600) as prices:
                await run_agent(broker, prices.url, rows, n_miners, n_clients, phase_s, rounds)
        finally:
            broker.stop()
            proc.terminate()
            proc.wait()


async def run_agent(
    broker: Mosquitto,
    price_url: str,
    rows: list[Any],
    n_miners: int,
    n_clients: int,
    phase_s: float,
    rounds: int,
) -> None:
    config = parse_config(
        {
            "site": {"id": "bench", "interconnect_limit_kw": n_miners * 5},
            "control": {
                "interval_s": 0.5,
                "poll_interval_s": 1,
                "poll_jitter_s": 0.1,
                "device_timeout_s": 5,
                "verify_after_s": 20,
                "min_on_s": 0,
                "min_off_s": 600,
            },
            "metrics": {"port": 0},
            "mqtt": {
                "enabled": True,
                "host": broker.host,
                "port": broker.port,
                "username": "agent",
                "password": "agent-secret",
                "command_tokens": {"operator": TOKEN},
                "reconnect_initial_s": 0.1,
                "reconnect_max_s": 1,
            },
            "miner_models": MODELS,
            "miners": [
                {"id": f"m{i:04d}", "address": r["address"], "model": r["model"]}
                for i, r in enumerate(rows)
            ],
            "prices": {
                "realtime": {
                    "type": "http_json",
                    "url": f"{price_url}/price",
                    "value_path": "data.0.price",
                    "time_path": "data.0.time",
                    "poll_interval_s": 1,
                }
            },
        }
    )
    # Built as agent.cli.daemon.serve builds it (tests/site_agent.py::build_agent): state,
    # inbox, the outputs, then the agent.
    inbox = CommandInbox()
    built: dict[str, Any] = {}
    durations: list[float] = []

    def outputs(state: AgentState) -> list[Service]:
        built["bridge"] = MqttBridge(
            config.mqtt,
            state,
            inbox.submit,
            count_rejected=inbox.reject,
            audit_rejection=inbox.audit,
            interconnect_limit_w=config.site.interconnect_limit_kw * 1000.0,
        )
        built["metrics"] = MetricsService(state, config, host="127.0.0.1", port=0)
        return [built["metrics"], built["bridge"]]

    def observers(state: AgentState) -> list[CycleHook]:
        def observe(_s: Any, _p: Any, _r: Any) -> None:
            durations.append(state.last_cycle_duration_s)
            built["bridge"].publish_cycle()

        return [observe]

    agent = build_agent(config, outputs=outputs, observers=observers, inbox=inbox)
    state = agent.state
    metrics: MetricsService = built["metrics"]
    bridge: MqttBridge = built["bridge"]
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + 60
    while state.cycles < 5 or not bridge.connected.is_set():
        if time.monotonic() > deadline or task.done():
            raise RuntimeError("the agent did not start cycling with the bridge connected")
        await asyncio.sleep(0.2)
    prefix = bridge.prefix
    operator = MqttBus(
        BusSettings(broker.host, broker.port, "bench-op", "operator", broker.users["operator"])
    )
    results: dict[str, dict[str, Any]] = {
        k: {"cycles": [], "scrapes": [], "fails": 0, "acks": [], "sent": 0, "opened": Counter()}
        for k in ("quiet", "hostile")
    }
    rejected_before = Counter(state.rejected)
    async with operator.session() as op:
        await op.subscribe(f"{prefix}/ack", qos=1)
        acks = op.messages()
        for r in range(rounds):
            for kind in ("quiet", "hostile"):
                await phase(
                    kind, n_clients if kind == "hostile" else 0, r, phase_s, metrics.port,
                    broker.port, prefix, op, acks, durations, results[kind],
                )  # fmt: skip
    stop.set()
    await task
    rejected = Counter(state.rejected) - rejected_before
    report(results, rejected, n_clients, n_miners)


async def phase(
    kind: str,
    clients: int,
    round_no: int,
    phase_s: float,
    http_port: int,
    mqtt_port: int,
    prefix: str,
    op: Any,
    acks: Any,
    durations: list[float],
    out: dict[str, Any],
) -> None:
    """One phase: ``clients`` attackers (0: only the good scraper) for ``phase_s`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ATTACKERS, str(http_port), str(mqtt_port), prefix, str(clients),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    async with asyncio.timeout(60):
        line = await proc.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError(f"attackers did not start: {line!r}")
    start = len(durations)
    end = time.monotonic() + phase_s
    seq = 0
    while time.monotonic() < end:
        # A legitimate operator's command; its ack must come back (others' acks are skipped).
        seq += 1
        cid = f"op-{kind}-{round_no}-{seq}"
        body = {"id": cid, "operator": "operator", "token": TOKEN}
        t0 = time.perf_counter()
        out["sent"] += 1
        await op.publish(f"{prefix}/command/refresh", json.dumps(body).encode(), qos=1)
        try:
            async with asyncio.timeout(5):
                while True:
                    ack = json.loads((await anext(acks)).payload)
                    if ack.get("id") == cid:
                        break
            if ack["status"] == "accepted":
                out["acks"].append((time.perf_counter() - t0) * 1000)
        except TimeoutError:
            pass
        await asyncio.sleep(max(0.0, min(1.0, end - time.monotonic())))
    out["cycles"] += durations[start:]
    proc.stdin.close()
    async with asyncio.timeout(30):
        summary = json.loads(await proc.stdout.readline())
        await proc.wait()
    out["scrapes"] += summary["scrapes_ms"]
    out["fails"] += summary["fails"]
    out["opened"].update(summary["opened"])


def report(
    results: dict[str, dict[str, Any]], rejected: Counter[Any], n_clients: int, n: int
) -> None:
    quiet, hostile = results["quiet"], results["hostile"]
    for kind, r in results.items():
        ms = [d * 1000 for d in r["cycles"]]
        emit(
            f"cycle_ms_{kind}",
            statistics.median(ms),
            "ms",
            n,
            mean_ms=round(statistics.fmean(ms), 3),
            cycles=len(ms),
            clients=n_clients if kind == "hostile" else 0,
        )
    med = {k: statistics.median(r["cycles"]) for k, r in results.items()}
    mean = {k: statistics.fmean(r["cycles"]) for k, r in results.items()}
    overhead = (med["hostile"] / med["quiet"] - 1.0) * 100.0
    emit(
        "cycle_overhead_pct",
        overhead,
        "%",
        n,
        clients=n_clients,
        limit_pct=10,
        mean_overhead_pct=round((mean["hostile"] / mean["quiet"] - 1.0) * 100.0, 2),
        **{"pass": overhead < 10},
    )
    for kind, r in results.items():
        s = r["scrapes"]
        emit(
            f"scrape_ms_{kind}",
            statistics.median(s) if s else float("nan"),
            "ms",
            n,
            max_ms=round(max(s), 1) if s else None,
            ok=len(s),
            failed=r["fails"],
        )
    for kind, r in results.items():
        a = r["acks"]
        emit(
            f"operator_acks_{kind}",
            len(a),
            "acks",
            n,
            sent=r["sent"],
            median_ack_ms=round(statistics.median(a), 1) if a else None,
            max_ack_ms=round(max(a), 1) if a else None,
        )
    mqtt = {reason: c for (source, reason), c in rejected.items() if source == "mqtt"}
    emit(
        "rejected_hostile",
        sum(mqtt.values()),
        "commands",
        n,
        by_reason=mqtt,
        hostile_connections=dict(hostile["opened"]),
        quiet_operator_ok=len(quiet["acks"]) == quiet["sent"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--miners", type=int, default=100)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default="127.62.0.1")
    args = parser.parse_args()
    asyncio.run(bench(args.miners, args.clients, args.phase_s, args.rounds, args.base))


if __name__ == "__main__":
    main()
