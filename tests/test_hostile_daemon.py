"""Hostile inputs against the running daemon: ``site-agent run`` as a real subprocess.

A real price server on loopback turns hostile (trickling, huge, deep, garbage, NaN, out of
range, booleans, duplicate keys); after each attack the daemon is alive, still cycling, keeps
its last good price, says the source is down, and counts the attack in
``site_agent_rejected_inputs_total{source,reason}`` on its own ``/metrics``. When the feed is
fixed, ``source_up`` returns to 1 by itself. Hostile config files and CLI arguments get one
error line and exit 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.journal.store import Store
from simulators.price_server import PriceServer
from tests.servers import Mosquitto, free_port
from tests.test_mqtt import TOKEN, Operator

pytestmark = [pytest.mark.hostile, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SITE_AGENT = ROOT / ".venv" / "bin" / "site-agent"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict[Any, float], name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


async def until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    started = time.monotonic()
    while True:
        try:
            if await asyncio.to_thread(predicate):
                return
        except OSError:
            pass  # the endpoint may not be up yet
        if time.monotonic() - started > deadline_s:
            pytest.fail(f"{what}: not within {deadline_s} s")
        await asyncio.sleep(0.1)


@pytest.fixture
async def price_server() -> AsyncIterator[PriceServer]:
    async with PriceServer([41.5], interval_s=900, speed=1) as srv:
        yield srv


def write_config(folder: Path, price_url: str, metrics_port: int) -> Path:
    data = {
        "site": {"id": "hostile", "interconnect_limit_kw": 100},
        "control": {"interval_s": 0.25, "poll_interval_s": 0.25, "poll_jitter_s": 0.02},
        "prices": {
            "realtime": {
                "type": "http_json",
                "url": price_url,
                "value_path": "data.0.price",
                "time_path": "data.0.time",
                "timeout_s": 1.0,
                "poll_interval_s": 0.25,
            },
            "max_age_s": 600,
        },
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        "store": {"path": "journal.db"},
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


ATTACKS = [
    ("trickle", "timeout"),
    ("flood", "too_large"),
    ("deep", "too_deep"),
    ("garbage", "bad_syntax"),
    ("nan", "not_finite"),
    ("overflow", "out_of_range"),
    ("bool", "bool_as_number"),
    ("duplicate", "duplicate_key"),
]


async def test_daemon_survives_every_hostile_feed_and_recovers(
    tmp_path: Path, price_server: PriceServer
) -> None:
    port = free_port()
    url = f"{price_server.url}/price"
    config = write_config(tmp_path, url, port)
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(SITE_AGENT),
            "run",
            "--config",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    source = f"http:{url}"
    health = f"price:{source}"
    try:
        await until(
            lambda: value(scrape(port), "site_agent_source_up", source=health) == 1.0,
            30.0,
            "the daemon reads the feed",
        )
        # The supervised tasks' board is wired to /metrics by the daemon itself.
        first = scrape(port)
        assert value(first, "site_agent_task_up", task="control") == 1.0
        assert value(first, "site_agent_task_restarts_total", task="control") == 0.0
        price_server.trickle_s = 0.5
        for mode, reason in ATTACKS:
            before = scrape(port)
            cycles = value(before, "site_agent_control_cycles_total") or 0.0
            counted = value(
                before, "site_agent_rejected_inputs_total", source=source, reason=reason
            )
            price_server.fault = mode

            def attacked(
                cycles: float = cycles, counted: float | None = counted, reason: str = reason
            ) -> bool:
                now = scrape(port)
                seen = value(now, "site_agent_rejected_inputs_total", source=source, reason=reason)
                return (
                    (seen or 0.0) > (counted or 0.0)
                    and value(now, "site_agent_source_up", source=health) == 0.0
                    and (value(now, "site_agent_control_cycles_total") or 0.0) > cycles + 2
                )

            await until(attacked, 15.0, f"{mode}: counted as {reason}, down, still cycling")
            assert proc.returncode is None, log.read_text(errors="replace")[-2000:]
            metrics = scrape(port)
            # The last good price is kept (its age grows): nothing from the attack was used.
            assert value(metrics, "site_agent_price_usd_per_mwh") in (None, 41.5)
            price_server.fault = "ok"
            await until(
                lambda: value(scrape(port), "site_agent_source_up", source=health) == 1.0,
                10.0,
                f"{mode}: the feed recovers by itself",
            )
        assert proc.returncode is None
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        # Every refused answer (all but the timeout, a transport failure) is in the audit trail.
        async with Store.open(tmp_path / "journal.db", readonly=True) as store:
            rows = [
                r
                for r in await store.audit_rows(limit=None)
                if r.action == "reject_input" and r.source == source
            ]
        assert all(r.result == "rejected" for r in rows)
        audited = " | ".join(r.reason for r in rows)
        for words in (
            "the body passed",
            "nested deeper",
            "malformed JSON",
            "expected a finite number, got NaN",
            "expected -100000 to 100000 USD/MWh",
            "expected a number, got True",
            "duplicate key 'price'",
        ):
            assert words in audited, (words, audited)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


HOSTILE_CONFIGS = [
    (b"site: {id: a, interconnect_limit_kw: 1}\n\xff\xfe\n", "is not UTF-8"),
    (b"a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n", "anchor &a is not allowed"),
    (
        b"site: {id: a, interconnect_limit_kw: true}\n"
        b"prices: {realtime: {type: constant, value: 1}}\n",
        "site.interconnect_limit_kw: expected a number, got a boolean (true)",
    ),
    (
        b"site: {id: a, interconnect_limit_kw: 10}\n"
        b"prices: {realtime: {type: constant, value: 1}}\n"
        b"miner_models: {m: {profiles: [{name: p, power_w: 1, hashrate_ths: 1}]}}\n"
        b"miners: [{id: x, address: 255.255.255.255, model: m, count: 2}]\n",
        "run past 255.255.255.255",
    ),
]


@pytest.mark.parametrize(("content", "words"), HOSTILE_CONFIGS)
def test_check_config_exits_1_and_run_exits_2_with_one_line(
    tmp_path: Path, content: bytes, words: str
) -> None:
    f = tmp_path / "site.yaml"
    f.write_bytes(content)
    for command, code in ((["check-config", str(f)], 1), (["run", "--config", str(f)], 2)):
        done = subprocess.run(
            [str(SITE_AGENT), *command], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == code, (command, done.stdout, done.stderr)
        assert words in done.stderr + done.stdout, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--target-kw", "nan", "--until", "+1h"], "--target-kw must be a finite number"),
        (["--target-kw", "1e400", "--until", "+1h"], "--target-kw must be a finite number"),
        (["--target-kw", "5000", "--until", "+1h"], "above the site's interconnect limit"),
        (["--target-kw", "10", "--until", "+99999999999999999999h"], "--until: expected"),
    ],
)
def test_curtail_cli_hostile_arguments(tmp_path: Path, args: list[str], words: str) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "site": {"id": "a", "interconnect_limit_kw": 100},
                "prices": {"realtime": {"type": "constant", "value": 1}},
                "store": {"path": "journal.db"},
            }
        )
    )
    done = subprocess.run(
        [str(SITE_AGENT), "curtail", "--config", str(f), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "journal.db").exists()


@pytest.mark.mqtt
async def test_daemon_bridge_survives_hostile_commands_and_audits_them(
    tmp_path: Path, price_server: PriceServer, mosquitto: Mosquitto
) -> None:
    port = free_port()
    config = write_config(tmp_path, f"{price_server.url}/price", port)
    data = yaml.safe_load(config.read_text())
    data["site"]["id"] = "west-1"  # the test operator's topic prefix is site-agent/west-1
    data["mqtt"] = {
        "enabled": True,
        "host": mosquitto.host,
        "port": mosquitto.port,
        "username": "agent",
        "password": "agent-secret",
        "command_tokens": {"operator": TOKEN},
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    with (tmp_path / "daemon.log").open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(SITE_AGENT),
            "run",
            "--config",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        async with Operator(mosquitto).connected() as op:
            await op.next("status", timeout_s=30.0)  # "online", retained by the daemon
            hostile = [
                (b"[" * 5000 + b"]" * 5000, "too_deep"),
                (b'{"operator": "operator", "operator": "x", "token": "t"}', "duplicate_key"),
                (b'{"id": "z", "token": NaN}', "not_finite"),
                (b"\xff" * 10, "not_utf8"),
            ]
            for payload, _reason in hostile:
                await op.send("curtail", None, raw=payload)
                ack = await op.next("ack", timeout_s=10.0, status="rejected")
                assert "\n" not in ack["reason"]
            ack = await op.command("refresh", "still-here")
            assert ack["status"] == "accepted"
        metrics = scrape(port)
        for _payload, reason in hostile:
            counted = value(
                metrics, "site_agent_rejected_inputs_total", source="mqtt", reason=reason
            )
            assert counted == 1.0, (reason, counted)
        assert proc.returncode is None
        async with Store.open(tmp_path / "journal.db", readonly=True) as store:
            rows = [r for r in await store.audit_rows(limit=None) if r.source == "mqtt"]
        reasons = sorted(r.reason.split(":")[0] for r in rows if r.action == "command:curtail")
        assert reasons == sorted(reason for _p, reason in hostile)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
