"""Replies of one simulated stock Antminer (Bitmain firmware), built from its physics.

Two APIs: the CGMiner-style RPC on port 4028 (``version``, ``summary``, ``stats``, ``devs``,
``pools``; ``{"STATUS": [...], "<SECTION>": [...], "id": 1}``) and the CGI web API on port 80
(``get_system_info``, ``get_miner_conf``, ``summary``, ``stats``, ``get_blink_status``, ...).
Key names, value types and STATUS codes follow replies recorded from a real miner (see
``tests/test_sim_fidelity_antminer.py``); the values move with :class:`MinerState`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from simulators.luxos_model import MinerState

DESCRIPTION = "cgminer 1.0.0"
BMMINER_VERSION = "1.0.0"
MINER_VERSION = "49.0.1.3"
COMPILE_TIME = "Tue Dec  6 16:12:30 CST 2022"
API_VERSION = "3.1"
WEB_API_VERSION = "1.0.0"
FILESYSTEM_VERSION = "Tue Dec  6 16:12:30 CST 2022"
KERNEL_VERSION = "Linux 4.9.113 #1 SMP PREEMPT Tue Dec 6 15:48:12 CST 2022"
MAX_BOARDS = 4  # the RPC reports 4 chain slots; a 3-board miner leaves the 4th empty

# Sensor offsets around the mean board temperature: inlet side cool, outlet side hot, as the
# recording shows (e.g. pcb 73-45-64-65). They sum to zero so the mean is the model's value.
# On stock firmware each chip sensor reads its PCB sensor + 5 °C and each PIC sensor - 10 °C
# (exactly so in the recording), so the model's own chip temperature is not used.
PCB_OFFSETS_C = (9, -17, 3, 5)
CHIP_ABOVE_PCB_C = 5
PIC_BELOW_PCB_C = 10


Row = dict[str, Any]


def status(code: int, msg: str, ok: bool = True) -> Row:
    return {
        "STATUS": "S" if ok else "E",
        "When": int(time.time()),
        "Code": code,
        "Msg": msg,
        "Description": DESCRIPTION,
    }


def reply(code: int, msg: str, section: str | None = None, rows: list[Row] | None = None) -> Row:
    out: Row = {"STATUS": [status(code, msg)]}
    if section is not None:
        out[section] = rows or []
    out["id"] = 1
    return out


def error_reply(code: int, msg: str) -> Row:
    return {"STATUS": [status(code, msg, ok=False)], "id": 1}


def encode(doc: Row) -> bytes:
    """RPC framing: compact JSON followed by a NUL, as CGMiner writes it."""
    return json.dumps(doc, separators=(",", ":")).encode() + b"\x00"


def serial(address: str, board: int | None = None) -> str:
    octets = "".join(f"{int(x):03d}" for x in address.split(".")[1:])
    return f"SIM{octets}" + ("" if board is None else f"B{board}")


def mac(address: str) -> str:
    octets = [int(x) for x in address.split(".")]
    return "02:42:4D:" + ":".join(f"{o:02X}" for o in octets[1:])


# --- physics as readings -----------------------------------------------------------------


def _board_temps(m: MinerState, now: float, board: int) -> tuple[list[int], list[int]]:
    skew = board - 1  # boards differ by a degree or so, as real ones do
    pcb = [round(m.pcb_c(now) + skew + o) for o in PCB_OFFSETS_C]
    return pcb, [t + CHIP_ABOVE_PCB_C for t in pcb]


def fan_rpm(m: MinerState, now: float) -> list[int]:
    # Fans follow heat; asleep they idle at their floor.
    base = int(1800 + 1200 * m.power_w(now) / 1000.0)
    return [base + 120, base, base - 840, base - 840]


def board_rates_ghs(m: MinerState, now: float) -> list[float]:
    per_board = m.hashrate_ths(now) * 1000.0 / m.model.boards
    # Boards hash slightly differently; the sum stays the miner's hashrate.
    skews = [0.01 * (b - (m.model.boards - 1) / 2) for b in range(m.model.boards)]
    return [per_board * (1.0 + s) for s in skews]


def ideal_ghs(m: MinerState, profile: str) -> float:
    return m.model.profile(profile).hashrate_ths * 1000.0


def frequency_mhz(m: MinerState) -> int:
    return m.model.profile(m.profile).frequency_mhz


# --- RPC ---------------------------------------------------------------------------------


def rpc_version(m: MinerState, now: float) -> Row:
    row = {
        "API": API_VERSION,
        "BMMiner": BMMINER_VERSION,
        "CompileTime": COMPILE_TIME,
        "Miner": MINER_VERSION,
        "Type": m.model.type_name,
    }
    return reply(22, "CGMiner versions", "VERSION", [row])


def rpc_summary(m: MinerState, now: float) -> Row:
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    elapsed = int(now - m.boot_at)
    shares = m.accepted_shares
    row = {
        "Accepted": shares,
        "Best Share": 0,
        "Device Hardware%": 0.0,
        "Device Rejected%": 0.0,
        "Difficulty Accepted": float(shares * 524288),
        "Difficulty Rejected": 0.0,
        "Difficulty Stale": 0.0,
        "Discarded": 0,
        "Elapsed": elapsed,
        "Found Blocks": 0,
        "GHS 30m": ghs,
        "GHS 5s": ghs,
        "GHS av": ghs,
        "Get Failures": 0,
        "Getwork": 0,
        "Hardware Errors": 0,
        "Last getwork": int(time.time()),
        "Local Work": 0,
        "Network Blocks": 0,
        "Pool Rejected%": 0.0,
        "Pool Stale%": 0.0,
        "Rejected": 0,
        "Remote Failures": 0,
        "Stale": 0,
        "Total MH": round(ghs * 1000.0 * elapsed, 1),
        "Utility": 0.0,
        "Work Utility": 0.0,
    }
    return reply(11, "Summary", "SUMMARY", [row])


def rpc_devs(m: MinerState, now: float) -> Row:
    # Stock firmware reports one pseudo device with zero rates; the boards are in ``stats``.
    when = int(time.time())
    row = {
        "ASC": 0,
        "Accepted": m.accepted_shares,
        "Device Elapsed": int(now - m.boot_at),
        "Device Hardware%": 0.0,
        "Device Rejected%": 0.0,
        "Diff1 Work": 0,
        "Difficulty Accepted": m.accepted_shares * 524288,
        "Difficulty Rejected": 0,
        "Enabled": "Y",
        "Hardware Errors": 0,
        "ID": 0,
        "Last Share Difficulty": 0,
        "Last Share Pool": 0,
        "Last Share Time": when,
        "Last Valid Work": when,
        "MHS 5s": 0.0,
        "MHS av": 0.0,
        "Name": "BTM_SOC",
        "Rejected": 0,
        "Status": "Alive",
        "Tenperature": 0.0,  # sic: the firmware's spelling
        "Total MH": 0.0,
        "Utility": 0.0,
    }
    return reply(9, "1 ASC(s)", "DEVS", [row])


def rpc_pools(m: MinerState, now: float, pools: list[dict[str, str]]) -> Row:
    rows: list[Row] = []
    for i, p in enumerate(pools):
        active = i == 0 and not m.sleeping and bool(p["url"])
        host = p["url"].split("://", 1)[-1].rsplit(":", 1)[0] if active else ""
        rows.append(
            {
                "Accepted": m.accepted_shares if i == 0 else 0,
                "Best Share": 0.0,
                "Diff": "524K" if active else "",
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
                "Last Share Time": "0",
                "Long Poll": "N",
                "POOL": i,
                "Pool Rejected%": 0.0,
                "Pool Stale%%": 0.0,  # sic: the firmware's spelling
                "Priority": i,
                "Proxy": "",
                "Proxy Type": "",
                "Quota": 1,
                "Rejected": 0,
                "Remote Failures": 0,
                "Stale": 0,
                "Status": "Alive" if p["url"] else "Dead",
                "Stratum Active": active,
                "Stratum URL": host,
                "URL": p["url"],
                "User": p["user"],
            }
        )
    return reply(7, f"{len(rows)} Pool(s)", "POOLS", rows)


def rpc_stats(m: MinerState, now: float, address: str) -> Row:
    head = {
        "BMMiner": BMMINER_VERSION,
        "CompileTime": COMPILE_TIME,
        "Miner": MINER_VERSION,
        "Type": m.model.type_name,
    }
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    ideal = round(ideal_ghs(m, m.profile), 2)
    fans = fan_rpm(m, now)
    boards = m.model.boards
    rates = board_rates_ghs(m, now)
    freq = frequency_mhz(m)
    row: Row = {
        "Calls": 0,
        "Elapsed": int(now - m.boot_at),
        "GHS 5s": ghs,
        "GHS av": ghs,
        "ID": "BTM_SOC0",
        "Max": 0,
        "Min": 99999999,
        "Mode": 2,
        "STATS": 0,
        "Wait": 0,
    }
    chips = m.model.chips_per_board
    for b in range(1, MAX_BOARDS + 1):
        present = b <= boards
        row[f"chain_acn{b}"] = chips if present else 0
    for b in range(1, MAX_BOARDS + 1):
        row[f"chain_acs{b}"] = " ooo" * (chips // 3) if b <= boards else ""
    for b in range(1, MAX_BOARDS + 1):
        row[f"chain_hw{b}"] = 0
    for b in range(1, MAX_BOARDS + 1):
        row[f"chain_rate{b}"] = f"{rates[b - 1]:.2f}" if b <= boards else ""
    for i, rpm in enumerate(fans, start=1):
        row[f"fan{i}"] = rpm
    row["fan_num"] = len(fans)
    for b in range(1, MAX_BOARDS + 1):
        row[f"freq{b}"] = freq if b <= boards else 0
    row["frequency"] = freq
    row["miner_count"] = boards
    row["miner_id"] = serial(address).lower()
    row["miner_version"] = MINER_VERSION
    row["no_matching_work"] = 0
    row["rate_30m"] = ghs
    row["rate_unit"] = "GH"
    temps = [_board_temps(m, now, b) for b in range(1, boards + 1)]
    for b in range(1, boards + 1):
        row[f"temp{b}"] = max(temps[b - 1][0])
    for b in range(1, boards + 1):
        row[f"temp2_{b}"] = max(temps[b - 1][1])
    for b in range(1, MAX_BOARDS + 1):
        chip = temps[b - 1][1] if b <= boards else [0, 0, 0, 0]
        row[f"temp_chip{b}"] = "-".join(str(t) for t in chip)
    row["temp_max"] = 0
    row["temp_num"] = boards
    for b in range(1, MAX_BOARDS + 1):
        pcb = temps[b - 1][0] if b <= boards else [0, 0, 0, 0]
        row[f"temp_pcb{b}"] = "-".join(str(t) for t in pcb)
    for b in range(1, MAX_BOARDS + 1):
        pic = [t - PIC_BELOW_PCB_C for t in temps[b - 1][0]] if b <= boards else [0, 0, 0, 0]
        row[f"temp_pic{b}"] = "-".join(str(t) for t in pic)
    row["total rate"] = ghs
    row["total_acn"] = chips * boards
    row["total_freqavg"] = freq
    row["total_rateideal"] = float(ideal)
    return reply(70, "CGMiner stats", "STATS", [head, row])


# --- web (CGI) ---------------------------------------------------------------------------


def _web_status(msg: str) -> Row:
    return {"STATUS": "S", "when": int(time.time()), "Msg": msg, "api_version": WEB_API_VERSION}


def _web_info(m: MinerState) -> Row:
    return {"miner_version": MINER_VERSION, "CompileTime": COMPILE_TIME, "type": m.model.type_name}


def web_system_info(m: MinerState, address: str) -> Row:
    return {
        "dnsservers": "",
        "firmware_type": "Release",
        "gateway": "",
        "hostname": "Antminer",
        "ipaddress": address,
        "macaddr": mac(address),
        "minertype": m.model.type_name,
        "netdevice": "eth0",
        "netmask": "255.0.0.0",
        "nettype": "DHCP",
        "serinum": serial(address),
        "system_filesystem_version": FILESYSTEM_VERSION,
        "system_kernel_version": KERNEL_VERSION,
        "system_mode": "GNU/Linux",
    }


def web_network_info(address: str) -> Row:
    return {
        "nettype": "DHCP",
        "netdevice": "eth0",
        "macaddr": mac(address),
        "ipaddress": address,
        "netmask": "255.0.0.0",
        "conf_nettype": "DHCP",
        "conf_hostname": "Antminer",
        "conf_ipaddress": "",
        "conf_netmask": "",
        "conf_gateway": "",
        "conf_dnsservers": "",
    }


def web_miner_conf(m: MinerState, pools: list[dict[str, str]], work_mode: int) -> Row:
    return {
        "pools": [dict(p) for p in pools],
        "api-listen": True,
        "api-network": True,
        "api-groups": "A:stats:pools:devs:summary:version",
        "api-allow": "A:0/0,W:*",
        "bitmain-fan-ctrl": False,
        "bitmain-fan-pwm": "100",
        "bitmain-use-vil": True,
        "bitmain-freq": str(frequency_mhz(m)),
        "bitmain-voltage": str(int(m.model.profile(m.profile).voltage_v * 100)),
        "bitmain-ccdelay": "0",
        "bitmain-pwth": "0",
        "bitmain-work-mode": str(work_mode),
        "bitmain-freq-level": "100",
    }


def web_summary(m: MinerState, now: float) -> Row:
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    checks = [
        {"type": t, "status": "s", "code": 0, "msg": ""}
        for t in ("rate", "network", "fans", "temp")
    ]
    row = {
        "elapsed": int(now - m.boot_at),
        "rate_5s": ghs,
        "rate_30m": ghs,
        "rate_avg": ghs,
        "rate_ideal": round(ideal_ghs(m, m.profile), 2),
        "rate_unit": "GH/s",
        "hw_all": 0,
        "bestshare": 0,
        "status": checks,
    }
    return {"STATUS": _web_status("summary"), "INFO": _web_info(m), "SUMMARY": [row]}


def web_stats(m: MinerState, now: float, address: str, work_mode: int) -> Row:
    ghs = round(m.hashrate_ths(now) * 1000.0, 2)
    rates = board_rates_ghs(m, now)
    freq = frequency_mhz(m)
    ideal_board = ideal_ghs(m, m.profile) / m.model.boards
    chains = []
    for b in range(m.model.boards):
        pcb, chip = _board_temps(m, now, b + 1)
        chains.append(
            {
                "index": b,
                "freq_avg": freq,
                "rate_ideal": round(ideal_board, 2),
                "rate_real": round(rates[b], 2),
                "asic_num": m.model.chips_per_board,
                "asic": "o" * m.model.chips_per_board,
                "temp_pic": [t - PIC_BELOW_PCB_C for t in pcb],
                "temp_pcb": pcb,
                "temp_chip": chip,
                "hw": 0,
                "eeprom_loaded": True,
                "sn": serial(address, b),
                "hwp": 0.0,
            }
        )
    fans = fan_rpm(m, now)
    row = {
        "elapsed": int(now - m.boot_at),
        "rate_5s": ghs,
        "rate_30m": ghs,
        "rate_avg": ghs,
        "rate_ideal": round(ideal_ghs(m, m.profile), 2),
        "rate_unit": "GH/s",
        "chain_num": m.model.boards,
        "fan_num": len(fans),
        "fan": fans,
        "hwp_total": 0.0,
        "miner-mode": work_mode,
        "freq-level": 100,
        "chain": chains,
    }
    return {"STATUS": _web_status("stats"), "INFO": _web_info(m), "STATS": [row]}
