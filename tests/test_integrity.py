"""Integrity through the real Agent: supervised tasks, command integrity, the safety net.

Each test runs the real :class:`agent.runtime.loop.Agent` (coordinator, policy, actuator, the
SQLite journal) against LuxOS simulators that unmodified pyasic talks to over loopback, and
feeds served by a real HTTP server on loopback whose answers the test changes. What is
asserted is what the agent does: the simulators' true state, the journal's rows, the
acknowledgements and ``/metrics``. ``bench/mutations.py`` names these tests as the ones that
must kill its mutants (issue 14 item 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from agent.control.commands import Curtail, Release, SetMode
from agent.control.config import AgentConfig, MqttConfig, parse_config
from agent.control.redaction import secrets_in
from agent.journal.store import EventStatus, Store
from agent.outputs.metrics import MetricsService
from agent.outputs.mqtt import MqttBridge
from agent.runtime.inbox import CommandInbox
from agent.runtime.loop import Agent, CycleHook, Service
from agent.runtime.state import AgentState, SourceHealth
from agent.runtime.supervisor import TaskBoard
from agent.runtime.wiring import build_components
from drivers.bus.base import BusSettings
from drivers.bus.mqtt import MqttBus
from drivers.grid.base import FailDirection, GridEvent, ProgramKind
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import SITE_TOP, Timing
from tests.loopback import ip
from tests.servers import Mosquitto, free_port
from tests.test_e2e_miners import MODELS, until

S19 = [ip(22, i) for i in (1, 2)]
S21 = [ip(23, i) for i in (1, 2)]
ALL = S19 + S21
TOKEN = "integrity-operator-token-5f1c"


# --- a feed that answers whatever the test says -------------------------------------------------


class Feed:
    """A real HTTP/1.1 server on loopback whose JSON body the test sets (``body``)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.hits = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/feed"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            body = self.body
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> Feed:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def price_body(value: str) -> bytes:
    """A price answer whose number is written verbatim (so it can be what JSON allows)."""
    now = datetime.now(UTC).isoformat()
    return f'{{"data": [{{"price": {value}, "time": "{now}"}}]}}'.encode()


# --- the site -------------------------------------------------------------------------------------


def config_for(price_url: str, **extra: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "site": {"id": "integrity", "interconnect_limit_kw": 40},
        "control": {
            "interval_s": 0.25,
            "poll_interval_s": 0.2,
            "poll_jitter_s": 0.02,
            "device_timeout_s": 2,
            "retries": 1,
            "verify_after_s": 1.5,
            "hysteresis_usd_per_mwh": 2,
            "min_on_s": 0.3,
            "min_off_s": 0.3,
            "max_event_horizon_s": 86_400,
        },
        "economics": {"pool_fee": 0.02, "hashprice": {"usd_per_ph_day": 55}},
        "metrics": {"port": 0},
        "miner_models": MODELS,
        "miners": [
            {"id": "s19", "address": S19[0], "model": "S19jPro", "count": 2},
            {"id": "s21", "address": S21[0], "model": "S21", "count": 2},
        ],
        "prices": {
            "realtime": {
                "type": "http_json",
                "url": price_url,
                "value_path": "data.0.price",
                "time_path": "data.0.time",
                "poll_interval_s": 0.2,
                "timeout_s": 1,
            },
            "max_age_s": 30,
        },
    }
    for key, value in extra.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return parse_config(data)


