"""A fleet of simulated MicroBT Whatsminers (btminer API v2) served from one process, plus its CLI.

Each miner listens on its own loopback address, port 4028, and speaks the btminer API exactly as
pyasic 0.79's ``BTMinerRPCAPI`` does (firmware ``20230803.11.REL``, before 2024.11, so pyasic
picks ``BTMinerV2``): one JSON request per connection, one reply, then close.

- Identification: ``version`` is refused (``{"STATUS": "E", "Code": 14, "Msg": "invalid cmd"}``,
  as real btminer does); ``devdetails`` carries ``"Driver": "bitmicro"``, which pyasic reads as a
  Whatsminer, and ``Model`` (``M30S+V40``, ``M60SVK30``) picks the class.
- Plain commands: ``summary``, ``devs``, ``pools``, ``devdetails``, ``a+b`` multicommands, and the
  flat ``get_version``, ``get_psu``, ``get_miner_info``, ``get_error_code``, ``status``.
- Privileged commands: ``get_token`` answers ``{"time", "salt", "newsalt"}``; the client sends
  ``{"enc": 1, "data": base64(AES-256-ECB(json))}`` with key ``sha256(md5crypt(password, salt))``
  and ``token = md5crypt(md5crypt(password, salt) + time, newsalt)``; the reply is
  ``{"enc": base64(AES(json))}``. Supported: ``power_off``, ``power_on``, ``adjust_power_limit``
  (0..99999 W; the miner draws ``min(limit, mode power)`` but never below its curve's floor),
  ``set_power_pct`` (0..100 % of the mode's power), ``set_low_power``, ``set_normal_power``,
  ``set_high_power``, ``update_pools`` (pyasic's ``send_config`` sends it first and gives up on
  the power mode if it fails), ``set_led``. A token lives 30 minutes; the last 16 issued are valid.
- Power reading present: ``summary`` ``Power`` (W) and ``Power Limit``.

Faults as for every family: ``hang``, ``slow`` (``delay_s``), ``garbage``, ``error`` (flat
``STATUS "E"`` code 45), ``ignore`` (privileged commands answer OK and change nothing),
``reboot`` (port closed for ``delay_s``, back in boot state: normal mode, default limit).

Known differences from the recordings (``tests/test_sim_fidelity_whatsminer.py`` diffs the rest):

- Averages (``MHS av``, ``MHS 15m``, ``MHS 5m``, ``MHS 1m``) equal the instantaneous rate.
- Share, error and work counters stay at zero or grow only with ``accepted_shares``.
- ``summary`` and ``devs`` are the union of the v1 and v2 recordings' keys (v2 adds
  ``Env Temp``, ``Factory GHS`` and ``Frequency``); the flat commands follow v2.
- ``get_miner_info`` adds ``minersn`` (pyasic reads the serial number there).
- No web UI on port 80/443: real firmware redirects to its LuCI page, which pyasic never needs.
- Every bad token, wrong password or undecryptable payload answers code 135
  ``check token err``; real firmware distinguishes some of these cases.
- While powered off the API keeps answering with zero hashrate and standby power.
- Temperatures: each board's chips read board + 1 (min), + 13 (avg) and + 20 °C (max), the
  v1 recording's pattern at full load, whatever the load; the physics model's own chip
  temperature (``truth()["chip_c"]``) is not what the firmware shows.
- Tokens live in memory: a reboot forgets them (pyasic keeps its cached token for 30 minutes,
  so every privileged command fails after a reboot until the client asks for a new token).
- The salt is fixed per miner for the life of the process, as the firmware derives it from the
  password; ``time`` is the last four digits of the epoch, as recorded in MicroBT's examples.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import secrets
import string
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from simulators import whatsminer_replies as W
from simulators.common import (
    UNREADABLE,
    Connections,
    RpcConnection,
    SimFleet,
    close_listener,
    parse_delay_s,
    serve_faulted,
    serve_until_signal,
)
from simulators.luxos import fleet_addresses, raise_open_file_limit
from simulators.luxos_model import Clock, Fault, Timing
from simulators.whatsminer_replies import WHATSMINER_MODELS, WhatsminerState

RPC_PORT = 4028
DEFAULT_PASSWORD = "admin"
TOKEN_TTL_S = 1800.0
MAX_TOKENS = 16
MAX_SUBCOMMANDS = 16
GARBAGE_REPLY = b"\x15\x03\x01\x00\x02btminer: \xff\xfe internal error {{{"
_SALT_CHARS = string.ascii_letters + string.digits
_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_POOLS = (
    {"url": "stratum+tcp://btc.global.luxor.tech:700", "user": "site.worker"},
    {"url": "stratum+tcp://btc.global.luxor.tech:700", "user": "site.worker"},
    {"url": "", "user": ""},
)


def md5_crypt(password: str, salt: str) -> str:
    """The hash part of ``$1$salt$hash`` (FreeBSD MD5-crypt), as btminer derives its keys.

    Written from the algorithm's description so the simulator checks pyasic independently.
    """
    pw = password.encode()
    sb = salt.encode()[:8]
    final = hashlib.md5(pw + sb + pw).digest()
    ctx = hashlib.md5(pw + b"$1$" + sb)
    n = len(pw)
    while n > 0:
        ctx.update(final[: min(16, n)])
        n -= 16
    i = len(pw)
    while i:
        ctx.update(b"\x00" if i & 1 else pw[:1])
        i >>= 1
    digest = ctx.digest()
    for r in range(1000):
        step = hashlib.md5()
        step.update(pw if r & 1 else digest)
        if r % 3:
            step.update(sb)
        if r % 7:
            step.update(pw)
        step.update(digest if r & 1 else pw)
        digest = step.digest()
    out = []
    for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        v = (digest[a] << 16) | (digest[b] << 8) | digest[c]
        for _ in range(4):
            out.append(_ITOA64[v & 0x3F])
            v >>= 6
    v = digest[11]
    for _ in range(2):
        out.append(_ITOA64[v & 0x3F])
        v >>= 6
    return "".join(out)


def _aes(key_source: str) -> Cipher[modes.ECB]:
    key = binascii.unhexlify(hashlib.sha256(key_source.encode()).hexdigest())
    return Cipher(algorithms.AES(key), modes.ECB())


def encrypt_reply(key_source: str, doc: dict[str, Any]) -> bytes:
    plain = json.dumps(doc, separators=(",", ":")).encode()
    plain += b"\x00" * (-len(plain) % 16)
    enc = _aes(key_source).encryptor()
    data = base64.b64encode(enc.update(plain) + enc.finalize()).decode()
    return json.dumps({"enc": data}).encode()


@dataclass(frozen=True, slots=True)
class WhatsminerSpec:
    """Where one simulated Whatsminer listens, what it is, and its admin password."""

    address: str
    model: str = "m30s+v40"
    port: int = RPC_PORT
    password: str = DEFAULT_PASSWORD


def whatsminer_specs(
    n: int,
    base: str = "127.4.0.1",
    models: Sequence[str] = ("m30s+v40", "m60svk30"),
    password: str = DEFAULT_PASSWORD,
) -> list[WhatsminerSpec]:
    """``n`` Whatsminers on consecutive loopback addresses, models round-robin."""
    if not models:
        raise ValueError("at least one model is needed")
    for m in models:
        if m not in WHATSMINER_MODELS:
            known = ", ".join(sorted(WHATSMINER_MODELS))
            raise ValueError(f"unknown model {m!r}; known: {known}")
    if not password or len(password) > 64:
        raise ValueError("password must have 1 to 64 characters")
    return [
        WhatsminerSpec(address=a, model=models[i % len(models)], password=password)
        for i, a in enumerate(fleet_addresses(n, base))
    ]


def _random(n: int) -> str:
    return "".join(secrets.choice(_SALT_CHARS) for _ in range(n))


@dataclass(slots=True)
class WhatsminerEndpoint:
    """One simulated Whatsminer: its RPC listener, true state and privileged-API secrets."""

    spec: WhatsminerSpec
    state: WhatsminerState
    connections: Connections = field(default_factory=Connections)
    pools: list[dict[str, str]] = field(default_factory=list)
    led_auto: bool = True
    salt: str = field(default_factory=lambda: _random(8))
    # host_sign -> monotonic expiry; oldest first so the 17th token evicts the first.
    tokens: OrderedDict[str, float] = field(default_factory=OrderedDict)
    privileged_ok: int = 0
    _server: asyncio.Server | None = None
    _key_source: str = ""

    def __post_init__(self) -> None:
        self.pools = [dict(p) for p in DEFAULT_POOLS]

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def fault(self) -> Fault:
        return self.state.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.state.fault = value

    @property
    def key_source(self) -> str:
        """``md5crypt(password, salt)``: what both sides hash into the AES key."""
        if not self._key_source:  # 1,000 MD5 rounds: compute once per password and salt
            self._key_source = md5_crypt(self.spec.password, self.salt)
        return self._key_source

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: RpcConnection(self),
            host=self.address,
            port=self.spec.port,
            reuse_address=True,
            backlog=512,
        )
        self.connections.open()

    def close(self) -> None:
        if self._server is not None:
            close_listener(self._server)
            self._server = None
        self.connections.close()

    def reset(self) -> None:
        self.state.reset()
        self.tokens.clear()
        self.led_auto = True

    def truth(self) -> dict[str, object]:
        out = self.state.truth()
        out.pop("atm_enabled", None)
        out.update(
            {
                "family": "whatsminer",
                "power_mode": out.pop("profile"),
                "power_limit_w": self.state.power_limit_w,
                "privileged_ok": self.privileged_ok,
            }
        )
        return out

    # --- requests -----------------------------------------------------------------------

    def on_request(self, request: object, conn: RpcConnection) -> None:
        serve_faulted(
            self.state.fault,
            conn,
            lambda ignore: self.answer(request, ignore),
            error_reply=json.dumps(W.flat(45, "Permission denied", ok=False)).encode(),
            garbage_reply=GARBAGE_REPLY,
        )

    def answer(self, request: object, ignore: bool = False) -> bytes:
        if request is UNREADABLE or not isinstance(request, dict):
            return _dump(W.flat(23, "invalid json message", ok=False))
        if "enc" in request:
            return self._privileged(request, ignore)
        command = request.get("command")
        if not isinstance(command, str) or not command:
            if isinstance(request.get("cmd"), str):
                return _dump(W.flat(45, "Permission denied", ok=False))
            return _dump(W.flat(14, "invalid cmd", ok=False))
        if "+" in command:
            subs = command.split("+")
            if len(subs) > MAX_SUBCOMMANDS:
                return _dump(W.flat(14, "invalid cmd", ok=False))
            doc: dict[str, Any] = {sub: [self._plain(sub)] for sub in subs}
            doc["id"] = 1
            return _dump(doc)
        return _dump(self._plain(command))

    def _plain(self, command: str) -> dict[str, Any]:
        m = self.state
        now = m.clock()
        if command == "summary":
            return W.summary(m, now, self.address)
        if command == "devs":
            return W.devs(m, now, self.address)
        if command == "edevs":
            return W.devs(m, now, self.address)
        if command == "devdetails":
            return W.devdetails(m)
        if command == "pools":
            return W.pools(m, self.pools)
        if command == "get_version":
            return W.get_version()
        if command == "get_psu":
            return W.get_psu(m, now)
        if command == "get_miner_info":
            return W.get_miner_info(self.address, self.led_auto)
        if command == "get_error_code":
            return W.get_error_code()
        if command == "status":
            return W.status(m)
        if command == "get_token":
            return self._issue_token()
        return W.flat(14, "invalid cmd", ok=False)

    def _issue_token(self) -> dict[str, Any]:
        stamp = f"{int(time.time()) % 10000:04d}"
        newsalt = _random(8)
        sign = md5_crypt(self.key_source + stamp, newsalt)
        now = time.monotonic()
        for old, expiry in list(self.tokens.items()):
            if expiry < now:
                del self.tokens[old]
        self.tokens[sign] = now + TOKEN_TTL_S
        while len(self.tokens) > MAX_TOKENS:
            self.tokens.popitem(last=False)
        return W.flat(134, {"time": stamp, "salt": self.salt, "newsalt": newsalt})

    def _decrypt(self, request: dict[str, Any]) -> dict[str, Any] | None:
        data = request.get("data")
        if not isinstance(data, str) or len(data) > 8192:
            return None
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None
        if not raw or len(raw) % 16:
            return None
        dec = _aes(self.key_source).decryptor()
        plain = (dec.update(raw) + dec.finalize()).rstrip(b"\x00")
        try:
            doc = json.loads(plain)
        except (ValueError, RecursionError):
            return None
        return doc if isinstance(doc, dict) else None

    def _privileged(self, request: dict[str, Any], ignore: bool) -> bytes:
        doc = self._decrypt(request)
        token = doc.get("token") if doc is not None else None
        expiry = self.tokens.get(token) if isinstance(token, str) else None
        if doc is None or expiry is None or expiry < time.monotonic():
            return _dump(W.flat(135, "check token err", ok=False))
        cmd = doc.get("cmd")
        result = self._execute(cmd if isinstance(cmd, str) else "", doc, ignore)
        if result["STATUS"] == "S" and not ignore:
            self.privileged_ok += 1
        return encrypt_reply(self.key_source, result)

    def _execute(self, cmd: str, doc: dict[str, Any], ignore: bool) -> dict[str, Any]:
        m = self.state
        ok = W.flat(131, "API command OK")
        bad = W.flat(14, "invalid cmd", ok=False)
        if cmd == "power_off":
            if doc.get("respbefore", "true") not in ("true", "false"):
                return W.flat(132, "respbefore must be true or false", ok=False)
            if not ignore:
                m.sleep()
            return ok
        if cmd == "power_on":
            if not ignore:
                m.wake()
            return ok
        if cmd == "adjust_power_limit":
            limit = _int_param(doc.get("power_limit"), 0, W.MAX_POWER_LIMIT_W)
            if limit is None:
                return W.flat(132, "power_limit must be an integer in 0..99999", ok=False)
            if not ignore:
                m.set_power_limit(limit)
            return ok
        if cmd == "set_power_pct":
            pct = _int_param(doc.get("percent"), 0, 100)
            if pct is None:
                return W.flat(132, "percent must be an integer in 0..100", ok=False)
            if not ignore:
                mode_w = m.model.profile(m.profile).power_w
                m.set_power_limit(round(mode_w * pct / 100))
            return ok
        modes_by_cmd = {
            "set_low_power": "low",
            "set_normal_power": "normal",
            "set_high_power": "high",
        }
        if cmd in modes_by_cmd:
            if not ignore:
                m.set_profile(modes_by_cmd[cmd])
            return ok
        if cmd == "update_pools":
            pools = []
            for i in (1, 2, 3):
                url, user = doc.get(f"pool{i}") or "", doc.get(f"worker{i}") or ""
                if not isinstance(url, str) or not isinstance(user, str):
                    return W.flat(132, f"pool{i} and worker{i} must be strings", ok=False)
                if len(url) > 256 or len(user) > 256:
                    return W.flat(132, f"pool{i} or worker{i} too long", ok=False)
                pools.append({"url": url, "user": user})
            if not ignore:
                self.pools = pools
            return ok
        if cmd == "set_led":
            if not ignore:
                self.led_auto = doc.get("param") == "auto"
            return ok
        return bad


def _int_param(value: object, lo: int, hi: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 6:
        value = int(value)
    if isinstance(value, int) and lo <= value <= hi:
        return value
    return None


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class WhatsminerFleet(SimFleet[WhatsminerEndpoint]):
    """N simulated Whatsminers in this process."""

    family = "whatsminer"

    def __init__(
        self,
        specs: Sequence[WhatsminerSpec],
        *,
        clock: Clock = time.monotonic,
        timing: Timing | None = None,
    ) -> None:
        timing = timing or Timing()
        endpoints = []
        for spec in specs:
            model = WHATSMINER_MODELS.get(spec.model)
            if model is None:
                known = ", ".join(WHATSMINER_MODELS)
                raise ValueError(f"unknown model {spec.model!r}; known: {known}")
            state = WhatsminerState(spec.address, model, clock, timing)
            endpoints.append(WhatsminerEndpoint(spec, state))
        super().__init__(endpoints)


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.whatsminer",
        description="Serve N simulated Whatsminers (btminer API v2, port 4028) on loopback.",
    )
    p.add_argument("--miners", type=int, default=10, help="number of miners (default 10)")
    p.add_argument("--base", default="127.4.0.1", help="first address (default 127.4.0.1)")
    p.add_argument(
        "--models",
        default="m30s+v40,m60svk30",
        help=f"round-robin, of {', '.join(WHATSMINER_MODELS)}",
    )
    p.add_argument("--password", default=DEFAULT_PASSWORD, help="admin password (privileged API)")
    p.add_argument("--control-port", type=int, default=0, help="control port (0: pick one)")
    defaults = Timing()
    p.add_argument("--wake-ramp-s", type=float, default=defaults.wake_ramp_s)
    p.add_argument("--sleep-ramp-s", type=float, default=defaults.sleep_ramp_s)
    p.add_argument("--profile-ramp-s", type=float, default=defaults.profile_ramp_s)
    return p


async def run_fleet_cli(argv: list[str] | None = None) -> int:
    """``python -m simulators.whatsminer``: one JSON line per miner, a ``ready`` line, serve."""
    args = _parser().parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        specs = whatsminer_specs(args.miners, args.base, models, args.password)
        timing = Timing(
            parse_delay_s(args.wake_ramp_s, "wake-ramp-s"),
            parse_delay_s(args.sleep_ramp_s, "sleep-ramp-s"),
            parse_delay_s(args.profile_ramp_s, "profile-ramp-s"),
        )
        fleet = WhatsminerFleet(specs, timing=timing)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    rows = [
        {"address": s.address, "port": s.port, "model": s.model, "family": "whatsminer"}
        for s in specs
    ]
    return await serve_until_signal(fleet, rows, args.control_port)


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(run_fleet_cli(sys.argv[1:])))


if __name__ == "__main__":
    main()
