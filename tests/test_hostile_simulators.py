"""The simulators' control ports are inputs too: every field is validated before anything changes.

A bad fault request to the LuxOS fleet (NaN, infinite, negative or boolean delay, unknown field,
kind or address, a duplicate, garbage bytes, deep nesting) is answered with a one-line error and
changes no miner, and a reboot timer already running on another miner still fires on time.
The price server's ``POST /fault`` refuses the same classes with HTTP 400 and keeps its mode.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulators.luxos import LuxosFleet, MinerSpec, serve_control
from simulators.openadr_vtn import OpenAdrVtn
from simulators.price_server import PriceServer
from tests.loopback import ip
from tests.servers import free_port

pytestmark = pytest.mark.hostile

A, B, C = (ip(42, i) for i in (1, 2, 3))


async def raw_request(port: int, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    try:
        writer.write(line + b"\n")
        await writer.drain()
        answer = await reader.readline()
    finally:
        writer.close()
    reply = json.loads(answer)
    assert isinstance(reply, dict)
    return reply


@pytest.fixture
async def control() -> AsyncIterator[tuple[LuxosFleet, int]]:
    async with LuxosFleet([MinerSpec(a, "s19jpro") for a in (A, B, C)]) as fleet:
        server = await serve_control(fleet, 0)
        try:
            yield fleet, int(server.sockets[0].getsockname()[1])
        finally:
            server.close()


def faults(fleet: LuxosFleet) -> dict[str, tuple[object, object]]:
    return {a: (fleet.truth(a)["fault"], fleet.truth(a)["fault_delay_s"]) for a in (A, B, C)}


BAD_LINES: list[tuple[bytes, str]] = [
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay_s": NaN}' % B.encode(), "NaN"),
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay_s": 1e999}' % B.encode(), "inf"),
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay_s": 1e300}' % B.encode(), "0 to"),
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay_s": -1}' % B.encode(), "0 to"),
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay_s": true}' % B.encode(), "number"),
    (b'{"op": "fault", "address": "%s", "fault": "slow", "delay": 1}' % B.encode(), "unknown"),
    (b'{"op": "fault", "address": "%s", "fault": "melt"}' % B.encode(), "melt"),
    (b'{"op": "fault", "address": "%s", "fault": 3}' % B.encode(), "fault must be one of"),
    (
        b'{"op": "fault", "addresses": ["%s", "%s"], "fault": "hang"}' % (B.encode(), B.encode()),
        "listed twice",
    ),
    (
        b'{"op": "fault", "addresses": ["%s", "127.0.0.99"], "fault": "reboot", "delay_s": 1}'
        % C.encode(),
        "127.0.0.99",
    ),
    (b'{"op": "fault", "addresses": [], "fault": "hang"}', "non-empty"),
    (b'{"op": "fault", "addresses": [7], "fault": "hang"}', "string"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (b'{"op": "' + b"x" * 5000 + b'"}', "unknown op"),
]


async def test_bad_fault_requests_change_nothing_and_timers_keep_running(
    control: tuple[LuxosFleet, int],
) -> None:
    fleet, port = control
    # Miner A reboots for 1.5 s: its timer must fire on time whatever else is sent.
    started = time.monotonic()
    ok = await raw_request(
        port, json.dumps({"op": "fault", "address": A, "fault": "reboot", "delay_s": 1.5}).encode()
    )
    assert ok == {"ok": True}
    before = faults(fleet)
    for line, words in BAD_LINES:
        reply = await raw_request(port, line)
        assert reply["ok"] is False, line[:80]
        error = str(reply["error"])
        assert words in error, (line[:80], error)
        assert "\n" not in error
        assert len(error) <= 300
        assert faults(fleet) == before, line[:80]
    # The reboot timer fired on schedule: A is back with its fault cleared.
    async with asyncio.timeout(10):
        while fleet.truth(A)["fault"] != "none":  # noqa: ASYNC110 -- the simulator truth
            await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 1.5
    assert faults(fleet)[B] == ("none", 0.0)
    assert faults(fleet)[C] == ("none", 0.0)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.dictionaries(
        st.sampled_from(["op", "fault", "address", "addresses", "delay_s", "x"]),
        st.none()
        | st.booleans()
        | st.floats(allow_nan=False)
        | st.integers(min_value=-(10**20), max_value=10**20)
        | st.sampled_from(["fault", "slow", "hang", "reboot", "list", B, "127.9.9.9"])
        | st.lists(st.sampled_from([B, C, "x"]), max_size=3),
    )
)
async def test_random_control_requests_answer_and_never_break_the_port(
    control: tuple[LuxosFleet, int], request: dict[str, Any]
) -> None:
    fleet, port = control
    before = faults(fleet)
    reply = await raw_request(port, json.dumps(request).encode())
    assert isinstance(reply.get("ok"), bool)
    if not reply["ok"]:
        assert faults(fleet) == before
    # Heal anything the request legitimately set, so examples stay independent.
    for a in (A, B, C):
        if fleet.truth(a)["fault"] not in ("none", "reboot"):
            fleet.set_fault(a, "none")


@pytest.mark.parametrize(
    "body",
    [
        b'{"mode": "slow", "slow_s": NaN}',
        b'{"mode": "slow", "slow_s": Infinity}',
        b'{"mode": "slow", "slow_s": 1e300}',
        b'{"mode": "slow", "slow_s": true}',
        b'{"mode": "trickle", "trickle_s": -1}',
        b'{"mode": "melt"}',
        b'{"mode": ["slow"]}',
        b'{"mode": "slow", "extra": 1}',
        b'{"mode": "slow", "pad": "' + b"x" * 5000 + b'"}',
        b'{"mode": "\xff"}',
        b"[" * 100_000,
    ],
)
async def test_price_server_fault_port_refuses_and_keeps_its_mode(body: bytes) -> None:
    async with PriceServer([41.5]) as server, httpx.AsyncClient() as client:
        server.fault = "down"
        slow_s, trickle_s = server.slow_s, server.trickle_s
        answer = await client.post(f"{server.url}/fault", content=body, timeout=5)
        assert answer.status_code in (400, 413)
        assert (server.fault, server.slow_s, server.trickle_s) == ("down", slow_s, trickle_s)
        ok = await client.post(f"{server.url}/fault", json={"mode": "ok", "slow_s": 0.5})
        assert ok.status_code == 200
        assert (server.fault, server.slow_s) == ("ok", 0.5)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": NaN, "value": 1}',
            "NaN",
        ),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": 1e300, "value": 1}',
            "duration_s must be",
        ),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": true, "value": 1}',
            "duration_s must be a number",
        ),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00", "duration_s": 60, "value": 1}',
            "time zone",
        ),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": 60, "value": 1e308}',
            "value must be",
        ),
        (
            b'{"ven_name": 5, "start": "2030-01-01T00:00:00Z", "duration_s": 60, "value": 1}',
            "ven_name must be text",
        ),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": 60, "value": 1, '
            b'"x": 1}',
            "unknown field",
        ),
        (b"[" * 100_000, "bad event request"),
        (b'{"ven_name": "\xff"}', "bad event request"),
        (
            b'{"ven_name": "v", "start": "2030-01-01T00:00:00Z", "duration_s": 60, "value": 1}',
            "not registered",
        ),
    ],
)
async def test_vtn_control_port_validates_every_field(body: bytes, words: str) -> None:
    async with (
        OpenAdrVtn(port=free_port(), poll_s=1) as vtn,
        httpx.AsyncClient() as client,
    ):
        answer = await client.post(
            f"http://127.0.0.1:{vtn.port}/control/event", content=body, timeout=10
        )
        assert answer.status_code == 400
        assert words in answer.text, answer.text
        assert len(answer.text) <= 300
        assert vtn.delivered == []
