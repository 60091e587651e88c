"""Meter register maps: how a meter's Modbus registers become watts, volts and hertz.

A map is a config choice (``meter.map``): :data:`METER_MAPS` holds a factory per name, and a
new meter family is one more entry. A map reads through a :class:`RegisterReader` (the Modbus
transport, which owns timeouts and unit-ID checks) and returns :class:`MeterValues` whose
every number is finite and within the physical bounds it was given; anything else is a
:class:`drivers.errors.BadReply` (or :class:`drivers.errors.WrongUnit`) naming the point.

``sunspec`` — the SunSpec Alliance information model, as published in the ``sunspec/models``
repository (``json/model_1.json``, ``model_203.json``, ``model_307.json``) and implemented by
most revenue and check meters with a Modbus TCP port (Fronius Smart Meter, Carlo Gavazzi EM24
and EM340 in SunSpec mode, Elkor, Accuenergy Acuvim, WattNode in SunSpec mode...):

* Holding registers (function 3), big-endian 16-bit words; 32-bit points high word first.
* At ``base_address`` (40000, also 0 or 50000 on some meters) the marker ``"SunS"``
  (0x5375 0x6E53), then a chain of models, each ``ID, L`` (model id, body length in
  registers) and its body; the chain ends with ``ID = 0xFFFF``.
* Model 1 (common, L = 66): Mn[16] Md[16] Opt[8] Vr[8] SN[16] DA Pad. ``DA`` (body offset 64)
  is the device's Modbus address; where implemented it must equal the unit ID we asked.
* Models 201/202/203/204 (single, split, wye and delta three-phase meter, integer + scale
  factor, L = 105) share one layout. Body offsets used here: ``A`` 0, ``AphA..C`` 1-3,
  ``A_SF`` 4, ``PhV`` 5, ``PhVphA..C`` 6-8, ``PPV`` 9, ``PhVphAB..CA`` 10-12, ``V_SF`` 13,
  ``Hz`` 14, ``Hz_SF`` 15, ``W`` 16, ``WphA..C`` 17-19, ``W_SF`` 20, then VA, VAR and PF with
  their factors (21-35), ``TotWhExp`` 36-37, per-phase exported 38-43, ``TotWhImp`` 44-45,
  per-phase imported 46-51, ``TotWh_SF`` 52. Point types: ``int16`` (0x8000 = not
  implemented), ``sunssf`` (int16 exponent, valid -10..10, 0x8000 = not implemented),
  ``acc32`` (unsigned, 0 = not accumulated). Value = raw × 10^SF. ``W`` is positive for
  import (the site draws power).
* Model 307 (base meteorological, L = 11): ``TmpAmb`` int16 at body offset 0, fixed scale
  factor -1 (0.1 °C). Optional: where the chain carries it, the reading has ``ambient_c``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from drivers.errors import BadReply, WrongUnit

SUNS_MARKER = (0x5375, 0x6E53)
END_MODEL_ID = 0xFFFF
COMMON_MODEL_ID = 1
COMMON_DA_OFFSET = 64
METER_MODEL_IDS = frozenset({201, 202, 203, 204})
METER_BODY_READ = 53  # A .. TotWh_SF: everything this driver uses
MET_MODEL_ID = 307
NOT_IMPLEMENTED_INT16 = 0x8000
NOT_IMPLEMENTED_UINT16 = 0xFFFF
MAX_MODELS = 32  # a chain longer than this is garbage, not a meter
MAX_CHAIN_REGISTERS = 4000


class RegisterReader(Protocol):
    """Reads holding registers of one unit; raises DeviceError subclasses (timeouts, refusals)."""

    async def read_holding(self, address: int, count: int) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class MeterLimits:
    """Physical bounds a meter's figures must fall in to be believed."""

    max_abs_site_w: float = 1.0e9
    voltage_v: tuple[float, float] = (50.0, 500_000.0)
    frequency_hz: tuple[float, float] = (40.0, 70.0)
    ambient_c: tuple[float, float] = (-60.0, 70.0)


@dataclass(frozen=True, slots=True)
class MeterValues:
    """What a map decoded, before the driver stamps it with time and identity."""

    site_w: float
    phase_w: tuple[float, float, float] | None
    voltage_v: float | None
    phase_voltage_v: tuple[float, float, float] | None
    frequency_hz: float | None
    energy_imported_wh: float | None
    ambient_c: float | None
    raw: tuple[int, ...]  # the registers behind these values (the driver's staleness check)


class MeterMap(Protocol):
    """One meter family's register layout."""

    @property
    def name(self) -> str: ...

    async def read(self, reader: RegisterReader, unit_id: int, device_id: str) -> MeterValues: ...

    def forget_layout(self) -> None:
        """Drop any discovered layout (after a reconnect the device may have changed)."""


