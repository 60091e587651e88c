"""Restarts without surprises: the real daemon is killed and restarted mid-curtailment.

``site-agent run`` runs as a real subprocess against LuxOS simulators served by this test
(pyasic in the daemon talks to them over loopback sockets) with its journal in a temporary
folder. The operator override is written by the real ``site-agent curtail`` / ``release``
code. Every assertion is on the simulators' true state (what a power meter would see):

* kill -9 mid-curtailment, then a clean SIGTERM restart: the site stays curtailed, a miner
  that rebooted into mining while the agent was down is shed again (the event is a level),
  and no other miner is woken before the override is released;
* after the release, load comes back at the configured ramp rate, not all at once;
* a journal that cannot be written stops the start with a clear error (exit 2);
* a journal that becomes unwritable while running puts the agent in safe mode: sheds go on,
  nothing is restored, the reason is in the state and the logs, and it recovers when the
  journal can be written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from agent.cli.main import main as cli_main
from agent.control.config import load_config
from agent.journal.store import Store
from agent.outputs.metrics import build_registry
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import FaultKind, Timing
from tests.loopback import ip
from tests.site_agent import build_agent
from tests.test_e2e_miners import MODELS, until, watts

ROOT = Path(__file__).resolve().parent.parent
SITE_AGENT = ROOT / ".venv" / "bin" / "site-agent"

S19 = [ip(10, i) for i in range(1, 5)]
S21 = [ip(11, i) for i in range(1, 5)]
ALL = S19 + S21
# 0.5 s cycles and 360 kW/min: at most 3 kW more per cycle, i.e. one miner woken per cycle
# (the smallest wake step is an S19 at -2, 2.45 kW; two would need 4.9 kW).
INTERVAL_S = 0.5
RAMP_KW_PER_MIN = 360.0
OVERRIDE_KW = 2.0  # the eight miners' standby draw (~250 W) fits; one mining miner does not


def write_config(folder: Path, **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "site": {
            "id": "restart",
            "interconnect_limit_kw": 40,
            "ramp_up_kw_per_min": RAMP_KW_PER_MIN,
        },
        "control": {
            "interval_s": INTERVAL_S,
            "poll_interval_s": 0.25,
            "poll_jitter_s": 0.02,
            "device_timeout_s": 2,
            "retries": 1,
            "verify_after_s": 2,
            "hysteresis_usd_per_mwh": 2,
            "min_on_s": 0.5,
            "min_off_s": 0.5,
        },
        "economics": {"pool_fee": 0.02, "hashprice": {"usd_per_ph_day": 55}},
        "miner_models": MODELS,
        "miners": [
            {"id": "s19", "address": S19[0], "model": "S19jPro", "count": len(S19)},
            {"id": "s21", "address": S21[0], "model": "S21", "count": len(S21)},
        ],
        # Cheap power: every step of every miner is worth running.
        "prices": {"realtime": {"type": "constant", "value": 20}, "max_age_s": 60},
        "metrics": {"enabled": False, "port": 0},
        "store": {"path": "journal.db"},
    }
    data.update(overrides)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- the simulators' truth, sampled -----------------------------------------------------------


@dataclass
class Recorder:
    """Samples every miner's true state every ``every_s``, in the background."""

    fleet: LuxosFleet
    every_s: float = 0.05
    samples: list[tuple[float, dict[str, bool], float]] = field(default_factory=list)

    def sample(self) -> tuple[float, dict[str, bool], float]:
        states = {a: self.fleet.truth(a) for a in ALL}
        mining = {a: not bool(s["sleeping"]) for a, s in states.items()}
        site_w = sum(watts(s) for s in states.values())
        row = (time.monotonic(), mining, site_w)
        self.samples.append(row)
        return row

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    def since(self, t0: float) -> list[tuple[float, dict[str, bool], float]]:
        return [s for s in self.samples if s[0] >= t0]

    def woken(self, t0: float, excluding: frozenset[str] = frozenset()) -> dict[str, float]:
        """Miners that went from asleep to mining after ``t0``, with when they did.

        The state before ``t0`` is the last sample taken before it: on a busy machine the first
        sample after ``t0`` may come late and already show a miner woken after ``t0``.
        """
        out: dict[str, float] = {}
        before = [s for s in self.samples if s[0] < t0]
        previous: dict[str, bool] | None = before[-1][1] if before else None
        for at, mining, _w in self.since(t0):
            if previous is not None:
                for a in ALL:
                    if a not in excluding and mining[a] and not previous[a] and a not in out:
                        out[a] = at
            previous = mining
        return out


