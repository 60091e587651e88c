"""LuxOS RPC replies for one simulated miner, built as JSON bytes.

Shapes follow replies recorded from a real LuxOS 2025.4.8 miner
(``../shared/data/fixtures/miners/asic-rs/luxminer/v1``) and Luxor's API documentation: every
reply is ``{"STATUS": [...], "<SECTION>": [...], "id": 1}``; a multicommand ``a+b`` is
``{"a": [<reply a>], "b": [<reply b>], "id": 1}``. Key names, value types (``chain_rateN`` is a
numeric string; temperatures are ``"a-b-c-d"`` strings), status codes and messages are the
recording's; the values move with the physics of :mod:`simulators.luxos_model`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import cache

from simulators.luxos_model import MinerState, ModelSpec

FIRMWARE = "2025.4.8.220305-57b389c7"
MINER_VERSION = "2025.4.8.220305"
DESCRIPTION = f"LUXminer {FIRMWARE}"
COMPILE_TIME = "Tue Apr  8 22:05:35 UTC 2025"
API_VERSION = "3.7"
# Hashboard slots the control board has; the recorded S19k Pro reports a fourth, empty one.
SLOTS = 4


class CommandError(Exception):
    """A command the miner answers with STATUS "E" (bad parameter, no session, unknown)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _status(code: int, msg: str, ok: bool = True) -> bytes:
    flag = "S" if ok else "E"
    return (
        f'{{"STATUS":[{{"Code":{code},"Description":"{DESCRIPTION}",'
        f'"Msg":{json.dumps(msg)},"STATUS":"{flag}","When":{int(time.time())}}}]'
    ).encode()


def _section(name: str, rows: object) -> bytes:
    return b',"' + name.encode() + b'":' + json.dumps(rows, separators=(",", ":")).encode()


def error_body(code: int, msg: str) -> bytes:
    """An error reply without its closing brace (see :func:`close_single`)."""
    return _status(code, msg, ok=False)


def close_single(body: bytes) -> bytes:
    return body + b',"id":1}'


def close_multi(parts: list[tuple[str, bytes]]) -> bytes:
    inner = b",".join(b'"' + name.encode() + b'":[' + body + b',"id":1}]' for name, body in parts)
    return b"{" + inner + b',"id":1}'


def _mac(address: str) -> str:
    octets = [int(x) for x in address.split(".")]
    return "62:f7:5e:" + ":".join(f"{o:02x}" for o in octets[1:])


def _serial(address: str, prefix: str = "JYZZ") -> str:
    return prefix + "".join(f"{int(o):03d}" for o in address.split("."))[:13]


