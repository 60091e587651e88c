"""The site meter over Modbus TCP, through pymodbus's async client.

One :class:`ModbusMeter` reads one meter (host, port, unit ID) with a register map chosen by
name from :data:`drivers.meters.maps.METER_MAPS`. Every :meth:`ModbusMeter.read` has a total
deadline (``timeout_s``) over all the requests it makes, and turns everything that can go
wrong into one clear exception from :mod:`drivers.errors`, never a value acted on:

* no answer in time → :class:`DeviceTimeout`; refused or reset → :class:`DeviceUnavailable`;
* an answer from another unit ID (pymodbus drops such frames, so we watch the raw MBAP
  header) or a SunSpec device address that is not ours → :class:`WrongUnit`;
* a Modbus exception response, a short answer, a "not implemented" sentinel in a mandatory
  point, a scale factor outside -10..10, a value out of physical range → :class:`BadReply`;
* registers bit-for-bit unchanged for longer than ``stale_after_s`` (a live meter's
  readings always move a little, and its energy counter climbs) → :class:`StaleReading`.

After any failure the connection is dropped and the layout forgotten, so the next read starts
clean (a meter that rebooted may have moved its models).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.errors import (
    BadReply,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    StaleReading,
    WrongUnit,
)
from drivers.meters.base import MeterReading
from drivers.meters.maps import MeterLimits, make_map
from drivers.meters.settings import ModbusMeterSettings

MAX_REGISTERS_PER_READ = 125  # the Modbus limit for function 3
MBAP_UNIT_BYTE = 6


class ModbusMeter:
    """Reads one meter; see the module docstring for what each failure becomes."""

    def __init__(
        self,
        settings: ModbusMeterSettings,
        *,
        limits: MeterLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._s = settings
        limits = limits or MeterLimits(max_abs_site_w=settings.max_abs_site_w)
        self._map = make_map(settings.map, limits)
        self._clock = clock
        self._monotonic = monotonic
        self._client: AsyncModbusTcpClient | None = None
        self._foreign_unit: int | None = None
        self._last_raw: tuple[int, ...] | None = None
        self._raw_since = 0.0
        self.device_id = f"meter:{settings.host}:{settings.port}/{settings.unit_id}"

    @property
    def unit_id(self) -> int:
        return self._s.unit_id

    async def read(self) -> MeterReading:
        """One validated reading, within ``timeout_s`` in all."""
        self._foreign_unit = None
        try:
            async with asyncio.timeout(self._s.timeout_s):
                values = await self._map.read(self, self._s.unit_id, self.device_id)
        except TimeoutError as exc:
            await self._drop()
            raise self._silence_error() from exc
        except DeviceError:
            await self._drop()
            raise
        now = self._monotonic()
        if values.raw != self._last_raw:
            self._last_raw = values.raw
            self._raw_since = now
        elif now - self._raw_since > self._s.stale_after_s:
            raise StaleReading(
                self.device_id,
                f"registers unchanged for {now - self._raw_since:.0f} s "
                f"(> {self._s.stale_after_s:g} s): frozen meter",
            )
        return MeterReading(
            device_id=self.device_id,
            unit_id=self._s.unit_id,
            map_name=self._map.name,
            at=self._clock(),
            site_w=values.site_w,
            phase_w=values.phase_w,
            voltage_v=values.voltage_v,
            phase_voltage_v=values.phase_voltage_v,
            frequency_hz=values.frequency_hz,
            energy_imported_wh=values.energy_imported_wh,
            ambient_c=values.ambient_c,
        )

    async def read_holding(self, address: int, count: int) -> list[int]:
        """Function 3 on our unit; the :class:`RegisterReader` the maps read through."""
        if not 1 <= count <= MAX_REGISTERS_PER_READ or not 0 <= address <= 0xFFFF - count + 1:
            raise ValueError(f"cannot read {count} registers at {address}")
        client = await self._connect()
        try:
            reply = await client.read_holding_registers(
                address, count=count, device_id=self._s.unit_id
            )
        except ConnectionException as exc:
            raise DeviceUnavailable(self.device_id, f"connection lost: {exc}") from exc
        except ModbusIOException as exc:
            raise self._silence_error() from exc
        except ModbusException as exc:
            raise BadReply(self.device_id, f"Modbus error: {exc}") from exc
        if reply.isError():
            code = getattr(reply, "exception_code", None)
            raise BadReply(
                self.device_id,
                f"Modbus exception {code} reading {count} registers at {address}",
            )
        registers = list(reply.registers)
        if len(registers) != count:
            raise BadReply(
                self.device_id, f"asked {count} registers at {address}, got {len(registers)}"
            )
        return registers

    async def close(self) -> None:
        await self._drop()

    # --- internals -----------------------------------------------------------------------

    def _silence_error(self) -> DeviceError:
        if self._foreign_unit is not None:
            return WrongUnit(
                self.device_id,
                f"answer came from unit {self._foreign_unit}, we asked unit {self._s.unit_id}",
            )
        return DeviceTimeout(self.device_id, f"no answer within {self._s.timeout_s:g} s")

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # pymodbus silently skips a frame whose unit ID is not the one asked (the caller then
        # sees a timeout); record it so the error can say what really happened.
        if not sending and len(data) > MBAP_UNIT_BYTE and data[MBAP_UNIT_BYTE] != self._s.unit_id:
            self._foreign_unit = data[MBAP_UNIT_BYTE]
        return data

    async def _connect(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        await self._drop()
        client = AsyncModbusTcpClient(
            self._s.host,
            port=self._s.port,
            timeout=self._s.timeout_s,
            retries=0,
            # We reconnect on the next poll ourselves; no background reconnect task.
            reconnect_delay=0,
            trace_packet=self._trace_packet,
        )
        self._client = client
        try:
            connected = await client.connect()
        except (OSError, ModbusException) as exc:
            raise DeviceUnavailable(self.device_id, f"cannot connect: {exc}") from exc
        if not connected:
            raise DeviceUnavailable(
                self.device_id, f"cannot connect to {self._s.host}:{self._s.port}"
            )
        return client

    async def _drop(self) -> None:
        self._map.forget_layout()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def meter_from_settings(settings: ModbusMeterSettings) -> ModbusMeter:
    """The driver for ``settings`` (one place to add drivers other than Modbus TCP)."""
    return ModbusMeter(settings)


__all__ = ["ModbusMeter", "ModbusMeterSettings", "meter_from_settings"]
