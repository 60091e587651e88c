"""Benchmark: what 50 open operator-page clients cost the control cycle, side by side in one run.

The miners run in a separate process (``python -m simulators.luxos``); this process runs the real
:class:`agent.runtime.Agent` (pyasic driver, HTTP price feed) with the metrics listener and the
operator page on it, built by ``tests/site_agent.py::build_agent`` as the daemon builds it. The
page clients are another process: 50 plain sockets that each hold ``GET /events`` open and read
every message, as browsers would.

The run interleaves short phases of ``--phase-s`` seconds, 0 clients then 50 clients (ABAB...),
``--rounds`` times, so that a neighbour's burst on this shared machine falls on both kinds alike.
It records every control cycle's duration (``AgentState.last_cycle_duration_s``), the process's
CPU time, and the page's own fan-out time (``OperatorPage.fanout_s``: handing one view to every
stream client, the only per-client work) in each phase. Figures, one JSON line each:

* ``cycle_ms_0_clients`` / ``cycle_ms_50_clients``: median control-cycle duration per phase
  kind, with the mean, the 10 %-trimmed mean and the cycle count alongside;
* ``cpu_ms_per_cycle_0_clients`` / ``..._50_clients``: this process's CPU time per control
  cycle in each phase: what the page's fan-out costs in all, on or off the cycle;
* ``fanout_ms_per_cycle_0_clients`` / ``..._50_clients``: the page's fan-out time per cycle,
  measured inside the page, with the view's size in bytes;
* ``cycle_overhead_pct``: with clients over without, minus one, in percent, for the median
  (``value``), the mean, the trimmed mean and CPU per cycle, each with its ratio; ``pass`` says
  whether both the median and the mean are under 5 %. ``pairs_overhead_pct``: the median over
  rounds of each round's own mean-over-mean (a round's two phases are seconds apart);
* ``page_messages_per_client``: views each client received (proves they were live);
* ``page_publish_ms``: building and handing out one view, timed over 200 calls at the end.

Run: ``.venv/bin/python bench/page_clients.py [--miners 200] [--clients 50] [--phase-s 2]
[--rounds 12]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.control.config import parse_config  # noqa: E402
from agent.control.domain import Plan, Snapshot  # noqa: E402
from agent.outputs.metrics import MetricsService  # noqa: E402
from agent.outputs.page import OperatorPage  # noqa: E402
from agent.runtime.actuator import ActionResult  # noqa: E402
from agent.runtime.loop import CycleHook, Service  # noqa: E402
from agent.runtime.state import AgentState  # noqa: E402
from bench.agent_spike import MODELS, cpu_s, emit, free_port, start_simulator  # noqa: E402
from simulators.luxos import raise_open_file_limit  # noqa: E402
from simulators.price_server import PriceServer  # noqa: E402
from tests.site_agent import build_agent  # noqa: E402

# The clients' process: N sockets on /events, counting "event: view" lines until stdin closes.
CLIENTS = r"""
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
counts = {}
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
    counts[i] = 0
sel.register(sys.stdin, selectors.EVENT_READ, "stop")
print("connected", flush=True)
tails = {i: b"" for i in counts}
while True:
    for key, _ in sel.select():
        if key.data == "stop":
            print(min(counts.values()), flush=True)
            sys.exit(0)
        data = key.fileobj.recv(1 << 16)
        if not data:
            sel.unregister(key.fileobj)
            continue
        buf = tails[key.data] + data
        counts[key.data] += buf.count(b"event: view\n")
        tails[key.data] = buf[-16:]
"""


async def bench(n_miners: int, n_clients: int, phase_s: float, rounds: int, base: str) -> None:
    raise_open_file_limit()
    control_port = free_port()
    proc, rows = start_simulator(n_miners, base, control_port)
    try:
        async with PriceServer([20.0], interval_s=3600) as prices:
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
                    "miner_models": MODELS,
                    "miners": [
                        {"id": f"m{i:04d}", "address": r["address"], "model": r["model"]}
                        for i, r in enumerate(rows)
                    ],
                    "prices": {
                        "realtime": {
                            "type": "http_json",
                            "url": f"{prices.url}/price",
                            "value_path": "data.0.price",
                            "time_path": "data.0.time",
                            "poll_interval_s": 1,
                        }
                    },
                }
            )
            # The listener and the page as ``site-agent run`` builds them (MetricsService), with
            # the page object kept to count its clients and room for every one of them.
            built: dict[str, Any] = {}
            durations: list[float] = []

            def outputs(state: AgentState) -> Sequence[Service]:
                page = built["page"] = OperatorPage(state, config, max_clients=max(32, n_clients))
                metrics = built["metrics"] = MetricsService(
                    state, config, host="127.0.0.1", port=0, page=page
                )
                return [metrics]

            def observers(state: AgentState) -> Sequence[CycleHook]:
                def record(_s: Snapshot, _p: Plan, _r: Sequence[ActionResult]) -> None:
                    durations.append(state.last_cycle_duration_s)

                return [record]

            agent = build_agent(config, outputs=outputs, observers=observers)
            page, metrics = built["page"], built["metrics"]
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            while agent.state.cycles < 5:  # noqa: ASYNC110 (polling a counter is the point)
                await asyncio.sleep(0.2)
            rows_by_kind: dict[int, list[Phase]] = {0: [], n_clients: []}
            delivered: list[int] = []
            for _ in range(rounds):
                for clients in (0, n_clients):
                    result = await phase(page, metrics.port, clients, phase_s, durations)
                    rows_by_kind[clients].append(result)
                    if clients:
                        delivered.append(result.received)
            stop.set()
            await task
            view_bytes = len(json.dumps(page.publish(), separators=(",", ":")))
            report(rows_by_kind, n_clients, delivered, n_miners, view_bytes)
            t0 = time.perf_counter()
            for _ in range(200):
                page.publish()
            emit("page_publish_ms", (time.perf_counter() - t0) / 200 * 1000, "ms", n_miners)
    finally:
        proc.terminate()
        proc.wait()


@dataclass
class Phase:
    """One phase's cycle durations (s), CPU seconds, page fan-out seconds and views sent."""

    cycles: list[float]
    cpu_s: float
    fanout_s: float
    received: int = 0


