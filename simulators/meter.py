"""A simulated revenue meter: a pymodbus Modbus TCP server on loopback speaking SunSpec.

It measures what a meter at the point of interconnection would: the devices' true power (from
a callable in-process, from simulators' JSON control ports ``{"op": "states"}``, or a value set
over its own control port), plus cooling that rises with that load and with the ambient
temperature, plus a base load (transformers, lighting, offices), plus noise. The ambient
follows a daily curve (a hot afternoon) unless pinned, and is served too, as SunSpec model 307.

Register image (holding registers, see ``drivers/meters/maps.py`` for the SunSpec layout):
``40000`` "SunS"; ``40002`` model 1 (common, L 66, DA = the unit ID); ``40070`` model 203
(wye three-phase meter, L 105); ``40177`` model 307 (base met, L 11); ``40190`` end (0xFFFF).
Registers are recomputed on every request, so every read sees the site as it is now.

Faults, set at run time: ``silent`` (requests are read, never answered), ``garbage`` (the
meter body is random words with nonsense scale factors), ``wrong_unit`` (answers carry
another unit ID), ``frozen`` (the registers stop changing: a hung meter CPU), ``none``.
``override`` pins one point's raw register (a NaN-like sentinel, a wild scale factor).

This module imports neither ``agent`` nor ``drivers``: the driver meets it only over TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.luxos import control_request

BASE = 40000
COMMON_AT = BASE + 2
METER_AT = COMMON_AT + 2 + 66  # 40070
MET_AT = METER_AT + 2 + 105  # 40177
END_AT = MET_AT + 2 + 11  # 40190
IMAGE_LEN = END_AT + 2 - BASE
NOT_IMPLEMENTED = 0x8000

# Body offsets of model 203 (see drivers/meters/maps.py); absolute = METER_AT + 2 + offset.
M203 = {
    "A": 0, "AphA": 1, "AphB": 2, "AphC": 3, "A_SF": 4,
    "PhV": 5, "PhVphA": 6, "PhVphB": 7, "PhVphC": 8,
    "PPV": 9, "PhVphAB": 10, "PhVphBC": 11, "PhVphCA": 12, "V_SF": 13,
    "Hz": 14, "Hz_SF": 15,
    "W": 16, "WphA": 17, "WphB": 18, "WphC": 19, "W_SF": 20,
    "VA": 21, "VAphA": 22, "VAphB": 23, "VAphC": 24, "VA_SF": 25,
    "VAR": 26, "VARphA": 27, "VARphB": 28, "VARphC": 29, "VAR_SF": 30,
    "PF": 31, "PFphA": 32, "PFphB": 33, "PFphC": 34, "PF_SF": 35,
    "TotWhImp": 44, "TotWh_SF": 52,
}  # fmt: skip
POINTS: dict[str, int] = {name: METER_AT + 2 + off for name, off in M203.items()}
POINTS["TmpAmb"] = MET_AT + 2
POINTS["DA"] = COMMON_AT + 2 + 64


class MeterFault(StrEnum):
    NONE = "none"
    SILENT = "silent"
    GARBAGE = "garbage"
    WRONG_UNIT = "wrong_unit"
    FROZEN = "frozen"


@dataclass(frozen=True, slots=True)
class AmbientCurve:
    """Outdoor temperature over a day: a cosine peaking mid-afternoon (local solar time)."""

    mean_c: float = 27.0
    swing_c: float = 8.0  # half the day's range
    peak_hour: float = 15.5
    utc_offset_h: float = -6.0  # US Central: ERCOT

    def at(self, epoch_s: float) -> float:
        hour = ((epoch_s / 3600.0) + self.utc_offset_h) % 24.0
        return self.mean_c + self.swing_c * math.cos(2 * math.pi * (hour - self.peak_hour) / 24)


@dataclass(frozen=True, slots=True)
class SitePhysics:
    """What the meter sees beyond the devices: cooling, base load, noise.

    Cooling draws ``cooling_frac`` of the IT load at ``reference_c`` and ``per_degree_frac``
    more per °C above it (fans and chillers work harder on a hot afternoon), never less than
    ``min_cooling_frac``. At 30 °C with the defaults it is 6 % of the IT load.
    """

    cooling_frac: float = 0.04
    per_degree_frac: float = 0.004
    reference_c: float = 25.0
    min_cooling_frac: float = 0.02
    base_w: float = 0.0
    noise_frac: float = 0.001  # standard deviation of the noise, as a fraction of the total
    power_factor: float = 0.97

    def cooling_w(self, it_w: float, ambient_c: float) -> float:
        frac = self.cooling_frac + self.per_degree_frac * (ambient_c - self.reference_c)
        return max(0.0, it_w) * max(self.min_cooling_frac, frac)


def _u16(value: int) -> int:
    return value & 0xFFFF


def _scale_for(max_abs: float, floor: int = -3) -> int:
    """The smallest SunSpec scale factor that fits ``max_abs`` in an int16."""
    if max_abs <= 0:
        return floor
    return max(floor, math.ceil(math.log10(max_abs / 32767.0)))


def _scaled(value: float, sf: int) -> int:
    raw = round(value / 10.0**sf)
    return _u16(max(-32767, min(32767, raw)))


def _string(text: str, registers: int) -> list[int]:
    data = text.encode("ascii")[: registers * 2].ljust(registers * 2, b"\0")
    return [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]


class MeterSimulator:
    """One simulated SunSpec meter on ``host:port`` answering for ``unit_id``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        *,
        physics: SitePhysics | None = None,
        ambient: AmbientCurve | None = None,
        device_power: Callable[[], float] | None = None,
        control_ports: Sequence[int] = (),
        max_site_w: float = 300_000.0,
        nominal_v_ln: float = 277.0,
        frequency_hz: float = 60.0,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        self.host = host
        self._port = port
        self.unit_id = unit_id
        self.physics = physics or SitePhysics()
        self.ambient = ambient or AmbientCurve()
        self._device_power = device_power
        self._control_ports = tuple(control_ports)
        self._polled_w: float | None = None
        self.device_w_set: float = 0.0
        self.ambient_pinned_c: float | None = None
        self._clock = clock
        self._rng = random.Random(seed)
        self.fault = MeterFault.NONE
        self.overrides: dict[str, int] = {}
        self._w_sf = _scale_for(max_site_w * 1.2)
        self._v_sf = _scale_for(nominal_v_ln * 3.0)  # line-to-line fits too
        self._a_sf = _scale_for(max_site_w * 1.2 / (3 * nominal_v_ln * 0.5))
        self._nominal_v = nominal_v_ln
        self._frequency_hz = frequency_hz
        self._energy_wh = 1_000_000.0
        self._energy_at = clock()
        self._image = [0] * IMAGE_LEN
        self._last_truth: dict[str, float] = {}
        self._server: ModbusTcpServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self.requests = 0
        self._write_static()
        self._refresh()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        device = SimDevice(
            id=self.unit_id,
            simdata=[SimData(address=BASE, values=list(self._image), datatype=DataType.REGISTERS)],
            action=self._action,
        )
        server = ModbusTcpServer(
            device, address=(self.host, self._port), trace_packet=self._trace_packet
        )
        await server.serve_forever(background=True)
        self._server = server
        transport = server.transport
        sockets = getattr(transport, "sockets", None)
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        if self._control_ports:
            self._poller = asyncio.get_running_loop().create_task(self._poll_sources())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> MeterSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- run-time controls ---------------------------------------------------------------

    def set_fault(self, fault: MeterFault | str) -> None:
        self.fault = MeterFault(fault)

    def override(self, point: str, raw: int) -> None:
        if point not in POINTS:
            raise KeyError(f"unknown point {point!r}; known: {', '.join(sorted(POINTS))}")
        if not 0 <= raw <= 0xFFFF:
            raise ValueError(f"raw register value {raw} outside 0..65535")
        self.overrides[point] = raw

    def clear(self) -> None:
        """No fault, no overrides."""
        self.fault = MeterFault.NONE
        self.overrides.clear()

    def ambient_c(self) -> float:
        if self.ambient_pinned_c is not None:
            return self.ambient_pinned_c
        return self.ambient.at(self._clock())

    def device_w(self) -> float:
        if self._device_power is not None:
            return float(self._device_power())
        if self._polled_w is not None:
            return self._polled_w
        return self.device_w_set

    def truth(self) -> dict[str, object]:
        """The true site as last served (what a perfect meter would read), plus fault state."""
        self._refresh_if_live()
        return {**self._last_truth, "fault": self.fault.value, "overrides": dict(self.overrides)}

    # --- physics into registers ----------------------------------------------------------

    def _write_static(self) -> None:
        img = self._image
        img[0:2] = [0x5375, 0x6E53]
        c = COMMON_AT - BASE
        img[c : c + 2] = [1, 66]
        img[c + 2 : c + 18] = _string("site-agent", 16)
        img[c + 18 : c + 34] = _string("simulated SunSpec 203 meter", 16)
        img[c + 34 : c + 42] = _string("", 8)
        img[c + 42 : c + 50] = _string("1.0", 8)
        img[c + 50 : c + 66] = _string(f"SIM-{self.unit_id:05d}", 16)
        img[c + 66] = self.unit_id  # DA
        m = METER_AT - BASE
        img[m : m + 2] = [203, 105]
        for i in range(m + 2, m + 2 + 105):
            img[i] = NOT_IMPLEMENTED
        t = MET_AT - BASE
        img[t : t + 2] = [307, 11]
        for i in range(t + 2, t + 2 + 11):
            img[i] = NOT_IMPLEMENTED
        e = END_AT - BASE
        img[e : e + 2] = [0xFFFF, 0]

    def _refresh_if_live(self) -> None:
        if self.fault is not MeterFault.FROZEN:
            self._refresh()

    def _refresh(self) -> None:
        now = self._clock()
        ambient = self.ambient_c()
        it_w = max(0.0, self.device_w())
        cooling_w = self.physics.cooling_w(it_w, ambient)
        true_w = it_w + cooling_w + self.physics.base_w
        site_w = true_w + self._rng.gauss(0.0, self.physics.noise_frac * true_w + 1.0)
        dt = max(0.0, now - self._energy_at)
        self._energy_at = now
        self._energy_wh = (self._energy_wh + max(0.0, site_w) * dt / 3600.0) % 2**32
        self._last_truth = {
            "device_w": it_w,
            "cooling_w": cooling_w,
            "base_w": self.physics.base_w,
            "true_w": true_w,
            "site_w": site_w,
            "ambient_c": ambient,
        }
        pf = self.physics.power_factor
        shares = [1 / 3 + self._rng.uniform(-0.005, 0.005) for _ in range(2)]
        phase_w = [site_w * shares[0], site_w * shares[1]]
        phase_w.append(site_w - sum(phase_w))
        volts = [self._nominal_v * (1 + self._rng.uniform(-0.003, 0.003)) for _ in range(3)]
        amps = [abs(w) / (v * pf) for w, v in zip(phase_w, volts, strict=True)]
        va = abs(site_w) / pf
        var = math.sqrt(max(0.0, va * va - site_w * site_w))
        p = M203
        body = [NOT_IMPLEMENTED] * 105
        body[p["A_SF"]] = _u16(self._a_sf)
        body[p["A"]] = _scaled(sum(amps), self._a_sf)
        for i, ph in enumerate("ABC"):
            body[p[f"Aph{ph}"]] = _scaled(amps[i], self._a_sf)
            body[p[f"PhVph{ph}"]] = _scaled(volts[i], self._v_sf)
            body[p[f"Wph{ph}"]] = _scaled(phase_w[i], self._w_sf)
            body[p[f"VAph{ph}"]] = _scaled(abs(phase_w[i]) / pf, self._w_sf)
        body[p["V_SF"]] = _u16(self._v_sf)
        body[p["PhV"]] = _scaled(sum(volts) / 3, self._v_sf)
        body[p["PPV"]] = _scaled(sum(volts) / 3 * math.sqrt(3), self._v_sf)
        for name, (a, b) in {"PhVphAB": (0, 1), "PhVphBC": (1, 2), "PhVphCA": (2, 0)}.items():
            body[p[name]] = _scaled((volts[a] + volts[b]) / 2 * math.sqrt(3), self._v_sf)
        hz = self._frequency_hz + self._rng.uniform(-0.02, 0.02)
        body[p["Hz_SF"]] = _u16(-2)
        body[p["Hz"]] = _scaled(hz, -2)
        body[p["W_SF"]] = _u16(self._w_sf)
        body[p["W"]] = _scaled(site_w, self._w_sf)
        body[p["VA_SF"]] = _u16(self._w_sf)
        body[p["VA"]] = _scaled(va, self._w_sf)
        body[p["VAR_SF"]] = _u16(self._w_sf)
        body[p["VAR"]] = _scaled(var, self._w_sf)
        body[p["PF_SF"]] = _u16(-2)
        body[p["PF"]] = _scaled(pf * 100, -2)
        energy = int(self._energy_wh) or 1
        body[p["TotWhImp"]] = (energy >> 16) & 0xFFFF
        body[p["TotWhImp"] + 1] = energy & 0xFFFF
        body[p["TotWh_SF"]] = 0
        for off in (36, 37):  # TotWhExp: nothing exported, counted (acc32 0 = not accumulated)
            body[off] = 0
        m = METER_AT + 2 - BASE
        self._image[m : m + 105] = body
        self._image[MET_AT + 2 - BASE] = _scaled(ambient, -1)

    def _garbage(self) -> None:
        m = METER_AT + 2 - BASE
        for i in range(53):
            self._image[m + i] = self._rng.randrange(0x10000)
        # Scale factors far outside -10..10, as a corrupted register file would give.
        self._image[POINTS["W_SF"] - BASE] = _u16(self._rng.choice([-30000, -11, 11, 32767]))

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        self.requests += 1
        if self.fault is MeterFault.FROZEN:
            pass  # keep the image exactly as it was: the meter's CPU is hung
        elif self.fault is MeterFault.GARBAGE:
            self._refresh()
            self._garbage()
        else:
            self._refresh()
        image = list(self._image)
        for point, raw in self.overrides.items():
            image[POINTS[point] - BASE] = raw
        offset = BASE - start_address
        registers[offset : offset + IMAGE_LEN] = image
        return None

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        if self.fault is MeterFault.SILENT:
            return b""  # the request was read; the answer never leaves
        if self.fault is MeterFault.WRONG_UNIT and len(data) > 6:
            return data[:6] + bytes([(self.unit_id % 247) + 1]) + data[7:]
        return data

    async def _poll_sources(self) -> None:
        while True:
            total = 0.0
            ok = True
            for port in self._control_ports:
                try:
                    reply = await asyncio.wait_for(
                        control_request(port, {"op": "states"}, host="127.0.0.1"), 2.0
                    )
                    states = reply.get("states")
                    if not isinstance(states, list):
                        ok = False
                        continue
                    total += sum(float(s.get("power_w", 0.0)) for s in states)
                except (OSError, TimeoutError, ValueError):
                    ok = False
            if ok:
                self._polled_w = total
            await asyncio.sleep(0.5)


