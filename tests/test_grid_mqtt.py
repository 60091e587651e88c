"""MQTT curtailment source on a real Mosquitto: events, bad input, heartbeat, reconnect."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from drivers.bus.base import topic_matches
from drivers.grid.base import FailDirection, GridEventSource, ProgramKind
from drivers.grid.common import Rejection
from drivers.grid.mqtt_curtail import MqttCurtailSettings, MqttCurtailSource
from tests.pki import make_pki
from tests.servers import Mosquitto

pytestmark = pytest.mark.mqtt

PROGRAMS = {
    "ers": {"kind": "emergency", "fail": "curtail", "penalty_usd_per_mwh": 1000},
    "dr": {"kind": "economic", "fail": "hold", "payment_usd_per_mwh": 200},
    "flex": {"kind": "economic", "fail": "release"},
}


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def make_settings(broker: Mosquitto, **kw: Any) -> MqttCurtailSettings:
    base: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "username": "agent",
        "password": "agent-secret",
        "heartbeat_max_age_s": 30,
        "programs": PROGRAMS,
        "reconnect_initial_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    base.update(kw)
    return MqttCurtailSettings.model_validate(base)


class Running:
    """A source running against the broker, plus an operator client to publish with."""

    def __init__(self, source: MqttCurtailSource, operator: aiomqtt.Client) -> None:
        self.source = source
        self.operator = operator

    async def send(self, payload: Any, topic: str = "grid/curtail") -> None:
        text = payload if isinstance(payload, str | bytes) else json.dumps(payload)
        seen = len(self.source.rejected)
        before = self.source.events()
        await self.operator.publish(topic, text, qos=1)
        # Wait until the message has been handled: a rejection or a change of events.
        await until(lambda: len(self.source.rejected) > seen or self.source.events() != before)

    async def heartbeat(self) -> None:
        await self.operator.publish("grid/heartbeat", "{}", qos=0)


@pytest.fixture
async def running(mosquitto: Mosquitto) -> AsyncIterator[Running]:
    audit: list[Rejection] = []
    source = MqttCurtailSource(make_settings(mosquitto), on_rejected=audit.append)
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await until(lambda: source.connected)
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, username="operator", password="operator-secret"
    ) as operator:
        yield Running(source, operator)
    stop.set()
    await asyncio.wait_for(task, 15)
    assert audit == source.rejected  # the callback saw every rejection


async def test_on_message_becomes_an_event_that_holds_until_release(running: Running) -> None:
    assert isinstance(running.source, GridEventSource)
    now = datetime.now(UTC)
    start, end = now + timedelta(minutes=1), now + timedelta(hours=2)
    running.source.changed.clear()
    await running.send(
        {
            "event_id": "e1",
            "state": "on",
            "program": "ers",
            "kind": "emergency",
            "max_site_kw": 500,
            "start": iso(start),
            "until": iso(end),
        }
    )
    assert running.source.changed.is_set()  # the fast path is woken
    (event,) = running.source.events()
    assert event.event_id == "e1"
    assert event.kind is ProgramKind.EMERGENCY
    assert event.mandatory
    assert event.max_site_kw == 500
    assert event.shed_kw is None
    assert abs(event.start - start) < timedelta(seconds=1)
    assert abs(event.end - end) < timedelta(seconds=1)
    assert event.fail is FailDirection.CURTAIL
    assert event.penalty_usd_per_mwh == 1000
    await asyncio.sleep(0.2)
    assert [e.event_id for e in running.source.events()] == ["e1"]  # a level: still there
    await running.send({"event_id": "e1", "state": "off", "program": "ers"})
    assert running.source.events() == ()
    assert running.source.rejected == []


async def test_republished_command_keeps_its_start_and_updates_its_target(
    running: Running,
) -> None:
    end = _future()
    await running.send(
        {"event_id": "k", "state": "on", "program": "dr", "shed_kw": 100, "until": end}
    )
    (first,) = running.source.events()
    await asyncio.sleep(0.05)
    await running.send(
        {"event_id": "k", "state": "on", "program": "dr", "shed_kw": 150, "until": end}
    )
    (second,) = running.source.events()
    assert second.shed_kw == 150
    assert second.start == first.start


async def test_conflicting_events_are_all_reported(running: Running) -> None:
    end = iso(datetime.now(UTC) + timedelta(hours=1))
    await running.send(
        {"event_id": "a", "state": "on", "program": "dr", "shed_kw": 300, "until": end}
    )
    await running.send(
        {"event_id": "b", "state": "on", "program": "ers", "max_site_kw": 100, "until": end}
    )
    events = {e.event_id: e for e in running.source.events()}
    assert set(events) == {"a", "b"}
    assert events["a"].shed_kw == 300
    assert events["a"].payment_usd_per_mwh == 200
    assert not events["a"].mandatory
    assert events["b"].max_site_kw == 100


def _future() -> str:
    return iso(datetime.now(UTC) + timedelta(hours=1))


BAD = [
    ("{not json", "malformed JSON"),
    (
        json.dumps({"event_id": "x", "state": "on", "program": "ers", "until": _future()})[:-1]
        + ', "max_site_kw": NaN}',
        "max_site_kw",
    ),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "kind": "blackout",
            "until": _future(),
        },
        "unknown kind 'blackout'",
    ),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "kind": "economic",
            "until": _future(),
        },
        "contradicts program 'ers'",
    ),
    (
        {"event_id": "x", "state": "on", "program": "nope", "max_site_kw": 5, "until": _future()},
        "unknown program 'nope'",
    ),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "until": "2020-01-01T00:00:00Z",
        },
        "window already over",
    ),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "shed_kw": 5,
            "until": _future(),
        },
        "exactly one of max_site_kw or shed_kw",
    ),
    ({"event_id": "x", "state": "on", "program": "ers", "max_site_kw": 5}, "needs 'until'"),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "until": "2030-01-01T00:00:00",
        },
        "time zone",
    ),
    (
        {"event_id": "x", "state": "on", "program": "ers", "max_site_kw": -5, "until": _future()},
        "greater than or equal to 0",
    ),
    ({"event_id": "x", "state": "paused", "program": "ers"}, "state"),
    (
        {
            "event_id": "x",
            "state": "on",
            "program": "ers",
            "max_site_kw": 5,
            "until": _future(),
            "colour": "red",
        },
        "colour: Extra inputs are not permitted",
    ),
    ({"event_id": "zz", "state": "off", "program": "ers"}, "release of unknown event 'zz'"),
    ("[1, 2]", "invalid curtailment message"),
]


@pytest.mark.parametrize(("payload", "reason"), BAD)
async def test_bad_messages_are_rejected_with_a_reason_and_change_nothing(
    running: Running, payload: Any, reason: str
) -> None:
    await running.send(
        {"event_id": "keep", "state": "on", "program": "dr", "shed_kw": 50, "until": _future()}
    )
    before = running.source.events()
    await running.send(payload)
    assert running.source.events() == before
    (rejection,) = running.source.rejected
    assert reason in rejection.reason
    assert rejection.topic == "grid/curtail"


async def test_stale_heartbeat_applies_each_programs_fail_direction(mosquitto: Mosquitto) -> None:
    source = MqttCurtailSource(make_settings(mosquitto, heartbeat_max_age_s=0.4))
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        await until(lambda: source.connected)
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, username="operator", password="operator-secret"
        ) as op:
            await op.publish("grid/heartbeat", "{}")
            end = _future()
            for eid, program in (("h", "dr"), ("r", "flex")):
                await op.publish(
                    "grid/curtail",
                    json.dumps(
                        {
                            "event_id": eid,
                            "state": "on",
                            "program": program,
                            "shed_kw": 10,
                            "until": end,
                        }
                    ),
                    qos=1,
                )
            await until(lambda: len(source.events()) == 2, 10.0)
            assert not source.heartbeat_stale()
            # Silence: after 0.4 s the heartbeat is stale.
            await until(source.heartbeat_stale, 10.0)
            ids = {e.event_id for e in source.events()}
            assert ids == {"h", "mqtt:signal-lost:ers"}  # hold kept, release dropped
            lost = next(e for e in source.events() if e.program == "ers")
            assert lost.max_site_kw == 0.0
            assert lost.mandatory
            assert lost.active_at(datetime.now(UTC))
            # The heartbeat returns: the synthesized shed ends, the released event is back.
            source.changed.clear()
            await op.publish("grid/heartbeat", "{}")
            await until(lambda: not source.heartbeat_stale(), 10.0)
            assert source.changed.is_set()
            assert {e.event_id for e in source.events()} == {"h", "r"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_reconnects_after_broker_restart(mosquitto: Mosquitto) -> None:
    source = MqttCurtailSource(make_settings(mosquitto))
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        await until(lambda: source.connected)
        mosquitto.stop()
        await until(lambda: not source.connected)
        await asyncio.sleep(0.3)  # a few refused attempts, backoff capped at 0.5 s
        mosquitto.start()
        await until(lambda: source.connects == 2, 20.0)
        async with aiomqtt.Client(
            mosquitto.host, mosquitto.port, username="operator", password="operator-secret"
        ) as op:
            await op.publish(
                "grid/curtail",
                json.dumps(
                    {
                        "event_id": "after",
                        "state": "on",
                        "program": "dr",
                        "max_site_kw": 1,
                        "until": _future(),
                    }
                ),
                qos=1,
            )
            await until(lambda: len(source.events()) == 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_wrong_password_never_connects(mosquitto: Mosquitto) -> None:
    source = MqttCurtailSource(make_settings(mosquitto, password="wrong"))
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    await asyncio.sleep(0.5)
    assert source.connects == 0
    stop.set()
    await asyncio.wait_for(task, 15)


async def test_default_program_for_messages_that_name_none(mosquitto: Mosquitto) -> None:
    source = MqttCurtailSource(make_settings(mosquitto, default_program="ers"))
    source.handle(
        "grid/curtail",
        json.dumps(
            {"event_id": "d", "state": "on", "max_site_kw": 10, "until": _future()}
        ).encode(),
    )
    (event,) = source.events()
    assert (event.program, event.kind) == ("ers", ProgramKind.EMERGENCY)
    bare = MqttCurtailSource(make_settings(mosquitto))
    bare.handle(
        "grid/curtail",
        json.dumps(
            {"event_id": "d", "state": "on", "max_site_kw": 10, "until": _future()}
        ).encode(),
    )
    assert bare.events() == ()
    assert "no program named" in bare.rejected[0].reason
    with pytest.raises(ValueError, match="default_program 'x' is not one of"):
        make_settings(mosquitto, default_program="x")


def test_settings_reject_unknown_keys_and_kinds() -> None:
    with pytest.raises(ValueError, match="extra"):
        MqttCurtailSettings.model_validate({"programs": PROGRAMS, "qos": 2})
    with pytest.raises(ValueError, match="kind"):
        MqttCurtailSettings.model_validate({"programs": {"x": {"kind": "blackout"}}})


class TlsMosquitto(Mosquitto):
    """The real broker with a TLS listener that also demands a client certificate."""

    def __init__(self, workdir: Path, pki: dict[str, Path]) -> None:
        super().__init__(workdir)
        self.conf.write_text(
            self.conf.read_text()
            + f"cafile {pki['ca']}\ncertfile {pki['broker_crt']}\nkeyfile {pki['broker_key']}\n"
            "require_certificate true\n"
        )


async def test_tls_with_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, ["broker", "agent"])
    broker = TlsMosquitto(tmp_path, pki)
    broker.start()
    try:
        tls = {"tls_ca": pki["ca"], "tls_cert": pki["agent_crt"], "tls_key": pki["agent_key"]}
        source = MqttCurtailSource(make_settings(broker, **tls))
        plain = MqttCurtailSource(make_settings(broker))  # no TLS: the broker must refuse it
        stop = asyncio.Event()
        tasks = [asyncio.create_task(s.run(stop)) for s in (source, plain)]
        await until(lambda: source.connected)
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        context.load_cert_chain(str(pki["agent_crt"]), str(pki["agent_key"]))
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username="operator",
            password="operator-secret",
            tls_context=context,
        ) as op:
            await op.publish(
                "grid/curtail",
                json.dumps(
                    {
                        "event_id": "t",
                        "state": "on",
                        "program": "ers",
                        "max_site_kw": 1,
                        "until": _future(),
                    }
                ),
                qos=1,
            )
            await until(lambda: len(source.events()) == 1)
        assert plain.connects == 0
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        broker.stop()


@pytest.mark.parametrize(
    ("topic", "pattern", "matches"),
    [
        ("grid/heartbeat", "grid/heartbeat", True),
        ("grid/heartbeat", "grid/+", True),
        ("grid/site/heartbeat", "grid/#", True),
        ("grid", "grid/#", True),
        ("grid/heartbeat/x", "grid/+", False),
        ("grid/heartbeat", "grid", False),
        ("$SYS/broker/uptime", "#", False),
    ],
)
def test_topic_filters_match_as_mqtt_says(topic: str, pattern: str, matches: bool) -> None:
    assert topic_matches(topic, pattern) is matches