async def phase(
    page: OperatorPage, port: int, clients: int, phase_s: float, durations: list[float]
) -> Phase:
    """One phase: ``clients`` open streams for ``phase_s`` while cycle durations are recorded."""
    proc = None
    if clients:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENTS,
            str(port),
            str(clients),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"connected"
        deadline = time.monotonic() + 10
        while page.client_count < clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {page.client_count} of {clients} clients connected")
            await asyncio.sleep(0.05)
    start, cpu0, fan0 = len(durations), cpu_s(), page.fanout_s
    await asyncio.sleep(phase_s)
    result = Phase(durations[start:], cpu_s() - cpu0, page.fanout_s - fan0)
    if proc is None:
        return result
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert page.client_count == clients, "a client was dropped"
    proc.stdin.close()
    result.received = int((await proc.stdout.readline()).strip())
    await proc.wait()
    # The next quiet phase starts with no stream left open.
    deadline = time.monotonic() + 10
    while page.client_count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{page.client_count} page clients still open after hanging up")
        await asyncio.sleep(0.05)
    return result


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k : len(ordered) - k] or ordered)


def report(
    rows_by_kind: dict[int, list[Phase]],
    n_clients: int,
    delivered: list[int],
    n: int,
    view_bytes: int,
) -> None:
    base, loaded = rows_by_kind[0], rows_by_kind[n_clients]

    def cycles(rows: list[Phase]) -> list[float]:
        return [c for r in rows for c in r.cycles]

    def per_cycle(rows: list[Phase], attr: str) -> float:
        return sum(getattr(r, attr) for r in rows) / max(len(cycles(rows)), 1)

    for clients, rows in ((0, base), (n_clients, loaded)):
        values = cycles(rows)
        emit(
            f"cycle_ms_{clients}_clients",
            statistics.median(values) * 1000,
            "ms",
            n,
            mean_ms=round(statistics.fmean(values) * 1000, 3),
            trimmed_mean_ms=round(trimmed_mean(values) * 1000, 3),
            cycles=len(values),
            phases=len(rows),
        )
        emit(f"cpu_ms_per_cycle_{clients}_clients", per_cycle(rows, "cpu_s") * 1000, "ms", n)
        emit(
            f"fanout_ms_per_cycle_{clients}_clients",
            per_cycle(rows, "fanout_s") * 1000,
            "ms",
            n,
            view_bytes=view_bytes,
        )

    def ratio(f: Callable[[list[float]], float]) -> float:
        return f(cycles(loaded)) / f(cycles(base))

    cpu_ratio = per_cycle(loaded, "cpu_s") / per_cycle(base, "cpu_s")
    pairs = [
        statistics.fmean(w.cycles) / statistics.fmean(b.cycles) - 1.0
        for b, w in zip(base, loaded, strict=True)
        if b.cycles and w.cycles
    ]
    median_pct = (ratio(statistics.median) - 1.0) * 100.0
    mean_pct = (ratio(statistics.fmean) - 1.0) * 100.0
    emit(
        "cycle_overhead_pct",
        median_pct,
        "%",
        n,
        clients=n_clients,
        limit_pct=5,
        median_ratio=round(ratio(statistics.median), 4),
        mean_overhead_pct=round(mean_pct, 2),
        mean_ratio=round(ratio(statistics.fmean), 4),
        trimmed_overhead_pct=round((ratio(trimmed_mean) - 1.0) * 100.0, 2),
        cpu_overhead_pct=round((cpu_ratio - 1.0) * 100.0, 2),
        cpu_ratio=round(cpu_ratio, 4),
        pairs_overhead_pct=round(statistics.median(pairs) * 100.0, 2) if pairs else None,
        **{"pass": median_pct < 5 and mean_pct < 5},
    )
    emit("page_messages_per_client", min(delivered) if delivered else 0, "views", n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--miners", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--phase-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--base", default="127.61.0.1")
    args = parser.parse_args()
    asyncio.run(bench(args.miners, args.clients, args.phase_s, args.rounds, args.base))


if __name__ == "__main__":
    main()
