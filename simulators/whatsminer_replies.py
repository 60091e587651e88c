"""Whatsminer models, physics and btminer API replies for one simulated miner.

A Whatsminer is a continuous power-limit machine: a power mode (``low``/``normal``/``high``)
sets its ceiling, ``adjust_power_limit`` caps it further, and the hashrate follows a curve of
(power, hashrate) points, interpolated linearly. Below the curve's first point the miner cannot
go: it draws the floor even if the limit is lower, as real machines do. Replies use the two
shapes of the btminer API v2: CGMiner-style (``summary``, ``devs``, ``pools``, ``devdetails``:
``{"STATUS": [...], "SECTION": [...], "id": 1}``) and flat (``get_version``, ``get_psu``,
``get_miner_info``, ``status``, ``get_token``: ``{"STATUS": "S", "Code": 131, "Msg": {...}}``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from simulators.luxos_model import MinerState, ModelSpec, ProfileSpec

CGMINER_DESCRIPTION = "cgminer 4.9.2"
FIRMWARE = "20230803.11.REL"  # before 2024.11: pyasic 0.79 speaks API v2 (port 4028) to it
API_VERSION = "2.0.5"
PLATFORM = "H616"
PSU_MODEL = "P222B"
PSU_VERSION = "230208.220429"

Row = dict[str, Any]

# Curve points are profiles; the names of the three power modes are profile names too.
M30S_PLUS_V40 = ModelSpec(
    key="m30s+v40",
    type_name="M30S+V40",
    chips_per_board=235,  # pyasic's expected_chips for this model
    profiles=(
        ProfileSpec("floor", 1700.0, 56.0, 400, 11.6),
        ProfileSpec("low", 2720.0, 85.0, 500, 12.4),
        ProfileSpec("normal", 3400.0, 100.0, 560, 13.0),
        ProfileSpec("high", 3740.0, 106.0, 600, 13.6),
    ),
    default_profile="normal",
    standby_w=22.0,
    nameplate_w=3800.0,
    fans=2,
)

M60S_VK30 = ModelSpec(
    key="m60svk30",
    type_name="M60SVK30",
    chips_per_board=245,
    profiles=(
        ProfileSpec("floor", 1670.0, 98.0, 380, 11.4),
        ProfileSpec("low", 2680.0, 145.0, 470, 12.2),
        ProfileSpec("normal", 3344.0, 172.0, 530, 12.8),
        ProfileSpec("high", 3680.0, 182.0, 570, 13.3),
    ),
    default_profile="normal",
    standby_w=20.0,
    nameplate_w=3700.0,
    fans=2,
)

WHATSMINER_MODELS: dict[str, ModelSpec] = {m.key: m for m in (M30S_PLUS_V40, M60S_VK30)}
POWER_MODES = {"low": "Low", "normal": "Normal", "high": "High"}
MAX_POWER_LIMIT_W = 99999  # the API's documented range is 0..99999


@dataclass(slots=True)
class WhatsminerState(MinerState):
    """A miner's true state plus the power limit it was given (``profile`` is the power mode)."""

    power_limit_w: int = 0

    def reset(self) -> None:
        self.power_limit_w = int(self.model.nameplate_w)
        MinerState.reset(self)

    def target(self) -> tuple[float, float]:
        if self.sleeping:
            return self.model.standby_w, 0.0
        ceiling_w = min(float(self.power_limit_w), self.model.profile(self.profile).power_w)
        return _on_curve(self.model, ceiling_w)

    def set_power_limit(self, limit_w: int) -> None:
        if limit_w == self.power_limit_w:
            return
        self._start_ramp(0.0 if self.sleeping else self.timing.profile_ramp_s)
        self.power_limit_w = limit_w

    def limited_w(self) -> float:
        """What the miner draws when awake and settled (the target, even while asleep)."""
        ceiling_w = min(float(self.power_limit_w), self.model.profile(self.profile).power_w)
        return _on_curve(self.model, ceiling_w)[0]


