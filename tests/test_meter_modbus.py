"""The Modbus TCP meter driver against the pymodbus meter simulator, over real sockets.

Every fault the simulator can inject becomes one clear exception from ``drivers/errors.py``
and never a reading; a healthy meter reads the devices plus cooling, base load and noise.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from drivers.errors import (
    BadReply,
    DeviceTimeout,
    DeviceUnavailable,
    StaleReading,
    WrongUnit,
)
from drivers.meters.base import Meter
from drivers.meters.maps import MeterLimits, decode_sunspec, make_map
from drivers.meters.modbus import ModbusMeter, ModbusMeterSettings
from simulators.meter import MeterSimulator, SitePhysics, control, serve_control

DEVICE_W = 120_000.0


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sim() -> AsyncIterator[MeterSimulator]:
    meter = MeterSimulator("127.0.0.1", 0, unit_id=3, device_power=lambda: DEVICE_W)
    meter.ambient_pinned_c = 30.0
    async with meter:
        yield meter


def make_meter(sim: MeterSimulator, **kw: object) -> ModbusMeter:
    settings = ModbusMeterSettings(host="127.0.0.1", port=sim.port, unit_id=3, timeout_s=1.0)
    return ModbusMeter(settings.model_copy(update=kw)) if kw else ModbusMeter(settings)


async def test_healthy_meter_reads_devices_plus_cooling(sim: MeterSimulator) -> None:
    meter = make_meter(sim)
    assert isinstance(meter, Meter)
    try:
        r = await meter.read()
    finally:
        await meter.close()
    # 30 °C: cooling is 4 % + 5 × 0.4 % = 6 % of the IT load; noise 0.1 %, resolution 100 W.
    assert r.site_w == pytest.approx(DEVICE_W * 1.06, rel=0.005)
    assert r.unit_id == 3
    assert r.map_name == "sunspec"
    assert r.phase_w is not None
    assert sum(r.phase_w) == pytest.approx(r.site_w, abs=300)  # 3 phases × 100 W resolution
    assert r.voltage_v == pytest.approx(277, rel=0.01)
    assert r.frequency_hz == pytest.approx(60, abs=0.05)
    assert r.ambient_c == pytest.approx(30.0)
    assert r.energy_imported_wh is not None
    assert r.energy_imported_wh >= 1_000_000
    assert r.at.tzinfo is not None


async def test_meter_follows_load_and_ambient(sim: MeterSimulator) -> None:
    meter = make_meter(sim)
    try:
        cool = (await meter.read()).site_w
        sim.ambient_pinned_c = 40.0  # a hot afternoon: 4 % + 15 × 0.4 % = 10 %
        hot = await meter.read()
    finally:
        await meter.close()
    assert cool == pytest.approx(DEVICE_W * 1.06, rel=0.005)
    assert hot.site_w == pytest.approx(DEVICE_W * 1.10, rel=0.005)
    assert hot.ambient_c == pytest.approx(40.0)


async def test_silent_meter_times_out_within_the_deadline(sim: MeterSimulator) -> None:
    meter = make_meter(sim, timeout_s=0.5)
    try:
        await meter.read()
        sim.set_fault("silent")
        start = time.monotonic()
        with pytest.raises(DeviceTimeout, match=r"no answer within 0\.5 s"):
            await meter.read()
        assert time.monotonic() - start < 1.5
        sim.clear()
        assert (await meter.read()).site_w > 0  # recovers on the next poll
    finally:
        await meter.close()


async def test_garbage_registers_are_refused(sim: MeterSimulator) -> None:
    meter = make_meter(sim)
    sim.set_fault("garbage")
    try:
        for _ in range(5):
            with pytest.raises(BadReply, match="scale factor W_SF"):
                await meter.read()
    finally:
        await meter.close()


async def test_an_answer_from_another_unit_is_refused(sim: MeterSimulator) -> None:
    meter = make_meter(sim, timeout_s=0.5)
    sim.set_fault("wrong_unit")
    try:
        with pytest.raises(WrongUnit, match="answer came from unit 4, we asked unit 3"):
            await meter.read()
    finally:
        await meter.close()


async def test_sunspec_device_address_not_ours_is_refused(sim: MeterSimulator) -> None:
    sim.override("DA", 9)  # a gateway routing us to another meter
    meter = make_meter(sim)
    try:
        with pytest.raises(WrongUnit, match="device address 9, we asked unit 3"):
            await meter.read()
    finally:
        await meter.close()


async def test_asking_a_unit_the_meter_does_not_serve_is_an_error(sim: MeterSimulator) -> None:
    meter = make_meter(sim, unit_id=7)
    try:
        with pytest.raises(BadReply, match="Modbus exception"):
            await meter.read()
    finally:
        await meter.close()


async def test_frozen_registers_become_stale() -> None:
    mono = FakeMonotonic()
    async with MeterSimulator("127.0.0.1", 0, unit_id=3, device_power=lambda: DEVICE_W) as sim:
        settings = ModbusMeterSettings(host="127.0.0.1", port=sim.port, unit_id=3, stale_after_s=10)
        meter = ModbusMeter(settings, monotonic=mono)
        try:
            first = await meter.read()
            sim.set_fault("frozen")
            frozen = await meter.read()  # the first frozen answer is still a new one
            mono.now += 5
            assert (await meter.read()).site_w == frozen.site_w  # unchanged, not yet stale
            mono.now += 6
            with pytest.raises(StaleReading, match=r"unchanged for 11 s \(> 10 s\): frozen"):
                await meter.read()
            sim.clear()
            mono.now += 1
            assert (await meter.read()).site_w == pytest.approx(first.site_w, rel=0.01)
        finally:
            await meter.close()


@pytest.mark.parametrize(
    ("point", "raw", "message"),
    [
        ("W", 0x8000, "W not implemented"),
        ("W_SF", 0x8000, "W_SF not implemented"),
        ("W_SF", 11, "scale factor W_SF=11 outside -10..10"),
        ("W_SF", 8, "beyond the plausible"),  # 12,000 × 10^8 W: not a site
        ("WphA", 20000, "phases sum to"),
        ("Hz", 9000, r"Hz=90 outside the plausible 40\.\.70"),
        ("PhV", 0xFFF6, r"PhV=-1 V outside the plausible 50\.\.500000 V"),
        ("TmpAmb", 1500, "TmpAmb=150 °C outside"),
    ],
)
async def test_implausible_points_are_refused(
    sim: MeterSimulator, point: str, raw: int, message: str
) -> None:
    meter = make_meter(sim)
    try:
        await meter.read()
        sim.override(point, raw)
        with pytest.raises(BadReply, match=message):
            await meter.read()
    finally:
        await meter.close()


async def test_optional_points_not_implemented_are_absent_not_errors(sim: MeterSimulator) -> None:
    for point in ("Hz", "PhV", "WphB", "TmpAmb"):
        sim.override(point, 0x8000)
    meter = make_meter(sim)
    try:
        r = await meter.read()
    finally:
        await meter.close()
    assert r.frequency_hz is None
    assert r.voltage_v is None
    assert r.phase_w is None
    assert r.ambient_c is None
    assert r.site_w == pytest.approx(DEVICE_W * 1.06, rel=0.005)


async def test_refused_connection_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        meter = ModbusMeter(ModbusMeterSettings(host="127.0.0.1", port=port, timeout_s=1.0))
        try:
            with pytest.raises((DeviceUnavailable, DeviceTimeout)):
                await meter.read()
        finally:
            await meter.close()


async def test_not_a_sunspec_device(sim: MeterSimulator) -> None:
    meter = ModbusMeter(ModbusMeterSettings(host="127.0.0.1", port=sim.port, unit_id=3))
    meter._map = make_map("sunspec", MeterLimits())
    meter._map._base = 40010  # type: ignore[attr-defined]  # no marker there
    try:
        with pytest.raises(BadReply, match="no SunSpec marker 'SunS' at register 40010"):
            await meter.read()
    finally:
        await meter.close()


def test_settings_and_maps_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown meter map 'dlms'; known: sunspec"):
        make_map("dlms", MeterLimits())
    with pytest.raises(ValidationError):
        ModbusMeterSettings(host="127.0.0.1", port=70000)
    with pytest.raises(ValidationError):
        ModbusMeterSettings(host="127.0.0.1", timeout_s=0)
    with pytest.raises(ValidationError):
        ModbusMeterSettings(host="127.0.0.1", colour="red")  # type: ignore[call-arg]


def test_decode_rejects_a_short_body_and_reads_acc32_zero_as_absent() -> None:
    with pytest.raises(BadReply, match="53"):
        decode_sunspec([0] * 10, None, MeterLimits(), "m")
    body = [0x8000] * 53
    body[16], body[20] = 1234, 1  # W = 12,340 W
    body[44], body[45], body[52] = 0, 0, 0  # TotWhImp = 0: not accumulated
    values = decode_sunspec(body, None, MeterLimits(), "m")
    assert values.site_w == 12_340.0
    assert values.energy_imported_wh is None
    body[16] = 0xFFFF  # int16 -1 → -10 W (export) is a legitimate reading
    assert decode_sunspec(body, None, MeterLimits(), "m").site_w == -10.0


async def test_control_port_drives_the_simulator() -> None:
    meter_sim = MeterSimulator("127.0.0.1", 0, unit_id=1, physics=SitePhysics(base_w=5000.0))
    async with meter_sim:
        assert control(meter_sim, {"op": "set", "device_w": 50_000, "ambient_c": 25})["ok"]
        server = await serve_control(meter_sim, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b'{"op": "state"}\n{"op": "set", "device_w": "nan"}\nnot json\n')
            await writer.drain()
            state = await reader.readline()
            nan = await reader.readline()
            bad = await reader.readline()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
        assert b'"device_w": 50000.0' in state
        assert b"must be finite" in nan
        assert b"not JSON" in bad
        meter = ModbusMeter(ModbusMeterSettings(host="127.0.0.1", port=meter_sim.port))
        try:
            r = await meter.read()
        finally:
            await meter.close()
        # 25 °C: cooling 4 % of 50 kW = 2 kW, plus 5 kW base load.
        assert r.site_w == pytest.approx(57_000, rel=0.005)
        assert control(meter_sim, {"op": "fault", "fault": "melted"})["ok"] is False
        assert control(meter_sim, {"op": "override", "point": "nope", "raw": 1})["ok"] is False