@dataclass
class Site:
    agent: Agent
    fleet: LuxosFleet
    feed: Feed
    store: Store
    journal: Path
    task: asyncio.Task[None]
    bridges: list[MqttBridge] = field(default_factory=list)

    def alive(self) -> bool:
        return not self.task.done()

    async def cycles_pass(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until ``n`` more control cycles ran (and the agent is still running)."""
        start = self.agent.state.cycles
        await until(
            lambda: self.agent.state.cycles >= start + n or not self.alive(),
            timeout_s,
            f"{n} more cycles",
        )
        assert self.alive(), f"the agent stopped: {self.task.exception()!r}"

    def metrics_service(self) -> MetricsService:
        return next(s for s in self.agent.components.services if isinstance(s, MetricsService))

    async def metrics(self) -> str:
        service = self.metrics_service()
        await until(service.started.is_set, 10, "metrics bound")
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{service.port}/metrics"
            return (await client.get(url)).text

    def truth(self, address: str) -> dict[str, Any]:
        return self.fleet.truth(address)

    def asleep(self, address: str) -> bool:
        return bool(self.truth(address)["sleeping"])


@contextlib.asynccontextmanager
async def site(
    tmp_path: Path,
    *,
    price: str = "20",
    journal: Path | None = None,
    fleet: LuxosFleet | None = None,
    mosquitto: Mosquitto | None = None,
    metrics: bool = True,
    **extra: Any,
) -> AsyncIterator[Site]:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    timing = Timing(wake_ramp_s=0.2, sleep_ramp_s=0.1, profile_ramp_s=0.1)
    own_fleet = fleet is None
    fleet = fleet or LuxosFleet(specs, timing=timing)
    path = journal or tmp_path / "journal.db"
    async with contextlib.AsyncExitStack() as stack:
        if own_fleet:
            await stack.enter_async_context(fleet)
        feed = await stack.enter_async_context(Feed(price_body(price)))
        mqtt = {}
        if mosquitto is not None:
            mqtt = {
                "mqtt": {
                    "enabled": True,
                    "host": mosquitto.host,
                    "port": mosquitto.port,
                    "username": "agent",
                    "password": "agent-secret",
                    "command_tokens": {"operator": TOKEN},
                    "reconnect_initial_s": 0.1,
                    "reconnect_max_s": 0.5,
                }
            }
        config = config_for(feed.url, **mqtt, **extra)
        store = await stack.enter_async_context(Store.open(path, known_secrets=secrets_in(config)))
        # Built as agent.cli.daemon.serve builds it: state first, outputs, then the agent.
        state = AgentState(site_id=config.site.id, started_at=datetime.now(UTC))
        tasks = TaskBoard()
        inbox = CommandInbox()
        services: list[Service] = []
        observers: list[CycleHook] = []
        if metrics:
            services.append(MetricsService(state, config, tasks=tasks))
        bridges: list[MqttBridge] = []
        if mosquitto is not None:
            bridge = MqttBridge(
                MqttConfig.model_validate(mqtt["mqtt"]),
                state,
                inbox.submit,
                count_rejected=inbox.reject,
                audit_rejection=inbox.audit,
                tasks=tasks,
            )
            observers.append(lambda *_: bridge.publish_cycle())
            services.append(bridge)
            bridges.append(bridge)
        components = build_components(config, state, store=store, services=services)
        agent = Agent(
            config, components, state=state, tasks=tasks, observers=observers, inbox=inbox
        )
        agent.backoff_s = (0.05, 0.4)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop, grace_s=2.0))
        try:
            yield Site(agent, fleet, feed, store, path, task, bridges)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=10)


def journal_bytes(path: Path) -> bytes:
    """Everything the journal holds on disk: the database and its write-ahead log."""
    return b"".join(
        p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )


# --- 1. supervised tasks ------------------------------------------------------------------------


async def test_a_price_answer_that_breaks_the_poller_does_not_stop_the_agent(
    tmp_path: Path,
) -> None:
    """A finite JSON integer too large for a float used to escape the TaskGroup."""
    async with site(tmp_path) as s:
        await s.cycles_pass(2)
        assert s.agent.coordinator.price is not None
        s.feed.body = price_body("1" + "0" * 400)  # valid JSON; float() of it overflows
        hits = s.feed.hits
        await until(lambda: s.feed.hits >= hits + 3, 10, "the hostile answer polled thrice")
        await s.cycles_pass(4)  # control goes on
        price = s.agent.coordinator.price
        assert price is not None
        assert price.value == 20.0  # the hostile answer was never used
        health = next(v for k, v in s.agent.state.sources.items() if k.startswith("price:"))
        task = s.agent.tasks["price"]
        assert task.restarts >= 1 or health.failures >= 1, "the failure is visible"
        # Fixed feed: the poller (restarted, or never dead) takes the new price.
        s.feed.body = price_body("33.5")
        await until(
            lambda: (
                s.agent.coordinator.price is not None and s.agent.coordinator.price.value == 33.5
            ),
            10,
            "the fixed feed is read again",
        )
        assert s.agent.tasks["price"].up
        assert s.alive()


async def test_a_dead_task_is_shown_restarted_with_backoff_and_control_goes_on(
    tmp_path: Path,
) -> None:
    """The metrics server cannot bind (port taken): down in state, restarted until it can."""
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        async with site(tmp_path, metrics__port=port) as s:
            tasks = s.agent.tasks
            await until(
                lambda: "metrics" in tasks and tasks["metrics"].restarts >= 2,
                10,
                "metrics restarted twice",
            )
            assert not tasks["metrics"].up
            assert "OSError" in (tasks["metrics"].last_error or "")
            await s.cycles_pass(3)  # the control loop never stopped
            assert tasks["control"].up
            assert tasks["control"].restarts == 0
            blocker.close()
            service = s.metrics_service()
            await until(service.started.is_set, 10, "metrics bound at last")
            assert service.port == port
            text = await s.metrics()
            assert 'site_agent_task_up{task="metrics"} 1.0' in text
            assert 'site_agent_task_up{task="control"} 1.0' in text
            restarts = next(
                line
                for line in text.splitlines()
                if line.startswith('site_agent_task_restarts_total{task="metrics"}')
            )
            assert float(restarts.split()[-1]) >= 2
    finally:
        blocker.close()


# --- 2. the MQTT command bridge -----------------------------------------------------------------


class Operator:
    """An operator's MQTT client: publishes commands, reads acks."""

    def __init__(self, broker: Mosquitto) -> None:
        self.bus = MqttBus(
            BusSettings(broker.host, broker.port, "op-integrity", "operator", "operator-secret")
        )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        async with self.bus.session() as session:
            await session.subscribe("site-agent/integrity/ack", qos=1)
            yield session

    @staticmethod
    async def ack(session: Any, cid: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            async for m in session.messages():
                ack: dict[str, Any] = json.loads(m.payload)
                if ack["id"] == cid:
                    return ack
        raise AssertionError("no ack")


async def test_one_message_with_an_unencodable_token_does_not_kill_the_bridge(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with site(tmp_path, mosquitto=mosquitto) as s:
        bridge = s.bridges[0]
        await until(lambda: bridge.connected.is_set(), 10, "bridge connected")
        op = Operator(mosquitto)
        async with op.session() as session:
            # A JSON escape for a lone surrogate: valid JSON, not encodable as UTF-8.
            raw = b'{"id": "bad-1", "operator": "operator", "token": "\\ud800", "mode": "auto"}'
            await session.publish("site-agent/integrity/command/set_mode", raw, qos=1)
            ack = await op.ack(session, "bad-1")
            assert ack["status"] == "rejected"
            assert "not authorised" in ack["reason"]
            # The same connection still takes commands: nothing died, nothing reconnected.
            good = {"id": "good-1", "operator": "operator", "token": TOKEN, "mode": "manual"}
            await session.publish(
                "site-agent/integrity/command/set_mode", json.dumps(good).encode(), qos=1
            )
            ack = await op.ack(session, "good-1")
        assert ack["status"] == "accepted"
        assert s.agent.state.mode == "manual"
        assert bridge.connections == 1
        assert s.agent.tasks["mqtt"].restarts == 0
        assert s.agent.state.rejected[("mqtt", "unauthorized")] == 1
        rows = await s.store.audit_rows()
        rejected = [r for r in rows if r.source == "mqtt" and r.result == "rejected"]
        assert [r.action for r in rejected] == ["command:set_mode"]


async def test_rejected_commands_are_audited_without_any_secret_in_the_journal(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    wrong = "wrong-token-7d2e9a"
    async with site(tmp_path, mosquitto=mosquitto) as s:
        await until(lambda: s.bridges[0].connected.is_set(), 10, "bridge connected")
        op = Operator(mosquitto)
        async with op.session() as session:
            # A wrong token (masked by its key) and the real token where no key says secret
            # (masked because the journal knows the configured secrets).
            for cid, body in (
                ("s-1", {"operator": "operator", "token": wrong, "mode": "auto"}),
                ("s-2", {"operator": TOKEN, "token": "x", "mode": "auto"}),
                (
                    "s-3",
                    {
                        "operator": "operator",
                        "token": TOKEN,
                        "target_kw": -1,
                        "until": "2099-01-01T00:00:00Z",
                    },
                ),
            ):
                name = "curtail" if "target_kw" in body else "set_mode"
                payload = json.dumps({"id": cid, **body}).encode()
                await session.publish(f"site-agent/integrity/command/{name}", payload, qos=1)
                ack = await op.ack(session, cid)
                assert ack["status"] == "rejected"
        rows = [r for r in await s.store.audit_rows() if r.action.startswith("command:")]
        assert len(rows) == 3, [r.to_json() for r in rows]
        assert all(r.result == "rejected" for r in rows)
        assert "***" in rows[1].reason  # the real token, sent as the operator's name
        await s.store.audit(source="test", action="flush", result="ok")  # WAL holds the rows
    text = journal_bytes(s.journal)
    assert wrong.encode() not in text
    assert TOKEN.encode() not in text
    assert b"agent-secret" not in text


# --- 3. modes ------------------------------------------------------------------------------------


async def test_manual_mode_sends_no_device_commands(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        await until(lambda: all(s.truth(a)["profile"] == SITE_TOP for a in ALL), 15, "all at +1")
        await until(lambda: not s.agent.pending(), 10, "commands verified")
        answer = await s.agent.handle_command(SetMode("m-1", "operator", "manual"))
        assert answer.accepted
        await s.cycles_pass(2)
        before = dict(s.agent.state.actions)
        s.feed.body = price_body("100")  # would sleep the S19s in auto mode
        await until(
            lambda: (
                s.agent.coordinator.price is not None and s.agent.coordinator.price.value == 100
            ),
            10,
            "spike seen",
        )
        await s.cycles_pass(8)
        assert dict(s.agent.state.actions) == before, "manual mode commanded a device"
        assert not any(s.asleep(a) for a in ALL)
        plan = s.agent.state.plan
        assert plan is not None
        assert plan.actions == ()
        assert "manual mode" in plan.summary
        # A curtailment in manual mode would never be executed: refused, not "accepted".
        until_t = datetime.now(UTC) + timedelta(hours=1)
        refused = await s.agent.handle_command(Curtail("m-2", "operator", 5.0, until_t))
        assert not refused.accepted
        assert "manual mode" in refused.reason
        # And back in auto the same spike is acted on (the test can fail).
        assert (await s.agent.handle_command(SetMode("m-3", "operator", "auto"))).accepted
        await until(lambda: all(s.asleep(a) for a in S19), 10, "S19s asleep in auto")


async def test_an_operator_cannot_leave_safe_mode(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        await until(lambda: all(s.truth(a)["profile"] == SITE_TOP for a in ALL), 15, "all at +1")
        # The journal stops taking writes (a read-only remount): the next action enters safe mode.
        await s.store._run(lambda c: c.execute("PRAGMA query_only=ON"))
        s.feed.body = price_body("100")
        await until(lambda: s.agent.state.mode == "safe", 10, "safe mode")
        for mode in ("auto", "manual"):
            answer = await s.agent.handle_command(SetMode(f"x-{mode}", "operator", mode))
            assert not answer.accepted
            assert "safe mode" in answer.reason
            assert s.agent.state.mode == "safe"
        await s.cycles_pass(2)
        assert s.agent.state.mode == "safe"
        plan = s.agent.state.plan
        assert plan is not None
        assert "safe mode" in plan.summary
        await s.store._run(lambda c: c.execute("PRAGMA query_only=OFF"))


# --- 4. the journal -------------------------------------------------------------------------------


def override(event_id: str, target_kw: float, hours: float = 1.0) -> GridEvent:
    now = datetime.now(UTC)
    return GridEvent(
        event_id=event_id,
        source="operator:alice",
        program="operator-override",
        kind=ProgramKind.OVERRIDE,
        start=now - timedelta(seconds=1),
        end=now + timedelta(hours=hours),
        max_site_kw=target_kw,
        fail=FailDirection.HOLD,
    )


async def test_a_journal_read_failure_keeps_the_overrides_in_force(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with Store.open(journal) as store:
        await store.upsert_event(override("override-hold", 8.0), baseline_w=0.0)
    async with site(tmp_path, journal=journal) as s:
        events = s.agent.coordinator.events
        await until(lambda: "override-hold" in events, 10, "override in force")
        await until(lambda: all(s.asleep(a) for a in S19), 15, "S19s shed for the override")
        # The events table can no longer be read (as a damaged page would make it).
        with sqlite3.connect(journal) as other:
            other.execute("ALTER TABLE events RENAME TO events_gone")
        await s.cycles_pass(8)
        assert "override-hold" in events, "a read failure cancelled the override"
        plan = s.agent.state.plan
        assert plan is not None
        assert "event:override-hold" in plan.binding
        assert all(s.asleep(a) for a in S19)
        with sqlite3.connect(journal) as other:
            other.execute("ALTER TABLE events_gone RENAME TO events")


async def test_a_journaled_override_beyond_the_limits_is_quarantined_not_a_crash_loop(
    tmp_path: Path,
) -> None:
    """Written by an older version (1e306 kW became +inf W): it used to crash every start."""
    journal = tmp_path / "journal.db"
    async with Store.open(journal) as store:
        await store.upsert_event(override("override-huge", 1e306), baseline_w=0.0)
        await store.upsert_event(override("override-far", 5.0, hours=24 * 30), baseline_w=0.0)
        await store.upsert_event(override("override-ok", 30.0), baseline_w=0.0)
    for _restart in range(2):
        async with site(tmp_path, journal=journal) as s:
            await s.cycles_pass(4)
            assert set(s.agent.coordinator.events) == {"override-ok"}
            quarantined = await s.store.quarantined()
            assert sorted(q.key for q in quarantined) == ["override-far", "override-huge"]
    async with Store.open(journal, readonly=True) as store:
        status = {e.event.event_id: e.status for e in await store.events()}
        rows = [r for r in await store.audit_rows() if r.action == "quarantine"]
    assert status["override-huge"] is EventStatus.QUARANTINED
    assert status["override-far"] is EventStatus.QUARANTINED
    assert status["override-ok"] is EventStatus.ACTIVE
    assert len(rows) == 2  # once each, not again at the restart
    assert "interconnect" in next(r.reason for r in rows if "override-huge" in r.reason)


async def test_a_journal_row_that_does_not_parse_is_quarantined(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    async with Store.open(journal) as store:
        await store.upsert_event(override("override-edited", 10.0), baseline_w=0.0)
    with sqlite3.connect(journal) as other:
        row = other.execute("SELECT event_json FROM events").fetchone()[0]
        bad = json.loads(row) | {"max_site_kw": "ten"}
        other.execute("UPDATE events SET event_json = ?", (json.dumps(bad),))
    async with site(tmp_path, journal=journal) as s:
        await s.cycles_pass(3)
        assert s.agent.coordinator.events == {}
        quarantined = await s.store.quarantined()
        assert [q.key for q in quarantined] == ["override-edited"]
        assert "max_site_kw must be a number" in quarantined[0].reason


# --- 5. command integrity -------------------------------------------------------------------------


async def test_a_replay_after_a_restart_is_answered_not_executed(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    end = datetime.now(UTC) + timedelta(hours=1)
    curtail = Curtail("c-1", "alice", 8.0, end)
    async with site(tmp_path, journal=journal) as s:
        first = await s.agent.handle_command(curtail)
        assert first.accepted
        await until(lambda: "override-c-1" in s.agent.coordinator.events, 10, "in force")
        released = await s.agent.handle_command(Release("r-1", "alice"))
        assert released.accepted, released.reason
        await until(lambda: "override-c-1" not in s.agent.coordinator.events, 10, "released")
    async with site(tmp_path, journal=journal) as s:
        await s.cycles_pass(2)
        again = await s.agent.handle_command(curtail)
        assert (again.accepted, again.reason) == (first.accepted, first.reason)
        await s.cycles_pass(3)
        assert "override-c-1" not in s.agent.coordinator.events, "the replay was executed"
        stolen = await s.agent.handle_command(Curtail("c-1", "bob", 0.0, end))
        assert not stolen.accepted
        assert "already used by another operator" in stolen.reason
        rows = [r for r in await s.store.audit_rows() if r.action == "curtail"]
        assert len(rows) == 1


async def test_every_channel_applies_the_same_limits(tmp_path: Path) -> None:
    now = datetime.now(UTC)

    class Source:  # a grid driver's output: what OpenADR or the MQTT curtail topic offer
        name = "openadr-test"

        def __init__(self) -> None:
            self.rejected: list[Any] = []

        def events(self) -> tuple[GridEvent, ...]:
            return (
                GridEvent(
                    "dr-huge",
                    "openadr-test",
                    "ers",
                    ProgramKind.EMERGENCY,
                    now,
                    now + timedelta(hours=1),
                    max_site_kw=1e6,
                ),
                GridEvent(
                    "dr-far",
                    "openadr-test",
                    "ers",
                    ProgramKind.EMERGENCY,
                    now,
                    now + timedelta(days=30),
                    max_site_kw=5.0,
                ),
                GridEvent(
                    "dr-ok",
                    "openadr-test",
                    "ers",
                    ProgramKind.EMERGENCY,
                    now,
                    now + timedelta(hours=1),
                    max_site_kw=35.0,
                ),
            )

    async with site(tmp_path) as s:
        s.agent.event_book.sources.append(Source())
        await until(lambda: "dr-ok" in s.agent.coordinator.events, 10, "dr-ok in force")
        await s.cycles_pass(2)
        assert set(s.agent.coordinator.events) == {"dr-ok"}
        rows = [r for r in await s.store.audit_rows() if r.result == "rejected"]
        assert any("dr-huge" in r.reason and "interconnect" in r.reason for r in rows)
        assert any("dr-far" in r.reason and "max_event_horizon_s" in r.reason for r in rows)
        for target, end in ((41.0, now + timedelta(hours=1)), (5.0, now + timedelta(days=2))):
            answer = await s.agent.handle_command(Curtail(f"l-{target}", "op", target, end))
            assert not answer.accepted


def hashprice_health(s: Site) -> SourceHealth:
    """The published health of the hashprice feed (a fresh copy after every poll)."""
    return next(v for k, v in s.agent.state.sources.items() if k.startswith("hashprice"))


def failed_to(s: Site, count: int) -> bool:
    return hashprice_health(s).failures >= count


# --- 6. hashprice ---------------------------------------------------------------------------------


async def test_a_hashprice_feed_out_of_range_is_never_used(tmp_path: Path) -> None:
    async with Feed(b'{"value": 60.0}') as hp:
        hashprice = {
            "usd_per_ph_day": 55,
            "poll_interval_s": 0.1,
            "feed": {
                "type": "http_json",
                "url": hp.url,
                "value_path": "value",
                "unit": "USD/PH/day",
                "timeout_s": 1,
            },
        }
        economics = {"pool_fee": 0.02, "hashprice": hashprice}
        async with site(tmp_path, economics=economics) as s:

            def used() -> float | None:
                snap = s.agent.state.snapshot
                return None if snap is None else snap.hashprice_usd_per_ph_day

            await until(lambda: used() == 60.0, 10, "the good hashprice used")
            for bad in (b"0", b"-5", b"1e12"):
                hp.body = b'{"value": ' + bad + b"}"
                target = hashprice_health(s).failures + 2
                await until(functools.partial(failed_to, s, target), 10, f"{bad!r} polled")
                await s.cycles_pass(2)
                assert used() == 60.0, f"hashprice {bad!r} was used"
            last_error = hashprice_health(s).last_error or ""
            assert "hashprice" in last_error


async def test_a_release_the_journal_cannot_take_is_refused_and_the_override_holds(
    tmp_path: Path,
) -> None:
    """Acknowledged "released" while the journal still said active, it came back next cycle."""
    end = datetime.now(UTC) + timedelta(hours=1)
    async with site(tmp_path) as s:
        assert (await s.agent.handle_command(Curtail("h-1", "alice", 8.0, end))).accepted
        await until(lambda: "override-h-1" in s.agent.coordinator.events, 10, "in force")
        await s.store._run(lambda c: c.execute("PRAGMA query_only=ON"))
        answer = await s.agent.handle_command(Release("h-2", "alice"))
        assert not answer.accepted
        assert "cannot journal the release" in answer.reason
        await s.cycles_pass(4)
        assert "override-h-1" in s.agent.coordinator.events
        await s.store._run(lambda c: c.execute("PRAGMA query_only=OFF"))
        assert (await s.agent.handle_command(Release("h-3", "alice"))).accepted
        await until(lambda: "override-h-1" not in s.agent.coordinator.events, 10, "released")
