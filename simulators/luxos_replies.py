"""LuxOS RPC replies for one simulated miner, built as JSON bytes.

Shapes follow LuxOS 2024.x as pyasic 0.79.0 reads them (see docs/miner-protocols.md): every
reply is ``{"STATUS": [...], "<SECTION>": [...], "id": 1}``; a multicommand ``a+b`` is
``{"a": [<reply a>], "b": [<reply b>], "id": 1}``. Static sections are serialised once per
model, so answering a poll costs little more than formatting a few numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import cache

from simulators.luxos_model import MinerState, ModelSpec

FIRMWARE = "2024.11.18.223311-bf2f6d3c"
DESCRIPTION = f"LUXminer {FIRMWARE}"
API_VERSION = "3.7"


class CommandError(Exception):
    """A command the miner answers with STATUS "E" (bad parameter, no session, unknown)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _status(code: int, msg: str, ok: bool = True) -> bytes:
    flag = "S" if ok else "E"
    return (
        f'{{"STATUS":[{{"STATUS":"{flag}","When":{int(time.time())},"Code":{code},'
        f'"Msg":{json.dumps(msg)},"Description":"{DESCRIPTION}"}}]'
    ).encode()


def _section(name: str, rows: object) -> bytes:
    return b',"' + name.encode() + b'":' + json.dumps(rows, separators=(",", ":")).encode()


def error_body(code: int, msg: str) -> bytes:
    """An error reply without its closing brace (see :func:`close_single`)."""
    return _status(code, msg, ok=False)


def close_single(body: bytes) -> bytes:
    return body + b',"id":1}'


def close_multi(parts: list[tuple[str, bytes]]) -> bytes:
    inner = b",".join(b'"' + name.encode() + b'":[' + body + b"}]" for name, body in parts)
    return b"{" + inner + b',"id":1}'


@cache
def _static(model: ModelSpec) -> dict[str, bytes]:
    """Sections that never change for a model, serialised once."""
    version = [
        {
            "API": API_VERSION,
            "CompileTime": "Mon Nov 18 22:33:11 UTC 2024",
            "LUXminer": FIRMWARE,
            "Miner": FIRMWARE,
            "Type": model.type_name,
        }
    ]
    devdetails = [
        {
            "DEVDETAILS": i,
            "Name": "ASC",
            "ID": i,
            "Driver": "bitmicro",
            "Kernel": "",
            "Model": model.type_name,
            "Chips": model.chips_per_board,
            "Frequency": 0,
            "Voltage": 0,
        }
        for i in range(model.boards)
    ]
    profiles = [
        {
            "Profile Name": p.name,
            "Frequency": p.frequency_mhz,
            "Hashrate": p.hashrate_ths,
            "IsDynamic": False,
            "IsTuned": False,
            "Step": "0",
            "Voltage": p.voltage_v,
            "Watts": int(p.power_w),
        }
        for p in model.profiles
    ]
    pools = [
        {
            "POOL": 0,
            "URL": "stratum+tcp://btc.global.luxor.tech:700",
            "Status": "Alive",
            "Priority": 0,
            "Quota": 1,
            "Getworks": 0,
            "Accepted": 0,
            "Rejected": 0,
            "Stale": 0,
            "Get Failures": 0,
            "Remote Failures": 0,
            "User": "site.worker",
            "Stratum Active": True,
            "Stratum URL": "btc.global.luxor.tech",
            "GROUP": 0,
        }
    ]
    groups = [{"GROUP": 0, "Name": "Default", "Quota": 1}]
    tempctrl = [{"Dangerous": 95, "Hot": 85, "Mode": "Auto", "Target": 75}]
    return {
        "version": _section("VERSION", version),
        "devdetails": _section("DEVDETAILS", devdetails),
        "profiles": _section("PROFILES", profiles),
        "pools": _section("POOLS", pools),
        "groups": _section("GROUPS", groups),
        "tempctrl": _section("TEMPCTRL", tempctrl),
    }


_STATIC_CODES = {
    "version": (22, "LUXminer versions"),
    "devdetails": (69, "Device Details"),
    "profiles": (327, "Profiles"),
    "pools": (7, "1 Pool(s)"),
    "groups": (300, "Groups"),
    "tempctrl": (325, "Temperature control configuration"),
}


def _dashed(values: tuple[int, ...]) -> str:
    return "-".join(str(v) for v in values)


