"""Benchmark: a mixed fleet (LuxOS, stock Antminer, Braiins OS+, Whatsminer) against plain pyasic.

Starts each family's simulator as its own process (``python -m simulators.<family>``, many
miners per process, each on its own loopback address), then in this process:

1. identifies every miner with our ``discover`` (pyasic's ``get_miner``, bounded), and polls
   them all once to warm up;
2. a price spike: every miner commanded to shed (``sleep``: LuxOS curtail, BOS+ pause, stock
   ``miner-mode`` sleep, Whatsminer power off), then polled until telemetry confirms every one
   sleeping; then everyone is woken, and the run waits until all mine again. Twice: first with
   no BOS+ or Whatsminer login token held (``"tokens": "cold"``, a freshly started agent: each
   command logs in first), then with the tokens warm (``"warm"``: the running agent's steady
   state, which ``MinerFleet.run`` keeps by renewing stale tokens in the background; here
   ``prepare_fleet``, the same renewal). The spikes run first because a capped baseline can
   leave pyasic's own tasks running behind it;
3. ``--rounds`` times, a full poll with our driver (``read_fleet``) and, in the same run, plain
   pyasic ``asyncio.gather(*(m.get_data() for m in miners))`` at pyasic's defaults, on fresh
   pyasic objects of the classes pyasic identified. The baseline is capped at
   ``--baseline-timeout-s``: when it runs out, the figure is the cap, with how many miners had
   answered, and the speed-up is a lower bound (``"lower_bound": true``).

Every figure is one JSON line ``{"figure", "value", "unit", "n", ...}``, the whole fleet and per
family (``"family"``). CPU seconds of this process and of each simulator process come with the
poll figures (``cpu_s``, ``sim_cpu_s``): on a 2-core machine the simulators' cost is part of the
wall time.

``--profile`` instead polls each family alone (``--rounds`` times) and prints wall and CPU per
family: where the time goes.

Run: ``.venv/bin/python bench/miners_mixed.py --miners 10000
--mix luxos=25,antminer=25,braiins=25,whatsminer=25``. The stock Antminer's web API binds port
80 of each address: run as root (or lower ``net.ipv4.ip_unprivileged_port_start``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cli.sim import FAMILIES, parse_mix
from bench.miners_poll import count_ok, emit, peak_rss_mb, start_simulator, until_all
from drivers.errors import DeviceError
from drivers.miners.base import MinerMode, MinerReading
from drivers.miners.pyasic_driver import (
    PyasicMiner,
    discover,
    prepare_fleet,
    read_fleet,
    sleep_fleet,
    wake_fleet,
)
from simulators.luxos import fleet_addresses, raise_open_file_limit

_TICK = os.sysconf("SC_CLK_TCK")
OPEN_FILES = 262_144


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def split_counts(total: int, shares: dict[str, int]) -> dict[str, int]:
    """``total`` miners split by percentage-like ``shares`` (largest remainder, sums exactly)."""
    weight = sum(shares.values())
    exact = {f: total * w / weight for f, w in shares.items()}
    counts = {f: int(x) for f, x in exact.items()}
    rest = total - sum(counts.values())
    for f in sorted(exact, key=lambda f: exact[f] - counts[f], reverse=True)[:rest]:
        counts[f] += 1
    return {f: n for f, n in counts.items() if n > 0}


class Sims:
    """The family simulator processes and their CPU counters."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.addresses: dict[str, list[str]] = {}

    def start(self, counts: dict[str, int], base: str) -> None:
        flat = fleet_addresses(sum(counts.values()), base)
        i = 0
        for family in FAMILIES:
            n = counts.get(family, 0)
            if not n:
                continue
            proc, addresses = start_simulator(n, flat[i], f"simulators.{family}")
            i += n
            self.procs[family] = proc
            self.addresses[family] = addresses

    def cpu(self) -> dict[str, float]:
        return {f: proc_cpu_s(p.pid) for f, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def timed_each(
    items: Sequence[Any], fn: Callable[[Any], Awaitable[Any]], cap_s: float | None = None
) -> tuple[list[Any], list[float | None], float, bool]:
    """Run ``fn`` on every item concurrently; results, each one's finish time, wall, capped.

    With ``cap_s``, what has not finished by then is cancelled (its result and time are None).
    """
    t0 = time.perf_counter()
    done_at: list[float | None] = [None] * len(items)
    results: list[Any] = [None] * len(items)

    async def one(k: int, item: Any) -> None:
        try:
            results[k] = await fn(item)
        except Exception as exc:  # the baseline's failures are counted, not raised
            results[k] = exc
        done_at[k] = time.perf_counter() - t0

    tasks = [asyncio.ensure_future(one(k, it)) for k, it in enumerate(items)]
    _, pending = await asyncio.wait(tasks, timeout=cap_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=30)
    return results, done_at, time.perf_counter() - t0, bool(pending)


def by_family(families: Sequence[str], values: Sequence[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f, v in zip(families, values, strict=True):
        out.setdefault(f, []).append(v)
    return out


def baseline_ok(d: Any) -> bool:
    return d is not None and not isinstance(d, BaseException) and d.hashrate is not None


async def poll_round(
    r: int,
    miners: list[PyasicMiner],
    baseline: list[Any],
    sims: Sims,
    cap_s: float,
) -> tuple[float, float, bool]:
    n = len(miners)
    fams = [m.family.value for m in miners]

    async def read(m: PyasicMiner) -> MinerReading | DeviceError:
        try:
            return await m.read()
        except DeviceError as exc:
            return exc

    s0, c0 = sims.cpu(), time.process_time()
    res, done, wall, _ = await timed_each(miners, read)
    cpu, s1 = time.process_time() - c0, sims.cpu()
    sim_cpu = {f: round(s1[f] - s0[f], 3) for f in s1}
    ok = sum(isinstance(x, MinerReading) for x in res)
    emit("driver_poll_s", wall, "s", n, round=r, ok=ok, cpu_s=round(cpu, 3), sim_cpu_s=sim_cpu)
    for f, rows in by_family(fams, list(zip(res, done, strict=True))).items():
        emit(
            "driver_poll_family_done_s",
            max(d for _, d in rows if d is not None),
            "s",
            len(rows),
            family=f,
            round=r,
            ok=sum(isinstance(x, MinerReading) for x, _ in rows),
            sim_cpu_s=sim_cpu.get(f),
        )

    s0, c0 = sims.cpu(), time.process_time()
    data, done, bwall, capped = await timed_each(baseline, lambda m: m.get_data(), cap_s)
    cpu, s1 = time.process_time() - c0, sims.cpu()
    sim_cpu = {f: round(s1[f] - s0[f], 3) for f in s1}
    reached = sum(d is not None for d in done)
    emit(
        "baseline_poll_s",
        bwall,
        "s",
        n,
        round=r,
        ok=sum(baseline_ok(d) for d in data),
        answered=reached,
        capped=capped,
        cap_s=cap_s,
        cpu_s=round(cpu, 3),
        sim_cpu_s=sim_cpu,
    )
    for f, rows in by_family(fams, list(zip(data, done, strict=True))).items():
        finished = [d for _, d in rows if d is not None]
        emit(
            "baseline_poll_family_done_s",
            max(finished) if len(finished) == len(rows) else bwall,
            "s",
            len(rows),
            family=f,
            round=r,
            ok=sum(baseline_ok(x) for x, _ in rows),
            answered=len(finished),
            capped=len(finished) < len(rows),
        )
    return wall, bwall, capped


async def shed(m: PyasicMiner) -> DeviceError | None:
    """Command one miner to its shed point: sleep (every family here can)."""
    try:
        await m.sleep()
    except DeviceError as exc:
        return exc
    return None


async def spike(miners: list[PyasicMiner], sims: Sims, deadline_s: float, tokens: str) -> None:
    """Command all to shed, then poll until telemetry confirms every one asleep.

    ``tokens`` ("cold" or "warm": whether BOS+ and Whatsminer login tokens were held) labels
    every figure."""
    n = len(miners)
    fams = {m.device_id: m.family.value for m in miners}
    s0, c0 = sims.cpu(), time.process_time()
    t0 = time.perf_counter()
    commanded, done, wall, _ = await timed_each(miners, shed)
    failed = {m.device_id: str(e) for m, e in zip(miners, commanded, strict=True) if e is not None}
    s1 = sims.cpu()
    emit(
        "spike_to_all_commanded_s",
        wall,
        "s",
        n,
        tokens=tokens,
        failed=len(failed),
        cpu_s=round(time.process_time() - c0, 3),
        sim_cpu_s={f: round(s1[f] - s0[f], 3) for f in s1},
    )
    for f, rows in by_family([m.family.value for m in miners], done).items():
        emit(
            "spike_family_commanded_s",
            max(d or 0.0 for d in rows),
            "s",
            len(rows),
            family=f,
            tokens=tokens,
        )
    for d, e in list(failed.items())[:5]:
        print(f"# sleep failed: {d} ({fams[d]}): {e}", file=sys.stderr)
    confirmed: dict[str, float] = {}
    polls = 0
    while len(confirmed) < n and time.perf_counter() - t0 < deadline_s:
        polls += 1
        results = await read_fleet(m for m in miners if m.device_id not in confirmed)
        now = time.perf_counter() - t0
        for d, r in results.items():
            if isinstance(r, MinerReading) and r.mode is MinerMode.SLEEPING:
                confirmed[d] = now
    ok = len(confirmed) == n
    s1 = sims.cpu()
    emit(
        "spike_to_all_confirmed_shed_s",
        max(confirmed.values()) if ok else deadline_s,
        "s",
        n,
        tokens=tokens,
        cpu_s=round(time.process_time() - c0, 3),
        sim_cpu_s={f: round(s1[f] - s0[f], 3) for f in s1},
        polls=polls,
        confirmed=len(confirmed),
        reached=ok,
    )
    per: dict[str, list[float]] = {}
    for d, f in fams.items():
        per.setdefault(f, [])
        if d in confirmed:
            per[f].append(confirmed[d])
    for f, times in per.items():
        total = sum(1 for v in fams.values() if v == f)
        emit(
            "spike_family_confirmed_shed_s",
            max(times) if len(times) == total else deadline_s,
            "s",
            total,
            family=f,
            tokens=tokens,
            confirmed=len(times),
        )


async def profile(miners: list[PyasicMiner], sims: Sims, rounds: int) -> None:
    """Each family polled alone: wall, this process's CPU and its simulator's CPU per poll."""
    groups: dict[str, list[PyasicMiner]] = {}
    for m in miners:
        groups.setdefault(m.family.value, []).append(m)
    for f, group in groups.items():
        walls, cpus, sim_cpus = [], [], []
        for _ in range(rounds):
            s0, c0, t0 = sims.cpu()[f], time.process_time(), time.perf_counter()
            res = await read_fleet(group)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            sim_cpus.append(sims.cpu()[f] - s0)
        emit(
            "profile_family_poll_s",
            statistics.median(walls),
            "s",
            len(group),
            family=f,
            ok=count_ok(res),
            cpu_ms_per_miner=round(1000 * statistics.median(cpus) / len(group), 3),
            sim_cpu_ms_per_miner=round(1000 * statistics.median(sim_cpus) / len(group), 3),
        )
        for what, command in (("sleep", sleep_fleet), ("wake", wake_fleet)):
            s0, c0, t0 = sims.cpu()[f], time.process_time(), time.perf_counter()
            out = await command(group)
            emit(
                f"profile_family_{what}_s",
                time.perf_counter() - t0,
                "s",
                len(group),
                family=f,
                failed=sum(e is not None for e in out.values()),
                cpu_ms_per_miner=round(1000 * (time.process_time() - c0) / len(group), 3),
                sim_cpu_ms_per_miner=round(1000 * (sims.cpu()[f] - s0) / len(group), 3),
            )


async def bench(args: argparse.Namespace, sims: Sims) -> None:
    addresses = [a for f in FAMILIES for a in sims.addresses.get(f, [])]
    n = len(addresses)
    semaphore = asyncio.Semaphore(args.concurrency)
    t0 = time.perf_counter()
    found = await discover(addresses, semaphore, timeout_s=args.timeout_s)
    missed = [a for a, m in found.items() if not isinstance(m, PyasicMiner)]
    if missed:  # pyasic's factory has fixed inner timeouts: a starved loop misses some; retry
        print(f"# identification retried for {len(missed)} miners", file=sys.stderr)
        found.update(await discover(missed, asyncio.Semaphore(50), timeout_s=args.timeout_s))
    miners = [m for m in found.values() if isinstance(m, PyasicMiner)]
    emit("driver_identified", len(miners), "miners", n, s=round(time.perf_counter() - t0, 2))
    for f in FAMILIES:
        got = sum(m.family.value == f for m in miners)
        if got != len(sims.addresses.get(f, [])):
            print(f"# {f}: identified {got} of {len(sims.addresses.get(f, []))}", file=sys.stderr)
    if not miners:
        raise RuntimeError("no miner identified")

    results = await read_fleet(miners)  # warm-up: connections primed, ladders learnt
    emit("driver_warmup_ok", count_ok(results), "miners", n)
    if args.profile:
        await profile(miners, sims, args.rounds)
        return

    # The spikes first, while nothing else runs (a capped baseline can leave pyasic's own
    # tasks running behind it); then everyone is woken and the polls are compared. The first
    # spike finds no login token held (a freshly started agent); the second finds them warm,
    # as the running agent keeps them (MinerFleet.run renews stale tokens in the background).
    for tokens in ("cold", "warm"):
        if tokens == "warm":
            t0 = time.perf_counter()
            renewed = await prepare_fleet(miners, most=len(miners))
            emit(
                "tokens_renewed",
                sum(e is None for e in renewed.values()),
                "miners",
                n,
                failed=sum(e is not None for e in renewed.values()),
                s=round(time.perf_counter() - t0, 2),
            )
        await spike(miners, sims, args.spike_deadline_s, tokens)
        await wake_fleet(miners)
        await until_all(miners, MinerMode.MINING, args.spike_deadline_s)

    # Plain pyasic objects of the classes pyasic identified, built without I/O: the same
    # objects get_miner returns, at pyasic's default settings (no identification timed).
    baseline = [type(m.pyasic_miner)(m.address) for m in miners]
    ours: list[float] = []
    theirs: list[float] = []
    capped_any = False
    for r in range(args.rounds):
        wall, bwall, capped = await poll_round(r, miners, baseline, sims, args.baseline_timeout_s)
        ours.append(wall)
        theirs.append(bwall)
        capped_any = capped_any or capped
    emit("driver_poll_median_s", statistics.median(ours), "s", n, rounds=args.rounds)
    emit("baseline_poll_median_s", statistics.median(theirs), "s", n, capped=capped_any)
    emit(
        "speedup_vs_baseline",
        statistics.median(theirs) / statistics.median(ours),
        "x",
        n,
        lower_bound=capped_any,
    )
    emit("process_peak_rss_mb", peak_rss_mb(), "MB", n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--miners", type=int, default=800, help="fleet size (default 800)")
    p.add_argument(
        "--mix",
        default="luxos=25,antminer=25,braiins=25,whatsminer=25",
        help="shares by family (default luxos=25,antminer=25,braiins=25,whatsminer=25)",
    )
    p.add_argument("--rounds", type=int, default=1, help="poll rounds (default 1)")
    p.add_argument("--concurrency", type=int, default=200, help="fleet semaphore size")
    p.add_argument("--timeout-s", type=float, default=5.0, help="driver per-call timeout")
    p.add_argument(
        "--baseline-timeout-s",
        type=float,
        default=300.0,
        help="cap on one plain-pyasic poll (default 300 s); past it the ratio is a lower bound",
    )
    p.add_argument("--spike-deadline-s", type=float, default=120.0)
    p.add_argument("--base", default="127.20.0.1", help="first loopback address")
    p.add_argument("--profile", action="store_true", help="poll each family alone instead")
    args = p.parse_args()
    try:
        counts = split_counts(args.miners, parse_mix(args.mix))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Thousands of listeners per simulator and, in the baseline, pyasic's unbounded concurrent
    # connections (several per BOS+ miner): root may lift the hard limit too (the simulator
    # processes inherit it); otherwise the soft limit goes up to the hard one.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    raise_open_file_limit()
    emit("open_files_limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "fds", args.miners)
    sims = Sims()
    try:
        sims.start(counts, args.base)
        emit("simulators_ready", sum(counts.values()), "miners", args.miners, **counts)
        asyncio.run(bench(args, sims))
    finally:
        sims.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