# --- SunSpec ----------------------------------------------------------------------------


def int16(raw: int) -> int:
    return raw - 0x10000 if raw >= 0x8000 else raw


@dataclass(frozen=True, slots=True)
class _Layout:
    meter_address: int
    meter_id: int
    meter_length: int
    met_address: int | None


class SunSpecMeterMap:
    """SunSpec models 201-204 (+ optional 307) behind a ``SunS`` marker; see the module doc."""

    name = "sunspec"

    def __init__(self, limits: MeterLimits, base_address: int = 40000) -> None:
        if not 0 <= base_address <= 0xFFFF - 2:
            raise ValueError(f"SunSpec base address {base_address} outside 0..65533")
        self._limits = limits
        self._base = base_address
        self._layout: _Layout | None = None

    def forget_layout(self) -> None:
        self._layout = None

    async def _discover(self, reader: RegisterReader, unit_id: int, device_id: str) -> _Layout:
        marker = await reader.read_holding(self._base, 2)
        if tuple(marker) != SUNS_MARKER:
            raise BadReply(
                device_id,
                f"no SunSpec marker 'SunS' at register {self._base} (read {_hex(marker)})",
            )
        address = self._base + 2
        meter: tuple[int, int, int] | None = None
        met_address: int | None = None
        for _ in range(MAX_MODELS):
            model_id, length = await reader.read_holding(address, 2)
            if model_id == END_MODEL_ID:
                break
            if model_id == COMMON_MODEL_ID and length > COMMON_DA_OFFSET:
                (da,) = await reader.read_holding(address + 2 + COMMON_DA_OFFSET, 1)
                if da not in (NOT_IMPLEMENTED_UINT16, 0) and da != unit_id:
                    raise WrongUnit(
                        device_id,
                        f"SunSpec common model says device address {da}, we asked unit {unit_id}",
                    )
            elif model_id in METER_MODEL_IDS and meter is None:
                if length < METER_BODY_READ:
                    raise BadReply(
                        device_id, f"SunSpec meter model {model_id} is {length} registers long"
                    )
                meter = (address, model_id, length)
            elif model_id == MET_MODEL_ID and length >= 1 and met_address is None:
                met_address = address
            address += 2 + length
            if address - self._base > MAX_CHAIN_REGISTERS:
                break
        else:
            raise BadReply(device_id, f"SunSpec model chain longer than {MAX_MODELS} models")
        if meter is None:
            raise BadReply(device_id, "SunSpec chain has no meter model (201, 202, 203 or 204)")
        return _Layout(meter[0], meter[1], meter[2], met_address)

    async def read(self, reader: RegisterReader, unit_id: int, device_id: str) -> MeterValues:
        if self._layout is None:
            self._layout = await self._discover(reader, unit_id, device_id)
        layout = self._layout
        block = await reader.read_holding(layout.meter_address, 2 + METER_BODY_READ)
        if block[0] != layout.meter_id or block[1] != layout.meter_length:
            self._layout = None  # the device changed under us: rediscover next time
            raise BadReply(
                device_id,
                f"SunSpec meter model moved: register {layout.meter_address} holds "
                f"ID {block[0]} L {block[1]}, expected {layout.meter_id} L {layout.meter_length}",
            )
        met: list[int] | None = None
        if layout.met_address is not None:
            met = await reader.read_holding(layout.met_address, 3)
            if met[0] != MET_MODEL_ID:
                self._layout = None
                raise BadReply(device_id, f"SunSpec model 307 moved (found ID {met[0]})")
        return decode_sunspec(block[2:], None if met is None else met[2], self._limits, device_id)