def _on_curve(model: ModelSpec, power_w: float) -> tuple[float, float]:
    points = sorted(model.profiles, key=lambda p: p.power_w)
    if power_w <= points[0].power_w:
        return points[0].power_w, points[0].hashrate_ths
    for lo, hi in itertools.pairwise(points):
        if power_w <= hi.power_w:
            f = (power_w - lo.power_w) / (hi.power_w - lo.power_w)
            return power_w, lo.hashrate_ths + f * (hi.hashrate_ths - lo.hashrate_ths)
    return points[-1].power_w, points[-1].hashrate_ths


# --- shapes ------------------------------------------------------------------------------


def cg_status(code: int, msg: str, ok: bool = True) -> Row:
    return {
        "STATUS": "S" if ok else "E",
        "When": int(time.time()),
        "Code": code,
        "Msg": msg,
        "Description": CGMINER_DESCRIPTION,
    }


def cg_reply(code: int, msg: str, section: str, rows: list[Row]) -> Row:
    return {"STATUS": [cg_status(code, msg)], section: rows, "id": 1}


def flat(code: int, msg: object, ok: bool = True) -> Row:
    return {
        "STATUS": "S" if ok else "E",
        "When": int(time.time()),
        "Code": code,
        "Msg": msg,
        "Description": "",
    }


def mac(address: str) -> str:
    octets = [int(x) for x in address.split(".")]
    return "C4:08:28:" + ":".join(f"{o:02X}" for o in octets[1:])


def serial(address: str, board: int | None = None) -> str:
    octets = "".join(f"{int(x):03d}" for x in address.split(".")[1:])
    return f"HSIM{octets}" + ("" if board is None else f"K{board}")


# --- physics as readings -----------------------------------------------------------------


def _mhs(ths: float) -> float:
    return round(ths * 1_000_000.0, 2)


def fan_rpm(m: MinerState, now: float) -> tuple[int, int]:
    rpm = int(2400 + 1200 * m.power_w(now) / 1000.0)
    return rpm, rpm - 30


def board_rates_ths(m: MinerState, now: float) -> list[float]:
    per_board = m.hashrate_ths(now) / m.model.boards
    skews = [0.01 * (b - (m.model.boards - 1) / 2) for b in range(m.model.boards)]
    return [per_board * (1.0 + s) for s in skews]


# Chip sensors relative to the board sensor, as the v1 recording shows at full load (board 70,
# chips 71 / 83.3 / 90): the model's own chip temperature is not used.
CHIP_MIN_ABOVE_BOARD_C = 1.0
CHIP_AVG_ABOVE_BOARD_C = 13.0
CHIP_MAX_ABOVE_BOARD_C = 20.0


def board_temps(m: MinerState, now: float, board: int) -> tuple[float, float, float, float]:
    """(board temperature, chip min, chip avg, chip max) of one board."""
    pcb = m.pcb_c(now) + board - 1  # boards differ by a degree or so, as real ones do
    return (
        round(pcb, 2),
        round(pcb + CHIP_MIN_ABOVE_BOARD_C, 2),
        round(pcb + CHIP_AVG_ABOVE_BOARD_C, 2),
        round(pcb + CHIP_MAX_ABOVE_BOARD_C, 2),
    )


# --- commands ----------------------------------------------------------------------------


