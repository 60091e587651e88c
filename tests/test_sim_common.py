"""Hostile input against the family simulators' shared machinery: framing, bounds, timers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from simulators.antminer import AntminerFleet, antminer_specs
from simulators.common import (
    MAX_REQUEST_BYTES,
    UNREADABLE,
    control_answer,
    decode_request,
    parse_delay_s,
    parse_fault,
)
from simulators.luxos_model import FaultKind, ManualClock
from simulators.whatsminer import WhatsminerFleet, whatsminer_specs
from tests.loopback import ip

WM = ip(170, 1)
WM2 = ip(170, 2)
AM = ip(171, 1)


@pytest.fixture
async def whatsminers() -> AsyncIterator[WhatsminerFleet]:
    async with WhatsminerFleet(whatsminer_specs(2, WM), clock=ManualClock()) as f:
        yield f


async def exchange(address: str, payload: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection(address, 4028)
    writer.write(payload)
    await writer.drain()
    if half_close:
        writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return raw


def test_delays_and_faults_from_untrusted_input_are_bounded() -> None:
    assert parse_delay_s(2) == 2.0
    for bad in (float("nan"), float("inf"), -0.1, 1e9, "1", True, None, [1]):
        with pytest.raises(ValueError, match="delay_s"):
            parse_delay_s(bad)
    assert parse_fault("slow", 0.5).kind is FaultKind.SLOW
    for kind in ("melt", 3, None, ""):
        with pytest.raises(ValueError, match="fault must be one of"):
            parse_fault(kind)


def test_decode_request_tolerates_framing_and_refuses_depth() -> None:
    assert decode_request(b'{"command":"summary"}\x00') == {"command": "summary"}
    assert decode_request(b'{"command":"summary"}\n') == {"command": "summary"}
    with pytest.raises(json.JSONDecodeError, match="Expecting value"):
        decode_request(b'{"command":')  # incomplete: wait for more
    assert decode_request(b"[" * 100_000 + b"]" * 100_000) is UNREADABLE


async def test_rpc_survives_hostile_requests_and_keeps_serving(
    whatsminers: WhatsminerFleet,
) -> None:
    nested = json.loads(await exchange(WM, b"[" * 8000, half_close=True))
    assert (nested["STATUS"], nested["Code"]) == ("E", 23)
    not_json = json.loads(await exchange(WM, b"summary please", half_close=True))
    assert (nested["STATUS"], not_json["Code"]) == ("E", 23)
    too_long = json.loads(await exchange(WM, b'{"command": "' + b"x" * MAX_REQUEST_BYTES))
    assert too_long["Code"] == 23
    not_object = json.loads(await exchange(WM, b"[1, 2]"))
    assert not_object["Code"] == 23
    no_command = json.loads(await exchange(WM, b'{"command": 7}'))
    assert (no_command["STATUS"], no_command["Code"]) == ("E", 14)
    # A trailing NUL after the document, as some clients send, is fine.
    ok = json.loads(await exchange(WM, b'{"command": "summary"}\x00'))
    assert ok["STATUS"][0]["STATUS"] == "S"
    # Connecting and leaving without a word (what scanners do) is fine too.
    for _ in range(3):
        _, writer = await asyncio.open_connection(WM, 4028)
        writer.close()
        await writer.wait_closed()
    assert json.loads(await exchange(WM, b'{"command": "status"}'))["Code"] == 131


async def test_a_slow_reply_survives_bad_control_requests_and_other_faults(
    whatsminers: WhatsminerFleet,
) -> None:
    whatsminers.set_fault(WM, "slow", 0.6)
    started = time.monotonic()
    pending = asyncio.create_task(exchange(WM, b'{"command": "summary"}'))
    await asyncio.sleep(0.1)
    for bad in (
        {"op": "fault", "addresses": [WM, "127.0.0.7"], "fault": "none"},
        {"op": "fault", "address": WM, "fault": "slow", "delay_s": -5},
        {"op": "fault", "address": WM2, "fault": "melt"},
    ):
        assert control_answer(whatsminers, bad)["ok"] is False
    whatsminers.set_fault(WM2, "reboot", 0.2)  # another miner's reboot does not touch WM
    reply = json.loads(await pending)
    assert time.monotonic() - started >= 0.6
    assert reply["SUMMARY"][0]["Power"] == 3400
    assert whatsminers.truth(WM)["fault"] == "slow"


async def test_web_server_survives_hostile_http() -> None:
    fleet = AntminerFleet(antminer_specs(1, AM), clock=ManualClock())
    try:
        await fleet.start()
    except PermissionError:
        pytest.skip("binding port 80 (the Antminer web API) needs root")
    try:
        hostile = [
            b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",  # head over the limit
            b"POST /cgi-bin/set_miner_conf.cgi HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            b"NONSENSE\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ]
        for payload in hostile:
            reader, writer = await asyncio.open_connection(AM, 80)
            writer.write(payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no traceback
            writer.close()
            await writer.wait_closed()
        reader, writer = await asyncio.open_connection(AM, 80)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 401 ")
        assert b'realm="antMiner Configuration"' in head
        assert fleet.truth(AM)["sleeping"] is False
    finally:
        await fleet.stop()
