"""The simulators' heat: miners and GPUs breathe a site ambient (a hot afternoon, hot spots), and
the meter simulator reads the miners' power from their control port, as it would out of process.
"""

from __future__ import annotations

import asyncio

import pytest

from drivers.meters.modbus import ModbusMeter, ModbusMeterSettings
from simulators.luxos import LuxosFleet, MinerSpec, serve_control
from simulators.luxos_model import ManualClock
from simulators.meter import MeterSimulator
from simulators.nvml import H100_SXM, SimNvml
from tests.loopback import ip

ADDRESSES = [ip(9, i) for i in (1, 2)]


def test_miner_boards_follow_the_afternoon_and_a_hot_spot() -> None:
    clock = ManualClock()
    air = {"c": 25.0}
    fleet = LuxosFleet(
        [MinerSpec(a, "s21") for a in ADDRESSES],
        clock=clock,
        ambient_c=lambda: air["c"],
        thermal_tau_s=10.0,
    )
    cool, spot = (fleet.miners[a] for a in ADDRESSES)
    morning = cool.chip_c()
    # LuxOS boards sit behind a fan loop (chip = board, as recorded): at 25 °C intake the fans
    # hold the S21's boards in the 50s, near LuxOS's default fan target.
    assert 40.0 < morning < 65.0
    assert spot.chip_c() == pytest.approx(morning)
    air["c"] = 40.0
    fleet.set_hot_spot(ADDRESSES[1], 5.0)
    clock.advance(100.0)  # ten time constants: settled
    afternoon = cool.chip_c()
    # A 15 °C hotter afternoon heats the boards; the fans take up part of it, never all.
    assert morning + 5.0 < afternoon < morning + 15.0
    # The hot spot's 5 °C hotter intake reaches its boards in full.
    assert spot.chip_c() == pytest.approx(afternoon + 5.0, abs=0.05)
    assert fleet.truth(ADDRESSES[1])["intake_c"] == 45.0
    with pytest.raises(ValueError, match="hot spot"):
        fleet.set_hot_spot(ADDRESSES[0], float("nan"))


def test_gpus_follow_the_afternoon() -> None:
    now = {"s": 0.0}
    air = {"c": 25.0}
    nvml = SimNvml([H100_SXM], clock=lambda: now["s"], ambient_c=lambda: air["c"])
    gpu = nvml.gpus[0]
    gpu.set_load(100)
    now["s"] += 300.0
    assert gpu.temperature_c == pytest.approx(25.0 + 45.0, abs=0.5)
    air["c"] = 40.0
    now["s"] += 300.0
    assert gpu.temperature_c == pytest.approx(40.0 + 45.0, abs=0.5)


async def test_meter_simulator_sums_the_miners_from_their_control_port() -> None:
    fleet = LuxosFleet([MinerSpec(a, "s19jpro") for a in ADDRESSES])
    async with fleet:
        control = await serve_control(fleet, 0)
        port = control.sockets[0].getsockname()[1]
        try:
            meter_sim = MeterSimulator("127.0.0.1", 0, 1, control_ports=[port])
            meter_sim.ambient_pinned_c = 25.0  # cooling 4 %
            async with meter_sim:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                while meter_sim.device_w() == 0.0:
                    assert loop.time() < deadline, "meter never saw the miners' power"
                    await asyncio.sleep(0.05)
                # What the miners draw, as their own control port reports it.
                drawn_w = sum(float(fleet.truth(a)["power_w"]) for a in ADDRESSES)
                assert drawn_w > 0
                assert meter_sim.device_w() == pytest.approx(drawn_w)
                meter = ModbusMeter(ModbusMeterSettings(host="127.0.0.1", port=meter_sim.port))
                try:
                    reading = await meter.read()
                finally:
                    await meter.close()
                assert reading.site_w == pytest.approx(drawn_w * 1.04, abs=120)
        finally:
            control.close()
            await control.wait_closed()