def summary(m: WhatsminerState, now: float, address: str) -> Row:
    ths = m.hashrate_ths(now)
    elapsed = int(now - m.boot_at)
    temps = [board_temps(m, now, b) for b in range(m.model.boards)]
    fan_in, fan_out = fan_rpm(m, now)
    power = round(m.power_w(now))
    freq = m.model.profile(m.profile).frequency_mhz
    nominal = m.model.profile(m.model.default_profile)
    row = {
        "Accepted": m.accepted_shares,
        "Best Share": 0,
        "CB Platform": "ALLWINNER_H616",
        "CB Version": "V10",
        "Chip Data": "HP5A01-19101436   BINV04-192101D",
        "Chip Temp Avg": round(sum(t[2] for t in temps) / len(temps), 2),
        "Chip Temp Max": max(t[3] for t in temps),
        "Chip Temp Min": min(t[1] for t in temps),
        "Device Hardware%": 0.0,
        "Device Rejected%": 0.0,
        "Difficulty Accepted": float(m.accepted_shares * 65536),
        "Difficulty Rejected": 0.0,
        "Difficulty Stale": 0.0,
        "Discarded": 0,
        "Elapsed": elapsed,
        "Env Temp": round(m.model.ambient_c, 2),
        "Error Code Count": 0,
        "Factory Error Code Count": 0,
        "Factory GHS": int(nominal.hashrate_ths * 1000),
        "Fan Speed In": fan_in,
        "Fan Speed Out": fan_out,
        "Firmware Version": f"'{FIRMWARE}'",
        "Found Blocks": 0,
        "Get Failures": 0,
        "Getworks": 0,
        "HS RT": _mhs(ths),
        "Hardware Errors": 0,
        "Hash Deviation%": 0.0,
        "Hash Stable": True,
        "Hash Stable Cost Seconds": 0,
        "Last getwork": 0,
        "Liquid Cooling": False,
        "Local Work": 0,
        "MAC": mac(address),
        "MHS 15m": _mhs(ths),
        "MHS 1m": _mhs(ths),
        "MHS 5m": _mhs(ths),
        "MHS 5s": _mhs(ths),
        "MHS av": _mhs(ths),
        "Network Blocks": 0,
        "Pool Rejected%": 0.0,
        "Pool Stale%": 0.0,
        "Power": power,
        "Power Current": round(power / 12.5),
        "Power Fanspeed": 6000 if not m.sleeping else 0,
        "Power Limit": m.power_limit_w,
        "Power Mode": POWER_MODES[m.profile],
        "Power_RT": power,
        "Rejected": 0,
        "Remote Failures": 0,
        "Security Mode": 0,
        "Stale": 0,
        "Target Freq": freq,
        "Target MHS": int(_mhs(_on_curve(m.model, m.limited_w())[1])),
        "Temperature": max(t[0] for t in temps),
        "Total MH": round(ths * 1_000_000.0 * elapsed, 1),
        "Uptime": elapsed,
        "Utility": 0.0,
        "Voltage": int(m.model.profile(m.profile).voltage_v * 100),
        "Work Utility": 0.0,
        "freq_avg": freq if not m.sleeping else 0,
    }
    return cg_reply(11, "Summary", "SUMMARY", [row])


def devs(m: WhatsminerState, now: float, address: str) -> Row:
    rates = board_rates_ths(m, now)
    fan_in, fan_out = fan_rpm(m, now)
    freq = m.model.profile(m.profile).frequency_mhz if not m.sleeping else 0
    nominal_ghs = m.model.profile(m.model.default_profile).hashrate_ths * 1000
    elapsed = int(now - m.boot_at)
    rows: list[Row] = []
    for b in range(m.model.boards):
        temp, cmin, cavg, cmax = board_temps(m, now, b)
        mhs = _mhs(rates[b])
        rows.append(
            {
                "ASC": b,
                "Accepted": 0,
                "Chip Frequency": freq,
                "Chip Temp Avg": cavg,
                "Chip Temp Max": cmax,
                "Chip Temp Min": cmin,
                "Device Elapsed": elapsed,
                "Device Hardware%": 0.0,
                "Device Rejected%": 0.0,
                "Diff1 Work": 0,
                "Difficulty Accepted": 0.0,
                "Difficulty Rejected": 0.0,
                "Effective Chips": m.model.chips_per_board,
                "Enabled": "Y",
                "Factory GHS": int(nominal_ghs / m.model.boards),
                "Fan Speed In": fan_in,
                "Fan Speed Out": fan_out,
                "Frequency": float(freq),
                "Hardware Errors": 0,
                "ID": b,
                "Last Share Difficulty": 0.0,
                "Last Share Pool": 0,
                "Last Share Time": 0,
                "Last Valid Work": int(time.time()),
                "MHS 15m": mhs,
                "MHS 1m": mhs,
                "MHS 5m": mhs,
                "MHS 5s": mhs,
                "MHS av": mhs,
                "Name": "SM",
                "PCB SN": serial(address, b),
                "Rejected": 0,
                "Slot": b,
                "Status": "Alive",
                "Temperature": temp,
                "Total MH": round(rates[b] * 1_000_000.0 * elapsed, 1),
                "Upfreq Complete": 1,
                "Utility": 0.0,
            }
        )
    return cg_reply(9, f"{len(rows)} ASC(s)", "DEVS", rows)