# --- control endpoint --------------------------------------------------------------------


def control(sim: MeterSimulator, request: object) -> dict[str, object]:
    """Apply one control request (a decoded JSON object) and return the answer."""
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    try:
        if op == "state":
            return {"ok": True, "state": sim.truth()}
        if op == "set":
            for key in ("device_w", "ambient_c", "base_w"):
                if key in request and request[key] is not None:
                    value = float(request[key])
                    if not math.isfinite(value):
                        return {"ok": False, "error": f"{key} must be finite"}
            if request.get("device_w") is not None:
                sim.device_w_set = float(request["device_w"])
            if "ambient_c" in request:
                a = request["ambient_c"]
                sim.ambient_pinned_c = None if a is None else float(a)
            if request.get("base_w") is not None:
                sim.physics = dataclasses.replace(sim.physics, base_w=float(request["base_w"]))
            return {"ok": True}
        if op == "fault":
            sim.set_fault(str(request.get("fault")))
            return {"ok": True}
        if op == "override":
            sim.override(str(request.get("point")), int(str(request.get("raw"))))
            return {"ok": True}
        if op == "clear":
            sim.clear()
            return {"ok": True}
    except (KeyError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown op {op!r}; known: state, set, fault, override, clear"}


async def serve_control(sim: MeterSimulator, port: int, host: str = "127.0.0.1") -> asyncio.Server:
    """Serve the JSON-lines control endpoint for ``sim``."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = control(sim, json.loads(line))
                except ValueError as exc:
                    reply = {"ok": False, "error": f"not JSON: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, host=host, port=port, limit=1 << 16)


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simulators.meter", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1502)
    p.add_argument("--unit-id", type=int, default=1)
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--max-site-w", type=float, default=30e6)
    p.add_argument(
        "--source", type=int, action="append", default=[], help="a simulator control port"
    )
    p.add_argument("--device-w", type=float, default=0.0)
    return p


async def run_cli(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.host.startswith("127."):
        print(f"refusing to serve on {args.host}: loopback only", file=sys.stderr)
        return 2
    sim = MeterSimulator(
        args.host,
        args.port,
        args.unit_id,
        control_ports=args.source,
        max_site_w=args.max_site_w,
    )
    sim.device_w_set = args.device_w
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        ctl = await serve_control(sim, args.control_port)
        port = ctl.sockets[0].getsockname()[1]
        print(json.dumps({"event": "ready", "port": sim.port, "control_port": port}), flush=True)
        try:
            await stop.wait()
        finally:
            ctl.close()
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(run_cli()))


if __name__ == "__main__":
    main()