def decode_sunspec(
    body: list[int], tmp_amb_raw: int | None, limits: MeterLimits, device_id: str
) -> MeterValues:
    """Decode a SunSpec 20x meter body (offsets 0..52) and model 307's TmpAmb; see module doc."""
    if len(body) < METER_BODY_READ:
        raise BadReply(device_id, f"SunSpec meter body has {len(body)} registers, need 53")
    if any(not 0 <= r <= 0xFFFF for r in body):
        raise BadReply(device_id, "register value outside 0..65535")

    def sf(offset: int, name: str, mandatory: bool) -> int | None:
        raw = body[offset]
        if raw == NOT_IMPLEMENTED_INT16:
            if mandatory:
                raise BadReply(device_id, f"SunSpec {name} not implemented (0x8000)")
            return None
        value = int16(raw)
        if not -10 <= value <= 10:
            raise BadReply(device_id, f"SunSpec scale factor {name}={value} outside -10..10")
        return value

    def point(offset: int, name: str, scale: int | None, mandatory: bool) -> float | None:
        raw = body[offset]
        if raw == NOT_IMPLEMENTED_INT16 or scale is None:
            if mandatory:
                raise BadReply(device_id, f"SunSpec {name} not implemented (0x8000)")
            return None
        value = int16(raw) * 10.0**scale
        if not math.isfinite(value):
            raise BadReply(device_id, f"SunSpec {name} is not finite ({raw} × 10^{scale})")
        return value

    def triple(
        first: int, names: tuple[str, str, str], scale: int | None
    ) -> tuple[float, float, float] | None:
        values = [point(first + i, names[i], scale, False) for i in range(3)]
        if any(v is None for v in values):
            return None
        a, b, c = (float(v) for v in values if v is not None)
        return (a, b, c)

    w_sf = sf(20, "W_SF", True)
    site_w = point(16, "W", w_sf, True)
    if site_w is None or w_sf is None:  # mandatory points raise first; this keeps mypy honest
        raise BadReply(device_id, "SunSpec W missing")
    if abs(site_w) > limits.max_abs_site_w:
        raise BadReply(
            device_id,
            f"SunSpec W={site_w:.0f} W is beyond the plausible ±{limits.max_abs_site_w:.0f} W",
        )
    phase_w = triple(17, ("WphA", "WphB", "WphC"), w_sf)
    if phase_w is not None:
        # Each phase is rounded to the factor's resolution; allow that plus 2 % of the total.
        tolerance_w = max(0.02 * abs(site_w), 4 * 10.0**w_sf)
        if abs(sum(phase_w) - site_w) > tolerance_w:
            raise BadReply(
                device_id,
                f"SunSpec phases sum to {sum(phase_w):.0f} W but W={site_w:.0f} W",
            )

    v_sf = sf(13, "V_SF", False)
    voltage_v = point(5, "PhV", v_sf, False)
    low_v, high_v = limits.voltage_v
    if voltage_v is not None and not low_v <= voltage_v <= high_v:
        raise BadReply(
            device_id, f"SunSpec PhV={voltage_v:g} V outside the plausible {low_v:g}..{high_v:g} V"
        )
    phase_voltage_v = triple(6, ("PhVphA", "PhVphB", "PhVphC"), v_sf)
    if phase_voltage_v is not None and not all(0.0 <= v <= high_v for v in phase_voltage_v):
        raise BadReply(device_id, f"SunSpec phase voltages {phase_voltage_v} out of range")

    hz_sf = sf(15, "Hz_SF", False)
    frequency_hz = point(14, "Hz", hz_sf, False)
    low_hz, high_hz = limits.frequency_hz
    if frequency_hz is not None and not low_hz <= frequency_hz <= high_hz:
        raise BadReply(
            device_id, f"SunSpec Hz={frequency_hz:g} outside the plausible {low_hz:g}..{high_hz:g}"
        )

    wh_sf = sf(52, "TotWh_SF", False)
    acc = (body[44] << 16) | body[45]
    energy_wh = None if acc == 0 or wh_sf is None else acc * 10.0**wh_sf

    ambient_c: float | None = None
    if tmp_amb_raw is not None and tmp_amb_raw != NOT_IMPLEMENTED_INT16:
        ambient_c = int16(tmp_amb_raw) / 10.0
        low_c, high_c = limits.ambient_c
        if not low_c <= ambient_c <= high_c:
            raise BadReply(
                device_id, f"SunSpec TmpAmb={ambient_c:g} °C outside {low_c:g}..{high_c:g} °C"
            )

    raw = (*body, -1 if tmp_amb_raw is None else tmp_amb_raw)
    return MeterValues(
        site_w=site_w,
        phase_w=phase_w,
        voltage_v=voltage_v,
        phase_voltage_v=phase_voltage_v,
        frequency_hz=frequency_hz,
        energy_imported_wh=energy_wh,
        ambient_c=ambient_c,
        raw=raw,
    )


def _hex(registers: list[int]) -> str:
    return " ".join(f"0x{r:04X}" for r in registers)


MapFactory = Callable[[MeterLimits], MeterMap]

#: Register maps by config name. Add a family by adding a factory here.
METER_MAPS: dict[str, MapFactory] = {
    "sunspec": lambda limits: SunSpecMeterMap(limits, 40000),
}


def make_map(name: str, limits: MeterLimits) -> MeterMap:
    """The map called ``name``; ValueError listing the known ones otherwise."""
    try:
        factory = METER_MAPS[name]
    except KeyError:
        known = ", ".join(sorted(METER_MAPS))
        raise ValueError(f"unknown meter map {name!r}; known: {known}") from None
    return factory(limits)
