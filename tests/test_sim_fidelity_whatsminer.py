"""The Whatsminer simulator against btminer replies recorded from real miners (asic-rs v1, v2).

Over real sockets, each reply is diffed against the recording: key names, value types, STATUS
codes, messages and descriptions, and units (MH/s rates summing over boards, watts, °C with the
recorded chip-to-board pattern). ``summary`` and ``devs`` are diffed against the union of the
v1 and v2 recordings; the flat ``get_*``/``status`` replies against v2, the generation pyasic
0.79 drives on port 4028. Every difference allowed here is listed, with its reason, in
``simulators/whatsminer.py``'s docstring.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from simulators.luxos_model import ManualClock
from simulators.whatsminer import WhatsminerFleet, whatsminer_specs
from tests.loopback import ip
from tests.reply_shapes import load, merged, recording_dir, shape_diff

pytestmark = pytest.mark.shared_data

ADDRESS = ip(161, 1)


@pytest.fixture
async def fleet() -> AsyncIterator[WhatsminerFleet]:
    specs = whatsminer_specs(1, ADDRESS, ["m30s+v40"])
    async with WhatsminerFleet(specs, clock=ManualClock()) as f:
        yield f


async def rpc(command: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(ADDRESS, 4028)
    writer.write(json.dumps({"command": command}).encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def _cg_status(doc: dict[str, Any]) -> dict[str, Any]:
    row = doc["STATUS"][0]
    return {k: row[k] for k in ("STATUS", "Code", "Msg", "Description")}


def _union(section: str, command: str) -> dict[str, Any]:
    """The v1 reply with each row widened by the keys of the v2 row at the same index."""
    v1 = load(recording_dir("whatsminer", "v1"), command)
    v2 = load(recording_dir("whatsminer", "v2"), command)
    rows = [
        merged(r1, v2[section][min(i, len(v2[section]) - 1)]) for i, r1 in enumerate(v1[section])
    ]
    return {**v1, section: rows}


@pytest.mark.parametrize(("command", "section"), [("summary", "SUMMARY"), ("devs", "DEVS")])
async def test_cgminer_style_reply_has_the_recorded_names_types_and_status(
    fleet: WhatsminerFleet, command: str, section: str
) -> None:
    recorded = _union(section, command)
    simulated = await rpc(command)
    assert shape_diff(recorded, simulated) == []
    assert _cg_status(simulated) == _cg_status(recorded)


async def test_pools_reply_has_the_recorded_names_types_and_status(
    fleet: WhatsminerFleet,
) -> None:
    recorded = load(recording_dir("whatsminer", "v1"), "pools")
    simulated = await rpc("pools")
    assert shape_diff(recorded, simulated) == []
    assert _cg_status(simulated) == _cg_status(recorded)
    assert [p["POOL"] for p in simulated["POOLS"]] == [1, 2, 3]  # numbered from 1, as recorded


# get_miner_info adds "minersn", which pyasic reads as the serial number.
ALLOWED = {"get_miner_info": ["$.Msg.minersn: extra"]}


@pytest.mark.parametrize(
    "command", ["get_version", "get_psu", "get_miner_info", "status", "get_error_code"]
)
async def test_flat_reply_has_the_recorded_names_types_and_status(
    fleet: WhatsminerFleet, command: str
) -> None:
    recorded = load(recording_dir("whatsminer", "v2"), command)
    simulated = await rpc(command)
    assert shape_diff(recorded, simulated) == ALLOWED.get(command, [])
    for key in ("STATUS", "Code", "Description"):
        assert simulated[key] == recorded[key], key


async def test_rates_power_and_temperatures_have_the_recorded_units(
    fleet: WhatsminerFleet,
) -> None:
    rec_summary = load(recording_dir("whatsminer", "v1"), "summary")["SUMMARY"][0]
    rec_devs = load(recording_dir("whatsminer", "v1"), "devs")["DEVS"]
    sim_summary = (await rpc("summary"))["SUMMARY"][0]
    sim_devs = (await rpc("devs"))["DEVS"]
    temps = []
    for summary, devs in ((rec_summary, rec_devs), (sim_summary, sim_devs)):
        # MH/s: an M30S+-class miner hashes 50-300 TH/s; boards sum to the total.
        assert 50 <= summary["MHS 1m"] / 1e6 <= 300
        assert sum(d["MHS 1m"] for d in devs) == pytest.approx(summary["MHS 1m"], rel=0.02)
        assert summary["Factory GHS"] / 1000 == pytest.approx(summary["MHS 1m"] / 1e6, rel=0.1)
        # Watts, drawn under the limit.
        assert 2500 <= summary["Power"] <= summary["Power Limit"] <= 4000
        for d in devs:
            assert 10 <= d["Chip Temp Avg"] - d["Temperature"] <= 16
            assert d["Chip Temp Min"] <= d["Chip Temp Avg"] <= d["Chip Temp Max"]
        temps.append(sum(d["Temperature"] for d in devs) / len(devs))
        assert summary["Firmware Version"].startswith("'")  # quoted, as the firmware sends it
    # About the same power (3.4 kW): board temperatures within a few degrees of the real ones.
    assert temps[1] == pytest.approx(temps[0], abs=6.0)


async def test_refused_and_token_replies_have_btminer_shapes(fleet: WhatsminerFleet) -> None:
    version = await rpc("version")
    assert {k: version[k] for k in ("STATUS", "Code", "Msg")} == {
        "STATUS": "E",
        "Code": 14,
        "Msg": "invalid cmd",
    }
    token = await rpc("get_token")
    assert (token["STATUS"], token["Code"]) == ("S", 134)
    assert sorted(token["Msg"]) == ["newsalt", "salt", "time"]
    assert len(token["Msg"]["time"]) == 4
    devdetails = await rpc("devdetails")
    assert devdetails["DEVDETAILS"][0]["Driver"] == "bitmicro"
    assert devdetails["DEVDETAILS"][0]["Model"] == "M30S+V40"