@cache
def _static(model: ModelSpec) -> dict[str, bytes]:
    """Sections that never change for a model, serialised once."""
    version = [
        {
            "API": API_VERSION,
            "CompileTime": COMPILE_TIME,
            "LUXminer": FIRMWARE,
            "Miner": MINER_VERSION,
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
    default_i = [p.name for p in model.profiles].index(model.default_profile)
    profiles = [
        {
            "CanRestore": True,
            "Frequency": p.frequency_mhz,
            "HasOverrides": False,
            "Hashrate": p.hashrate_ths,
            "IsDynamic": True,
            "IsTuned": False,
            "Profile Name": p.name,
            "Step": str(i - default_i),
            "Voltage": p.voltage_v,
            "Watts": int(p.power_w),
        }
        for i, p in enumerate(model.profiles)
    ]
    groups = [{"GROUP": 0, "Name": "Default", "Quota": 1}]
    tempctrl = [
        {
            "Dangerous": model.dangerous_c,
            "Hot": model.hot_c,
            "Mode": "Auto",
            "Target": model.target_c if model.target_c is not None else 55.0,
        }
    ]
    metadata = [
        {
            "BottomLeft": {"Label": "Board Exhaust (bottom)", "Position": [1, 0]},
            "BottomRight": {"Label": "Board Intake (bottom)", "Position": [1, 1]},
            "TopLeft": {"Label": "Board Exhaust (top)", "Position": [0, 0]},
            "TopRight": {"Label": "Board Intake (top)", "Position": [0, 1]},
        }
    ]
    lo, hi = model.profiles[0], model.profiles[-1]
    limits = [
        {
            "AtmPostRampMinutesMax": 60,
            "AtmPostRampMinutesMin": 0,
            "AtmStartupMinutesMax": 60,
            "AtmStartupMinutesMin": 0,
            "AtmTempWindowMax": 30,
            "AtmTempWindowMin": 1,
            "FrequencyMax": hi.frequency_mhz,
            "FrequencyMin": lo.frequency_mhz,
            "FrequencyStepMax": 100,
            "FrequencyStepMin": 5,
            "TempCtrlMax": 200,
            "TempCtrlMin": 0,
            "VoltageMax": hi.voltage_v,
            "VoltageMin": lo.voltage_v,
            "VoltageStepMax": 1.0,
            "VoltageStepMin": 0.05,
        }
    ]
    return {
        "version": _status(22, "LUXminer versions") + _section("VERSION", version),
        "devdetails": _status(69, "Device Details") + _section("DEVDETAILS", devdetails),
        "profiles": _status(323, "List profiles") + _section("PROFILES", profiles),
        "groups": _status(300, "Groups") + _section("GROUPS", groups),
        "tempctrl": _status(325, "Temperature control configuration")
        + _section("TEMPCTRL", tempctrl),
        "events": _status(357, "Miner Events") + _section("EVENTS", []),
        "limits": _status(326, "Limits") + _section("LIMITS", limits),
        "_metadata": _section("METADATA", metadata),
    }


def _dashed(values: tuple[int, ...]) -> str:
    return "-".join(str(v) for v in values)


def _board_temps(m: MinerState, now: float) -> tuple[int, int]:
    """(exhaust, intake) sensor readings, whole degrees, as LuxOS reports board sensors."""
    return round(m.pcb_c(now)), round(m.inlet_c(now))


def _stats(m: MinerState, now: float) -> bytes:
    ths = m.hashrate_ths(now)
    avg_ths = m.average_hashrate_ths(now)
    boards = m.model.boards
    out, inlet = _board_temps(m, now)
    prof = m.model.profile(m.profile)
    freq = 0 if m.sleeping else prof.frequency_mhz
    row: dict[str, object] = {
        "Calls": 0,
        "Elapsed": int(m.mining_elapsed_s(now)),
        "GHS 5s": round(ths * 1000.0, 2),
        "GHS av": round(avg_ths * 1000.0, 2),
        "ID": "BTM_SOC0",
        "Max": 0,
        "Min": 99999999,
        "Mode": 2,
        "STATS": 0,
        "Wait": 0,
    }
    rpm = _fan_rpms(m, now)
    temps_row: dict[str, object] = {}
    for b in range(1, SLOTS + 1):
        present = b <= boards
        # Boards differ slightly, as real ones do; the boards still sum to the miner's average.
        skew = (b - 2) * 0.005 if present else 0.0
        board_ghs = avg_ths * 1000.0 / boards * (1.0 + skew) if present else 0.0
        row[f"chain_acn{b}"] = m.model.chips_per_board if present else 0
        chips = m.model.chips_per_board
        acs = (
            " " + " ".join(["oooo"] * (chips // 4)) + (" " + "o" * (chips % 4) if chips % 4 else "")
        )
        row[f"chain_acs{b}"] = acs if present else ""
        row[f"chain_hw{b}"] = 0
        # A numeric string: the since-start average of the board, as LuxOS sends it.
        row[f"chain_rate{b}"] = f"{board_ghs:.2f}" if present else "0"
        e, i = (out - (b == 2), inlet - (b == 2)) if present else (0, 0)
        sensors = _dashed((e, i, i, e))
        temps_row[f"temp_chip{b}"] = sensors
        temps_row[f"temp_pcb{b}"] = sensors
        temps_row[f"temp_pic{b}"] = sensors
        row[f"freq{b}"] = float(freq) if present else 0.0
    for f in range(1, m.model.fans + 1):
        row[f"fan{f}"] = rpm[f - 1]
    row.update(
        {
            "fan_num": m.model.fans,
            "frequency": freq,
            "miner_count": boards,
            "miner_id": _mac(m.address).replace(":", ""),
            "miner_version": MINER_VERSION,
            "no_matching_work": 0,
            "rate_30m": round(avg_ths * 1000.0, 2),
            "rate_unit": "GH",
        }
    )
    for b in range(1, boards + 1):
        row[f"temp{b}"] = float(out)
        row[f"temp2_{b}"] = float(out)
    row.update(temps_row)
    row.update(
        {
            "temp_max": float(out),
            "temp_num": boards,
            "total rate": round(ths * 1000.0 / boards, 2),
            "total_acn": SLOTS,
            "total_freqavg": float(freq),
            "total_rateideal": round(m.target()[1] * 1000.0, 2),
        }
    )
    version_row = {"CompileTime": COMPILE_TIME, "Miner": MINER_VERSION, "Type": m.model.type_name}
    return _status(70, "LUXminer stats") + _section("STATS", [version_row, row])


def _fan_rpms(m: MinerState, now: float) -> list[int]:
    ratio = m.fan_ratio(m.power_w(now))
    if m.sleeping:
        ratio = 0.2  # PowerOffSpeed
    # Fan pairs differ (1920 and 2340 RPM at 20 % in the recording).
    return [int(ratio * (9600 if f < 2 else 11700)) for f in range(m.model.fans)]


def _fans(m: MinerState, now: float) -> bytes:
    rpm = _fan_rpms(m, now)
    speed = round(100 * (0.2 if m.sleeping else m.fan_ratio(m.power_w(now))))
    fans = [
        {"FAN": f"FAN{i + 1}", "ID": i, "RPM": rpm[i], "Speed": speed} for i in range(m.model.fans)
    ]
    ctrl = [{"MinFans": 3, "PowerOffSpeed": 20}]
    return (
        _status(202, f"{m.model.fans} Fan(s)") + _section("FANCTRL", ctrl) + _section("FANS", fans)
    )


def _power(m: MinerState, now: float) -> bytes:
    # The PSU is switched off in sleep ("turning off the hashboards and the power supply").
    return _status(311, "Power usage") + _section(
        "POWER", [{"PSU": not m.sleeping, "Watts": round(m.power_w(now))}]
    )


def _summary(m: MinerState, now: float) -> bytes:
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    avg = round(m.average_hashrate_ths(now) * 1000.0, 2)
    elapsed = int(m.mining_elapsed_s(now))
    accepted = int(m.work_th(now) / 40.0)  # about one share per 40 TH at the recorded difficulty
    row = {
        "Accepted": accepted,
        "Best Share": 32768,
        "Device Hardware%": 0.0,
        "Device Rejected%": 0.0,
        "Difficulty Accepted": accepted * 32768,
        "Difficulty Rejected": 0,
        "Difficulty Stale": 0,
        "Discarded": 0,
        "Elapsed": elapsed,
        "Found Blocks": 0,
        "GHS 15m": ghs,
        "GHS 1m": ghs,
        "GHS 24h": avg,
        "GHS 30m": avg,
        "GHS 5m": ghs,
        "GHS 5s": ghs,
        "GHS av": avg,
        "Get Failures": 0,
        "Getworks": accepted // 2,
        "Hardware Errors": 0,
        "Last getwork": int(time.time()),
        "Local Work": 0,
        "Network Blocks": 0,
        "Pool Rejected%": 0.0,
        "Pool Stale%": 0.0,
        "Rejected": 0,
        "Remote Failures": 0,
        "Stale": 0,
        "Total MH": avg * 1000.0 * elapsed,
        "Utility": round(accepted / max(1.0, elapsed / 60.0), 2),
        "Work Utility": 11.5 if ghs else 0.0,
    }
    return _status(11, "Summary") + _section("SUMMARY", [row])


def _devs(m: MinerState, now: float) -> bytes:
    boards = m.model.boards
    mhs = m.hashrate_ths(now) * 1e6 / boards
    avg = m.average_hashrate_ths(now) * 1e6 / boards
    nominal = m.model.profile(m.profile).hashrate_ths * 1e6 / boards
    out, _ = _board_temps(m, now)
    elapsed = int(m.mining_elapsed_s(now))
    ramping = m.power_w(now) != m.target()[0]
    rows = [
        {
            "ASC": i,
            "Accepted": 0,
            "Board": "BHB56903",
            "Connector": f"J{i + 7}",
            "ControllerIPVersionHex": "0x18351835",
            "ControllerIPVersionStr": "N/A",
            "Device Elapsed": elapsed,
            "Device Hardware%": 0,
            "Device Rejected%": 0,
            "Diff1 Work": 0,
            "Difficulty Accepted": 0,
            "Difficulty Rejected": 0,
            "Enabled": "Y",
            "Hardware Error MHS 15m": 0,
            "Hardware Errors": 0,
            "ID": i,
            "IsRamping": ramping,
            "IsUserShutdown": m.sleeping,
            "Last Share Difficulty": 32768,
            "Last Share Pool": 0,
            "Last Share Time": int(time.time()),
            "Last Valid Work": int(time.time()),
            "MHS 15m": mhs,
            "MHS 1m": mhs,
            "MHS 30m": avg,
            "MHS 5m": mhs,
            "MHS 5s": mhs,
            "MHS 60m": avg,
            "MHS av": avg,
            "Name": "",
            "Nominal MHS": nominal,
            "Profile": m.profile,
            "Rejected": 0,
            "SerialNumber": _serial(m.address, "JYZY") + str(i),
            "Status": "Alive",
            "Temperature": float(out),
            "Total MH": avg * elapsed,
            "Utility": 0,
        }
        for i in range(boards)
    ]
    return _status(9, f"{boards} ASC(s)") + _section("DEVS", rows)


def _temps(m: MinerState, now: float) -> bytes:
    out, inlet = _board_temps(m, now)
    rows = [
        {
            "BottomLeft": float(out),
            "BottomRight": float(inlet),
            "ID": i,
            "TEMP": i,
            "TopLeft": float(out),
            "TopRight": float(inlet),
        }
        for i in range(m.model.boards)
    ]
    return (
        _status(201, f"{m.model.boards} Temp(s)")
        + _static(m.model)["_metadata"]
        + _section("TEMPS", rows)
    )


def _config(m: MinerState, now: float) -> bytes:
    step = [p.name for p in m.model.profiles].index(m.profile) - [
        p.name for p in m.model.profiles
    ].index(m.model.default_profile)
    row = {
        "ASC Count": m.model.boards,
        "BcastAddr": "127.255.255.255",
        "ControlBoardType": "cvitek",
        "Cooling": "Air",
        "CurtailMode": "Sleep" if m.sleeping else "None",
        "DHCP": True,
        "DNS Servers": "",
        "Device Code": "",
        "FPGABuildIdHex": "0x18351835",
        "FPGABuildIdStr": "2018-35-18 35:00",
        "FeeStatus": "Ok",
        "Gateway": "127.0.0.1",
        "GreenLed": "auto",
        "Hostname": "luxos-" + m.address.replace(".", "-"),
        "Hotplug": "None",
        "IPAddr": m.address,
        "ImmersionMode": False,
        "IsAtmEnabled": m.atm_enabled,
        "IsPowerSupplyOn": not m.sleeping,
        "IsSingleVoltage": True,
        "IsTuning": not m.sleeping,
        "Log Interval": 0,
        "LogFileLevel": "info",
        "MACAddr": _mac(m.address),
        "Model": m.model.type_name,
        "NameplateTHS": m.model.profile(m.model.default_profile).hashrate_ths,
        "Netmask": "255.0.0.0",
        "OS": "LuxOS",
        "PGA Count": 0,
        "PSUHwVersion": "75",
        "PSULabel": "APW121215e",
        "Pool Count": 1,
        "Profile": m.profile,
        "ProfileStep": str(step),
        "RedLed": "auto",
        "SerialNumber": _serial(m.address),
        "Strategy": "Failover",
        "SystemStatus": "Normal",
        "UpdateOnStartup": "off",
        "UpdateOnTimeout": "off",
        "UpdateOnUser": "full",
        "UpdateSource": "https://storage.googleapis.com/luxor-firmware/stable",
        "UpdateTimeout": 60,
    }
    return _status(33, "LUXminer config") + _section("CONFIG", [row])


def _pools(m: MinerState, now: float) -> bytes:
    accepted = int(m.work_th(now) / 40.0)
    pool = {
        "Accepted": accepted,
        "AsicBoost": True,
        "Bad Work": 0,
        "Best Share": 32768,
        "Current Block Height": 0,
        "Current Block Version": 536870912,
        "Diff": "32K",
        "Diff1 Shares": accepted * 32768,
        "Difficulty Accepted": accepted * 32768,
        "Difficulty Rejected": 0,
        "Difficulty Stale": 0,
        "Discarded": 0,
        "GROUP": 0,
        "Get Failures": 0,
        "Getworks": accepted // 2,
        "Has GBT": False,
        "Has Stratum": True,
        "Has Vmask": True,
        "Last Share Difficulty": 32768,
        "Last Share Time": "00:00:01",
        "Long Pool": "N",
        "POOL": 0,
        "Pool Rejected%": 0.0,
        "Pool Stale%": 0.0,
        "Priority": 0,
        "Proxy": "",
        "Proxy Type": "",
        "Quota": 1.0,
        "Rejected": 0,
        "Remote Failures": 0,
        "Stale": 0,
        "Status": "Alive",
        "Stratum Active": True,
        "Stratum Difficulty": 32768,
        "Stratum URL": "btc.global.luxor.tech:700",
        "URL": "stratum+tcp://btc.global.luxor.tech:700",
        "User": "site.worker",
        "Work Difficulty": 32768,
        "Works": 0,
    }
    return _status(7, "1 Pool(s)") + _section("POOLS", [pool])


def _atm(m: MinerState, now: float) -> bytes:
    row = {
        "Enabled": m.atm_enabled,
        "MaxProfile": m.user_profile,
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
    "devs": _devs,
    "temps": _temps,
    "pools": _pools,
}

STATIC_COMMANDS = ("version", "devdetails", "profiles", "groups", "tempctrl", "events", "limits")


def read_body(m: MinerState, command: str, now: float) -> bytes | None:
    """The reply body for a read-only command, or None if ``command`` is not one."""
    reader = READERS.get(command)
    if reader is not None:
        m.atm_tick(now)  # ATM acts whenever the miner is looked at (lazily, rate-limited)
        return reader(m, now)
    if command in STATIC_COMMANDS:
        return _static(m.model)[command]
    return None


def session_body(session_id: str, code: int = 319, msg: str = "Session information") -> bytes:
    return _status(code, msg) + _section("SESSION", [{"SessionID": session_id}])


def ok_body(code: int, msg: str, section: str | None = None, row: object = None) -> bytes:
    body = _status(code, msg)
    if section is not None:
        body += _section(section, [row])
    return body


def profile_body(m: MinerState, name: str) -> bytes:
    """``profileget``: one profile's definition."""
    p = m.model.profile(name)
    row = {
        "Frequency": p.frequency_mhz,
        "Hashrate": p.hashrate_ths,
        "IsDynamic": True,
        "IsTuned": False,
        "Profile Name": p.name,
        "Voltage": p.voltage_v,
        "Watts": int(p.power_w),
    }
    return _status(322, "Profile") + _section("PROFILE", [row])


def voltage_body(m: MinerState, board: int) -> bytes:
    volt = 0.0 if m.sleeping else m.model.profile(m.profile).voltage_v
    return _status(307, "Get Voltage") + _section("VOLTAGE", [{"Board": board, "Voltage": volt}])