@contextlib.asynccontextmanager
async def simulated_site() -> AsyncIterator[tuple[LuxosFleet, Recorder]]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    timing = Timing(wake_ramp_s=0.3, sleep_ramp_s=0.1, profile_ramp_s=0.1)
    async with LuxosFleet(specs, timing=timing) as fleet:
        recorder = Recorder(fleet)
        task = asyncio.create_task(recorder.run())
        try:
            yield fleet, recorder
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def asleep(fleet: LuxosFleet, addresses: list[str]) -> bool:
    return all(bool(fleet.truth(a)["sleeping"]) for a in addresses)


# --- the daemon as a subprocess ----------------------------------------------------------------


class Daemon:
    """``site-agent run --config FILE`` as a child process, stderr kept in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                str(SITE_AGENT),
                "run",
                "--config",
                str(self.config),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )

    async def signal(self, sig: int, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def cleanup(daemons: list[Daemon]) -> Iterator[None]:
    try:
        yield
    finally:
        for d in daemons:
            if d.alive():
                assert d.proc is not None
                d.proc.kill()


async def cli(*argv: str) -> int:
    """Run the real ``site-agent`` CLI code (it calls ``asyncio.run``) on a worker thread."""
    return await asyncio.to_thread(cli_main, list(argv))


async def audit_count(journal: Path, action_prefix: str, device: str | None = None) -> int:
    async with Store.open(journal, readonly=True) as store:
        rows = await store.audit_rows(limit=None)
    return sum(
        1
        for r in rows
        if r.action.startswith(action_prefix) and (device is None or r.device_id == device)
    )


def max_excess_over_ramp_w(samples: list[tuple[float, dict[str, bool], float]]) -> float:
    """The largest rise of true site power over any window, less what the ramp allows in it."""
    rate_w_per_s = RAMP_KW_PER_MIN * 1000.0 / 60.0
    worst = -float("inf")
    for i, (t1, _m1, w1) in enumerate(samples):
        for t2, _m2, w2 in samples[i + 1 :]:
            worst = max(worst, (w2 - w1) - rate_w_per_s * (t2 - t1))
    return worst


@pytest.mark.slow
async def test_kill_9_then_clean_restart_mid_curtailment_then_release_ramps(
    tmp_path: Path,
) -> None:
    if not SITE_AGENT.exists():
        pytest.skip(f"{SITE_AGENT} missing (run make env)")
    config = write_config(tmp_path)
    journal = tmp_path / "journal.db"
    a, b, c = (Daemon(config, tmp_path / f"agent-{n}.log") for n in "abc")
    async with simulated_site() as (fleet, rec):
        with cleanup([a, b, c]):
            # 1. Running, cheap power: every miner climbs to its top profile.
            await a.start()
            await until(
                lambda: all(fleet.truth(x)["profile"] == "+1" for x in ALL),
                40,
                "every miner at +1 (daemon A up): " + a.output()[-2000:],
            )
            # 2. The operator curtails the site through the journal (the real CLI code).
            until_at = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
            assert (
                await cli(
                    "curtail",
                    "--config",
                    str(config),
                    "--target-kw",
                    str(OVERRIDE_KW),
                    "--until",
                    until_at,
                    "--reason",
                    "test",
                )
                == 0
            )
            await until(lambda: asleep(fleet, ALL), 10, "every miner asleep under the override")
            # The shedding cycle has finished (its audit rows are written after the commands).
            deadline = time.monotonic() + 10
            while await audit_count(journal, "sleep") < len(ALL):
                assert time.monotonic() < deadline, "daemon A never audited its sleeps"
                await asyncio.sleep(0.1)
            # 3. kill -9, and a power blip reboots one miner into mining while the agent is down.
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(a.proc.wait(), 5) == -signal.SIGKILL
            killed_at = time.monotonic()
            rebooted = S21[0]
            fleet.set_fault(rebooted, FaultKind.REBOOT, delay_s=0.2)
            await until(lambda: not fleet.truth(rebooted)["sleeping"], 5, "reboot into mining")
            # 4. Restart: the journal holds the override and the commanded sleeps. The rebooted
            # miner is shed again (OFF is a level); nobody else is woken.
            await b.start()
            await until(lambda: asleep(fleet, ALL), 30, "rebooted miner shed again by daemon B")
            await asyncio.sleep(2.0)  # a few more cycles of B with the override in force
            others = frozenset({rebooted})
            assert rec.woken(killed_at, excluding=others) == {}, "restored early after kill -9"
            assert await audit_count(journal, "sleep", "s21-001") >= 2  # by A, then again by B
            # 5. A clean restart (SIGTERM), and another blip on another miner meanwhile.
            assert await b.signal(signal.SIGTERM) == 0, b.output()[-2000:]
            stopped_at = time.monotonic()
            rebooted2 = S19[1]
            fleet.set_fault(rebooted2, FaultKind.REBOOT, delay_s=0.2)
            await c.start()
            await until(
                lambda: not fleet.truth(rebooted2)["sleeping"], 5, "second reboot into mining"
            )
            await until(lambda: asleep(fleet, ALL), 30, "second rebooted miner shed by daemon C")
            await asyncio.sleep(2.0)
            others = frozenset({rebooted2})
            assert rec.woken(stopped_at, excluding=others) == {}, "restored early after SIGTERM"
            # 6. The operator releases the override: load returns at the ramp rate.
            released_at = time.monotonic()
            rec.sample()  # the state at release, before the CLI thread competes with the sampler
            assert await cli("release", "--config", str(config)) == 0
            await until(
                lambda: all(
                    fleet.truth(x)["profile"] == "+1" and not fleet.truth(x)["sleeping"]
                    for x in ALL
                ),
                40,
                "every miner back at +1",
            )
            await asyncio.sleep(0.5)  # let the last wake ramp settle
            restore = rec.since(released_at)
            woken = rec.woken(released_at)
            assert set(woken) == set(ALL)
            first, last = min(woken.values()), max(woken.values())
            full_w = restore[-1][2] - restore[0][2]
            # ~29 kW at 6 kW/s: at least ~4 s from the first wake to the last one. All at once
            # would take one cycle.
            min_span_s = (full_w - 2 * 3930) / (RAMP_KW_PER_MIN * 1000 / 60)
            assert last - first >= min_span_s, (last - first, min_span_s)
            # No window saw more than the ramp allows, plus one cycle's budget (a cycle may
            # start just inside a window) and one wake step in flight.
            excess_w = max_excess_over_ramp_w(restore)
            assert excess_w <= RAMP_KW_PER_MIN * 1000 / 60 * INTERVAL_S + 3930, excess_w
            # At most two miners woke within any one cycle length.
            times = sorted(woken.values())
            per_cycle = max(sum(1 for t in times if t0 <= t < t0 + INTERVAL_S) for t0 in times)
            assert per_cycle <= 2, times
            assert await c.signal(signal.SIGTERM) == 0
    out = a.output() + b.output() + c.output()
    assert "Traceback" not in out, out[-3000:]


# --- an unwritable journal ----------------------------------------------------------------


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {args} here: {done.stderr.strip()}")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder holding a journal, then bind-mounted read-only; unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a read-only bind mount")
    point = tmp_path / "state"
    point.mkdir()
    yield point
    while subprocess.run(["mountpoint", "-q", str(point)], check=False).returncode == 0:
        subprocess.run(["umount", "-l", str(point)], check=False)


async def test_unwritable_journal_at_start_is_a_clear_error_and_exit_2(
    read_only_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(read_only_dir)
    journal = read_only_dir / "journal.db"
    async with Store.open(journal) as store:
        await store.record_command("s19-001", "sleep", datetime.now(UTC))
    await asyncio.to_thread(_mount, "--bind", str(read_only_dir), str(read_only_dir))
    await asyncio.to_thread(_mount, "-o", "remount,ro,bind", str(read_only_dir))
    before = journal.read_bytes()
    assert await cli("run", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "site-agent cannot run" in err
    assert str(journal) in err
    assert "read-only" in err or "read-write file system" in err
    assert journal.read_bytes() == before  # nothing changed


async def test_journal_becoming_unwritable_while_running_enters_safe_mode_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal turns unwritable mid-run: sheds go on, restores wait for the journal."""
    config = load_config(write_config(tmp_path))
    async with simulated_site() as (fleet, rec), Store.open(tmp_path / "journal.db") as store:
        agent = build_agent(config, store=store)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await until(lambda: all(fleet.truth(x)["profile"] == "+1" for x in ALL), 20, "+1")
            # The operator curtails for a few seconds (the real CLI code, through the journal)...
            assert (
                await cli(
                    "curtail",
                    "--config",
                    str(tmp_path / "site.yaml"),
                    "--target-kw",
                    str(OVERRIDE_KW),
                    "--until",
                    "+3s",
                )
                == 0
            )
            # ...and the journal stops taking writes, as when the kernel remounts a failing
            # disk read-only (errors=remount-ro). SQLite's query_only makes every write fail on
            # this connection, deterministically; "disk full" (SQLITE_FULL) maps to the same
            # StoreWriteError (tests/test_store.py: max_page_count and a full tmpfs).
            await store._run(lambda c: c.execute("PRAGMA query_only=ON"))
            with caplog.at_level(logging.WARNING):
                # The sheds happen although nothing can be journaled.
                await until(lambda: asleep(fleet, ALL), 10, "every miner shed with a full disk")
                # The loop publishes safe mode with the cycle that entered it (its sheds may
                # show on the miners while that cycle is still auditing).
                await until(lambda: agent.state.mode == "safe", 10, "safe mode published")
                assert agent.state.safe_reason is not None
                assert "journal" in agent.state.safe_reason or "audit" in agent.state.safe_reason
                assert "read-only" in agent.state.safe_reason
                assert any("safe mode" in r.getMessage() for r in caplog.records)
                text = generate_latest(build_registry(agent.state, config)).decode()
                assert 'site_agent_mode{mode="safe"} 1.0' in text
                # The event ends: in safe mode nothing is restored.
                ended_at = time.monotonic()
                await until(lambda: not agent.coordinator.events, 10, "override over")
                await asyncio.sleep(1.5)
                assert rec.woken(ended_at) == {}, "restored while the journal was unwritable"
                assert agent.state.plan is not None
                assert "safe mode" in agent.state.plan.summary
            # The journal takes writes again: the agent re-journals what it commanded, leaves
            # safe mode and restores at the ramp rate.
            await store._run(lambda c: c.execute("PRAGMA query_only=OFF"))
            await until(lambda: agent.state.mode == "auto", 10, "safe mode left")
            text = generate_latest(build_registry(agent.state, config)).decode()
            assert 'site_agent_mode{mode="auto"} 1.0' in text
            await until(lambda: not any(fleet.truth(x)["sleeping"] for x in ALL), 20, "restored")
            # Restores climb at the ramp rate: woken miners reach +1 a few cycles later (more on a
            # busy machine), and only then does the journal hold +1 for every one.
            await until(lambda: all(fleet.truth(x)["profile"] == "+1" for x in ALL), 30, "+1")
            await until(lambda: not agent.pending(), 10, "restores verified")
            # The journal again says what the agent commanded (a restart now would be right).
            states = await store.commanded_states()
            assert {k: v.state for k, v in states.items()} == {
                key: state for fleet in agent.fleets for key, state, _since in fleet.commanded()
            }
            rows = await store.audit_rows(limit=None)
            assert any(r.action == "journal" and r.result == "recovered" for r in rows)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert not task.exception()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
