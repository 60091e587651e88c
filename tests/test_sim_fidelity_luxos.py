"""The LuxOS simulator against replies recorded from a real LuxOS 2025.4.8 miner.

Every recorded command is sent to the simulator over TCP and the two replies are diffed: status
code, message and flag, section names, every key of every row, each value's JSON type, and the
units (numeric strings, dash-separated temperatures, GH). The differences that remain are the
ones listed in ``simulators/luxos.py``'s docstring, each with its reason; this test fails on
any other.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from simulators.luxos import LuxosFleet, fleet_specs
from simulators.luxos_model import PROFILE_DRAW_RATIO, S19J_PRO, ManualClock
from tests.loopback import ip

pytestmark = pytest.mark.shared_data

ADDRESS = ip(161, 1)
# Recorded command -> the request that produced it.
COMMANDS: dict[str, tuple[str, str | None]] = {
    "version": ("version", None),
    "stats": ("stats", None),
    "summary": ("summary", None),
    "power": ("power", None),
    "profiles": ("profiles", None),
    "config": ("config", None),
    "fans": ("fans", None),
    "pools": ("pools", None),
    "devs": ("devs", None),
    "temps": ("temps", None),
    "events": ("events", None),
    "voltageget_0": ("voltageget", "0"),
    "voltageget_1": ("voltageget", "1"),
    "voltageget_2": ("voltageget", "2"),
}
# Remaining differences, each explained in simulators/luxos.py's docstring.
NOT_SERVED = {"healthchipget_0", "healthchipget_1", "healthchipget_2"}  # per-chip health
EMPTY_SECTIONS = {"EVENTS"}  # a healthy simulated miner has no events to show
# Messages that carry a count of the miner's own things.
COUNTED = re.compile(r"^\d+ ")


@pytest.fixture
def recordings(shared_data: Path) -> dict[str, Any]:
    folder = shared_data / "fixtures" / "miners" / "asic-rs" / "luxminer" / "v1"
    if not folder.is_dir():
        pytest.skip(f"LuxOS recordings missing in {folder}")
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


@pytest.fixture
async def fleet() -> AsyncIterator[LuxosFleet]:
    async with LuxosFleet(fleet_specs(1, ADDRESS), clock=ManualClock()) as f:
        yield f


async def ask(command: str, parameter: str | None = None, *, raw: bytes | None = None) -> Any:
    reader, writer = await asyncio.open_connection(ADDRESS, 4028)
    try:
        request = {"command": command} | ({"parameter": parameter} if parameter else {})
        writer.write(raw if raw is not None else json.dumps(request).encode())
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return json.loads(data.rstrip(b"\x00"))


def kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}[
        type(value)
    ]


def diff_rows(where: str, recorded: dict[str, Any], simulated: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(simulated)):
        if key not in simulated:
            out.append(f"{where}.{key}: missing in the simulator")
        elif key not in recorded:
            out.append(f"{where}.{key}: not in the recording")
        elif kind(recorded[key]) != kind(simulated[key]):
            out.append(
                f"{where}.{key}: {kind(simulated[key])} {simulated[key]!r}, "
                f"recorded {kind(recorded[key])} {recorded[key]!r}"
            )
        elif isinstance(recorded[key], dict):
            out += diff_rows(f"{where}.{key}", recorded[key], simulated[key])
    return out


def diff_reply(name: str, recorded: dict[str, Any], simulated: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rs, ss = recorded["STATUS"][0], simulated["STATUS"][0]
    for field in ("STATUS", "Code"):
        if rs[field] != ss[field]:
            out.append(f"{name}: STATUS.{field} {ss[field]!r}, recorded {rs[field]!r}")
    r_msg, s_msg = rs["Msg"], ss["Msg"]
    if COUNTED.match(r_msg):
        r_msg, s_msg = COUNTED.sub("N ", r_msg), COUNTED.sub("N ", s_msg)
    if r_msg != s_msg:
        out.append(f"{name}: Msg {ss['Msg']!r}, recorded {rs['Msg']!r}")
    if not str(ss["Description"]).startswith("LUXminer "):
        out.append(f"{name}: Description {ss['Description']!r}")
    out += diff_rows(f"{name}.STATUS", rs, ss)
    sections = set(recorded) - {"STATUS", "id"}
    if sections != set(simulated) - {"STATUS", "id"}:
        out.append(f"{name}: sections {sorted(set(simulated))}, recorded {sorted(set(recorded))}")
        return out
    for section in sorted(sections):
        r_rows, s_rows = recorded[section], simulated[section]
        if section in EMPTY_SECTIONS and not s_rows:
            continue
        if not s_rows:
            out.append(f"{name}.{section}: no rows")
            continue
        # Rows of one section share their keys; STATS has a version row and a board row.
        pairs = (
            zip(r_rows, s_rows, strict=False) if section == "STATS" else [(r_rows[0], s_rows[0])]
        )
        for i, (r_row, s_row) in enumerate(pairs):
            out += diff_rows(f"{name}.{section}[{i}]", r_row, s_row)
    if simulated.get("id") != 1:
        out.append(f"{name}: id {simulated.get('id')!r}")
    return out


async def test_every_recorded_reply_matches_field_for_field(
    recordings: dict[str, Any], fleet: LuxosFleet
) -> None:
    assert set(recordings) == set(COMMANDS) | NOT_SERVED, "recordings changed: update the test"
    problems: list[str] = []
    for name, (command, parameter) in COMMANDS.items():
        problems += diff_reply(name, recordings[name], await ask(command, parameter))
    assert problems == [], "\n".join(problems)


async def test_units_and_encodings_are_the_firmware_s(fleet: LuxosFleet) -> None:
    stats = (await ask("stats"))["STATS"][1]
    assert stats["rate_unit"] == "GH"
    rates = [float(stats[f"chain_rate{b}"]) for b in (1, 2, 3)]  # numeric strings
    assert all(isinstance(stats[f"chain_rate{b}"], str) for b in (1, 2, 3, 4))
    assert sum(rates) == pytest.approx(stats["GHS av"], rel=1e-3)  # they sum to the average
    assert stats["chain_rate4"] == "0"  # the empty fourth slot, as recorded
    exhaust, intake, intake2, exhaust2 = (int(t) for t in stats["temp_chip1"].split("-"))
    assert (exhaust, intake) == (exhaust2, intake2)
    assert exhaust > intake  # exhaust sensors read hotter than the intake ones
    assert stats["temp_chip1"] == stats["temp_pcb1"]  # chip = board on LuxOS
    power = (await ask("power"))["POWER"][0]
    default = S19J_PRO.profile("default")
    assert power["Watts"] == round(default.power_w * PROFILE_DRAW_RATIO)
    assert power["PSU"] is True
    profiles = (await ask("profiles"))["PROFILES"]
    assert len(profiles) == 25
    assert profiles[0]["Watts"] / default.power_w == pytest.approx(0.3, abs=0.05)
    assert profiles[-1]["Watts"] / default.power_w == pytest.approx(1.5, abs=0.05)
    assert [p["Profile Name"] for p in profiles][16] == "default"
    assert all(
        re.fullmatch(r"\d+MHz", p["Profile Name"]) for i, p in enumerate(profiles) if i != 16
    )
    tempctrl = (await ask("tempctrl"))["TEMPCTRL"][0]
    assert (tempctrl["Target"], tempctrl["Hot"], tempctrl["Dangerous"]) == (55.0, 65.0, 70.0)


async def test_documented_session_and_command_codes(fleet: LuxosFleet) -> None:
    assert (await ask("session"))["STATUS"][0]["Code"] == 319
    logon = await ask("logon")
    assert (logon["STATUS"][0]["Code"], logon["STATUS"][0]["Msg"]) == (316, "Session created")
    sid = logon["SESSION"][0]["SessionID"]
    refused = await ask("logon")
    assert refused["STATUS"][0]["STATUS"] == "E"
    assert (await ask("session"))["SESSION"][0]["SessionID"] == sid  # documented: anyone sees it
    curtail = await ask("curtail", f"{sid},sleep")
    assert (curtail["STATUS"][0]["Code"], curtail["STATUS"][0]["Msg"]) == (
        335,
        "Curtailment command sent",
    )
    assert curtail["CURTAIL"] == [{"Action": "sleep mode"}]
    await ask("atmset", f"{sid},enabled=false")
    chosen = await ask("profileset", f"{sid},2.5kW")  # a documented selector
    assert (chosen["STATUS"][0]["Code"], chosen["STATUS"][0]["Msg"]) == (321, "Profile Set")
    nearest = min(S19J_PRO.profiles, key=lambda p: abs(p.power_w - 2500))
    assert chosen["PROFILE"][0]["Profile"] == nearest.name
    by_rate = await ask("profileset", f"{sid},104THs")
    assert by_rate["PROFILE"][0]["Profile"] == "default"
    legacy = await ask("profileset", f"{sid},0,default")  # the legacy board_id form
    assert legacy["PROFILE"][0]["Profile"] == "default"
    assert (await ask("profileget", "default"))["PROFILE"][0]["Watts"] == 3068
    assert (await ask("limits"))["LIMITS"][0]["FrequencyMin"] == S19J_PRO.profiles[0].frequency_mhz


async def test_framing_is_tolerant_and_parsing_bounded(fleet: LuxosFleet) -> None:
    # A trailing NUL, as some clients send, and a reply without waiting for a half-close.
    reply = await ask("", raw=b'{"command": "power"}\x00')
    assert reply["STATUS"][0]["Code"] == 311
    # cgminer's text form, answered in text.
    reader, writer = await asyncio.open_connection(ADDRESS, 4028)
    writer.write(b"version")
    await writer.drain()
    async with asyncio.timeout(5):
        text = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert text.startswith(b"STATUS=S,Code=22,")
    assert text.endswith(b"|\x00")
    # Hostile input: deep nesting and oversize requests get a one-line error, no traceback.
    deep = await ask("", raw=b'{"command": ' + b"[" * 10_000 + b"}")
    assert deep["STATUS"][0]["STATUS"] == "E"
    assert "nested" in deep["STATUS"][0]["Msg"] or "too long" in deep["STATUS"][0]["Msg"]
    nested = await ask("", raw=b'{"command": ' + b"[" * 40 + b"]" * 40 + b"}")
    assert "nested deeper" in nested["STATUS"][0]["Msg"]
    big = await ask("", raw=b'{"command": "' + b"a" * 20_000 + b'"}')
    assert "too long" in big["STATUS"][0]["Msg"]
    assert (await ask("power"))["POWER"][0]["Watts"] > 0  # still serving
