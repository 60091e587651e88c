"""Config of a Modbus TCP meter: plain pydantic, so loading a config never imports pymodbus."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from drivers.inputs import StrictSettings

METER_MAP_NAMES = ("sunspec",)  # keep in step with drivers.meters.maps.METER_MAPS (a test checks)


class ModbusMeterSettings(StrictSettings):
    """Where the meter is and how it is read (the agent's ``meter:`` block embeds these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    driver: Literal["modbus_tcp"] = "modbus_tcp"
    map: str = Field(default="sunspec", description=f"register map: {', '.join(METER_MAP_NAMES)}")
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=1, le=255)
    timeout_s: float = Field(default=2.0, gt=0, le=60, description="total deadline of one read")
    stale_after_s: float = Field(
        default=30.0, gt=0, le=3600, description="unchanged registers for longer are stale"
    )
    max_abs_site_w: float = Field(default=1.0e9, gt=0, le=1.0e10)

    @field_validator("map")
    @classmethod
    def _known_map(cls, value: str) -> str:
        if value not in METER_MAP_NAMES:
            raise ValueError(f"unknown meter map {value!r}; known: {', '.join(METER_MAP_NAMES)}")
        return value