def _stats(m: MinerState, now: float) -> bytes:
    ths = m.hashrate_ths(now)
    pcb = m.pcb_c(now)
    chip = m.chip_c(now)
    boards = m.model.boards
    per_board_ghs = ths * 1000.0 / boards
    ideal_ghs = m.model.profile(m.profile).hashrate_ths * 1000.0
    row: dict[str, object] = {
        "STATS": 0,
        "ID": "luxminer",
        "Elapsed": int(now - m.boot_at),
        "GHS 5s": round(ths * 1000.0, 2),
        "GHS av": round(ths * 1000.0, 2),
        "total_rateideal": round(ideal_ghs, 2),
        "rate_unit": "GH",
        "miner_count": boards,
        "fan_num": m.model.fans,
        "frequency": m.model.profile(m.profile).frequency_mhz,
    }
    for b in range(1, boards + 1):
        # Boards differ slightly, as real ones do; the sum is still the miner's hashrate.
        skew = (b - 2) * 0.01
        row[f"chain_rate{b}"] = round(per_board_ghs * (1.0 + skew), 2)
        row[f"chain_acn{b}"] = m.model.chips_per_board
        p = round(pcb + b - 2)
        c = round(chip + b - 2)
        row[f"temp_pcb{b}"] = _dashed((p - 2, p, p + 1, p - 1))
        row[f"temp_chip{b}"] = _dashed((c, c + 2, c + 3, c + 1))
    version_row = {
        "CompileTime": "Mon Nov 18 22:33:11 UTC 2024",
        "LUXminer": FIRMWARE,
        "Miner": FIRMWARE,
        "Type": m.model.type_name,
    }
    return _status(70, "LUXminer stats") + _section("STATS", [version_row, row])


def _fan_rpm(m: MinerState, now: float) -> int:
    # Fans run to hold the target temperature: roughly proportional to heat, with a floor.
    return int(1200 + 1500 * m.power_w(now) / 1000.0)


def _fans(m: MinerState, now: float) -> bytes:
    rpm = _fan_rpm(m, now)
    fans = [
        {"FAN": i, "ID": i, "RPM": rpm + 30 * i, "Speed": min(100, rpm // 70)} for i in range(4)
    ]
    ctrl = [{"MinFans": 4, "Mode": "Auto"}]
    return _status(202, "4 Fan(s)") + _section("FANS", fans) + _section("FANCTRL", ctrl)


def _power(m: MinerState, now: float) -> bytes:
    return _status(320, "Power") + _section(
        "POWER", [{"PSU": True, "Watts": round(m.power_w(now))}]
    )


def _summary(m: MinerState, now: float) -> bytes:
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    row = {
        "Elapsed": int(now - m.boot_at),
        "GHS 5s": ghs,
        "GHS av": ghs,
        "Accepted": m.accepted_shares,
        "Rejected": 0,
        "Hardware Errors": 0,
        "Utility": 0.0,
    }
    return _status(11, "Summary") + _section("SUMMARY", [row])


def _config(m: MinerState, now: float) -> bytes:
    row = {
        "Profile": m.profile,
        "RedLed": "off",
        "MACAddr": _mac(m.address),
        "Hostname": "luxos-" + m.address.replace(".", "-"),
        "IsAtmEnabled": m.atm_enabled,
        "CurtailMode": "sleep" if m.sleeping else "none",
    }
    return _status(33, "Configuration") + _section("CONFIG", [row])


def _mac(address: str) -> str:
    octets = [int(x) for x in address.split(".")]
    return "02:4C:58:" + ":".join(f"{o:02X}" for o in octets[1:])


def _atm(m: MinerState, now: float) -> bytes:
    row = {
        "Enabled": m.atm_enabled,
        "MaxProfile": m.model.profiles[-1].name,
        "MinProfile": m.model.profiles[0].name,
        "PostRampMinutes": 15,
        "StartupMinutes": 15,
        "TempWindow": 5,
    }
    return _status(339, "ATM configuration values") + _section("ATM", [row])


Reader = Callable[[MinerState, float], bytes]

READERS: dict[str, Reader] = {
    "stats": _stats,
    "fans": _fans,
    "power": _power,
    "summary": _summary,
    "config": _config,
    "atm": _atm,
}


def read_body(m: MinerState, command: str, now: float) -> bytes | None:
    """The reply body for a read-only command, or None if ``command`` is not one."""
    reader = READERS.get(command)
    if reader is not None:
        return reader(m, now)
    static = _static(m.model).get(command)
    if static is not None:
        code, msg = _STATIC_CODES[command]
        return _status(code, msg) + static
    return None


def session_body(session_id: str) -> bytes:
    return _status(340, "Session") + _section("SESSION", [{"SessionID": session_id}])


def ok_body(code: int, msg: str, section: str | None = None, row: object = None) -> bytes:
    body = _status(code, msg)
    if section is not None:
        body += _section(section, [row])
    return body