def devdetails(m: WhatsminerState) -> Row:
    rows = [
        {
            "DEVDETAILS": b,
            "Name": "SM",
            "ID": b,
            "Driver": "bitmicro",
            "Kernel": "",
            "Model": m.model.type_name,
        }
        for b in range(m.model.boards)
    ]
    return cg_reply(69, "Device Details", "DEVDETAILS", rows)


def pools(m: WhatsminerState, rows_in: list[dict[str, str]]) -> Row:
    rows: list[Row] = []
    for i, p in enumerate(rows_in):
        active = i == 0 and not m.sleeping and bool(p["url"])
        host = p["url"].split("://", 1)[-1].rsplit(":", 1)[0] if p["url"] else ""
        rows.append(
            {
                "Accepted": m.accepted_shares if i == 0 else 0,
                "Bad Work": 0,
                "Best Share": 0,
                "Current Block Height": 0,
                "Current Block Version": 536870912 if active else 0,
                "Diff1 Shares": 0,
                "Difficulty Accepted": 0.0,
                "Difficulty Rejected": 0.0,
                "Difficulty Stale": 0.0,
                "Discarded": 0,
                "Get Failures": 0,
                "Getworks": 0,
                "Has GBT": False,
                "Has Stratum": True,
                "Last Share Difficulty": 0.0,
                "Last Share Time": 0,
                "Long Poll": "N",
                "POOL": i + 1,
                "Pool Rejected%": 0.0,
                "Pool Stale%": 0.0,
                "Priority": i,
                "Proxy": "",
                "Proxy Type": "",
                "Quota": 1,
                "Rejected": 0,
                "Remote Failures": 0,
                "Stale": 0,
                "Status": "Alive" if p["url"] else "Dead",
                "Stratum Active": active,
                "Stratum Difficulty": 65536.0 if active else 0.0,
                "Stratum URL": host,
                "URL": p["url"],
                "User": p["user"],
                "Work Difficulty": 0.0,
                "Works": 0,
            }
        )
    return cg_reply(7, f"{len(rows)} Pool(s)", "POOLS", rows)


def get_version() -> Row:
    return flat(131, {"api_ver": API_VERSION, "fw_ver": FIRMWARE, "platform": PLATFORM})


def get_psu(m: WhatsminerState, now: float) -> Row:
    fan = "0" if m.sleeping else "6000"
    return flat(
        131,
        {
            "fan_speed": fan,
            "hw_version": "",
            "model": PSU_MODEL,
            "name": PSU_MODEL,
            "sw_version": PSU_VERSION,
        },
    )


def get_miner_info(address: str, led_auto: bool) -> Row:
    return flat(
        131,
        {
            "hostname": "WhatsMiner",
            "ledstat": "auto" if led_auto else "manual",
            "mac": mac(address),
            "minersn": serial(address),
        },
    )


def status(m: WhatsminerState) -> Row:
    return flat(
        131,
        {
            "FirmwareVersion": FIRMWARE,
            "hash_percent": "0",
            "mineroff": "true" if m.sleeping else "false",
            "mineroff_reason": "power_off by API" if m.sleeping else "",
            "mineroff_time": "",
            "power_limit_set": str(m.power_limit_w),
            "power_mode": m.profile,
        },
    )


def get_error_code() -> Row:
    return flat(131, {"error_code": []})
