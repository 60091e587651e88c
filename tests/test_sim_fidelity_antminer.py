"""The stock Antminer simulator against replies recorded from a real miner (asic-rs, v2020).

Over real sockets, each RPC reply and the web ``get_system_info`` are diffed against the
recording: key names, value types, STATUS codes, messages and descriptions, and units (rates in
GH/s summing over boards, temperatures in °C with the firmware's sensor pattern). Every
difference allowed here is listed, with its reason, in ``simulators/antminer.py``'s docstring.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from simulators.antminer import AntminerFleet, antminer_specs
from simulators.luxos_model import ManualClock
from tests.loopback import ip
from tests.reply_shapes import load, recording_dir, shape_diff
from tests.servers import PORT_80, started_or_skip

pytestmark = pytest.mark.shared_data

ADDRESS = ip(160, 1)
COMMANDS = ("version", "summary", "stats", "devs", "pools")


@pytest.fixture
async def fleet() -> AsyncIterator[AntminerFleet]:
    # One S19j Pro: the recording is an S19 Pro, the same generation and 3-board layout.
    f = AntminerFleet(antminer_specs(1, ADDRESS, ["s19jpro"]), clock=ManualClock())
    async with started_or_skip(f, PORT_80):
        yield f


async def rpc(command: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(ADDRESS, 4028)
    writer.write(json.dumps({"command": command}).encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert raw.endswith(b"\x00"), "CGMiner ends every reply with a NUL"
    doc = json.loads(raw[:-1])
    assert isinstance(doc, dict)
    return doc


def _status(doc: dict[str, Any]) -> dict[str, Any]:
    row = doc["STATUS"][0]
    return {k: row[k] for k in ("STATUS", "Code", "Msg", "Description")}


@pytest.mark.parametrize("command", COMMANDS)
async def test_rpc_reply_has_the_recorded_names_types_and_status(
    fleet: AntminerFleet, command: str
) -> None:
    recorded = load(recording_dir("antminer", "v2020"), command)
    simulated = await rpc(command)
    assert shape_diff(recorded, simulated) == []
    assert _status(simulated) == _status(recorded)


async def test_web_system_info_has_the_recorded_names_and_types(fleet: AntminerFleet) -> None:
    recorded = load(recording_dir("antminer", "v2020"), "system_info")
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(
            f"http://{ADDRESS}/cgi-bin/get_system_info.cgi",
            auth=httpx.DigestAuth("root", "root"),
        )
    assert reply.status_code == 200
    assert shape_diff(recorded, reply.json()) == []


async def test_rates_are_gh_per_second_and_boards_sum_to_the_total(fleet: AntminerFleet) -> None:
    recorded = load(recording_dir("antminer", "v2020"), "stats")["STATS"][1]
    simulated = (await rpc("stats"))["STATS"][1]
    for row in (recorded, simulated):
        assert row["rate_unit"] == "GH"
        boards = sum(float(row[f"chain_rate{b}"]) for b in (1, 2, 3))
        assert row["chain_rate4"] == ""  # the empty fourth slot is an empty string
        # Boards sum to the total within a few percent (the recording's are 5 s samples).
        assert boards == pytest.approx(row["GHS 5s"], rel=0.05)
        assert 50 <= row["GHS 5s"] / 1000 <= 500  # TH/s of an S19-class machine
        assert row["total_rateideal"] / 1000 == pytest.approx(row["GHS 5s"] / 1000, rel=0.1)


def _sensors(row: dict[str, Any], kind: str, board: int) -> list[int]:
    return [int(x) for x in row[f"temp_{kind}{board}"].split("-")]


async def test_temperatures_follow_the_recorded_sensor_pattern(fleet: AntminerFleet) -> None:
    recorded = load(recording_dir("antminer", "v2020"), "stats")["STATS"][1]
    simulated = (await rpc("stats"))["STATS"][1]
    means = []
    for row in (recorded, simulated):
        pcbs = []
        for b in (1, 2, 3):
            pcb, chip, pic = (_sensors(row, k, b) for k in ("pcb", "chip", "pic"))
            assert [c - p for c, p in zip(chip, pcb, strict=True)] == [5, 5, 5, 5]
            assert [p - q for p, q in zip(pcb, pic, strict=True)] == [10, 10, 10, 10]
            assert min(pcb) < max(pcb) - 10  # inlet side well below outlet side
            assert row[f"temp{b}"] == max(pcb)
            pcbs.extend(pcb)
        assert _sensors(row, "pcb", 4) == [0, 0, 0, 0]
        means.append(sum(pcbs) / len(pcbs))
    # At about the same power (3.1 kW vs the recording's S19 Pro at ~3.25 kW) the mean PCB
    # temperature is within a few degrees of the real one, not 20-35 °C hotter.
    assert means[1] == pytest.approx(means[0], abs=6.0)


async def test_multicommand_and_refused_commands_have_cgminer_shapes(
    fleet: AntminerFleet,
) -> None:
    multi = await rpc("version+summary")
    assert set(multi) == {"version", "summary", "id"}
    version = load(recording_dir("antminer", "v2020"), "version")
    assert shape_diff(version, multi["version"][0]) == []
    refused = await rpc("devdetails")
    assert refused["STATUS"][0]["STATUS"] == "E"
    assert (refused["STATUS"][0]["Code"], refused["STATUS"][0]["Msg"]) == (14, "Invalid command")


def test_shape_diff_reports_names_types_and_missing_rows() -> None:
    recorded = {"STATS": [{"chain_rate1": "1.00", "fan1": 6000, "temp": 1.0}], "id": 1}
    simulated = {"STATS": [{"chain_rate1": 1.0, "fan1": 6000, "fan9": 1}], "id": 1}
    assert shape_diff(recorded, simulated) == [
        "$.STATS[0].chain_rate1: type float, recorded str",
        "$.STATS[0].fan9: extra",
        "$.STATS[0].temp: missing",
    ]
    assert shape_diff({"POOLS": [{"a": 1}]}, {"POOLS": []}) == ["$.POOLS: empty, recorded has rows"]
    assert shape_diff({"x": True}, {"x": 1}) == ["$.x: type int, recorded bool"]
