"""A fleet of simulated stock Antminers (Bitmain firmware) served from one process, plus its CLI.

Each miner listens on its own loopback address: the CGMiner-style RPC on port 4028 and the CGI
web API on port 80 behind HTTP digest auth (realm ``antMiner Configuration``, root/root by
default), because pyasic hard-codes both ports. Port 80 needs root (or a lowered
``net.ipv4.ip_unprivileged_port_start``). Unmodified pyasic 0.79 identifies a miner by the 401
on ``GET /`` and by ``version``'s ``Type``, and drives it as ``AntminerModern``:

- sleep and wake: ``set_miner_conf`` with ``miner-mode`` 1 (sleep), 0 (normal) or 3 (low power,
  here the highest profile at or below 80 % of the default power); ``get_miner_conf`` reports it
  as the string ``bitmain-work-mode``;
- no power reading anywhere (stock firmware has none);
- ``set_miner_conf`` answers after ``conf_delay_s`` (default 0.2 s; real firmware takes about
  20 s because it restarts bmminer). The change starts when the request arrives, as the
  firmware saves the config first. ``--conf-delay-s 20`` or the control op ``conf_delay``
  reproduces the slow answer; pyasic's 5 s web timeout then reports a failure although the
  change happens.

Faults (control op ``fault``) apply to both APIs: ``hang`` answers nothing, ``slow`` answers
after ``delay_s``, ``garbage`` answers bytes that are neither JSON nor HTTP, ``error`` answers
STATUS "E" on RPC and HTTP 500 on the web, ``ignore`` answers success but changes nothing,
``reboot`` closes both ports for ``delay_s`` and comes back in boot state.

Known differences from the recordings (``tests/test_sim_fidelity_antminer.py`` diffs the rest):

- ``GHS av``, ``GHS 30m``, ``rate_30m`` equal the instantaneous rate: the simulator keeps no
  history, so averages do not lag after a wake.
- Share counters, best share, difficulty totals and hardware errors stay at zero or grow only
  with ``accepted_shares``; pool stats (``Getworks``, ``Discarded``) are zero.
- ``chain_acs`` chip-status strings are all ``o`` (every chip healthy).
- ``devdetails`` is refused with code 14 "Invalid command", as on the S19 XP seen in the field.
- The RPC stats reply is valid JSON; old bmminer builds omit the comma between the two STATS
  rows (``}{``), which pyasic repairs, so it is not reproduced.
- bmminer's restart after ``set_miner_conf`` does not take the RPC down.
- ``get_system_info`` carries the simulator's own address, MAC (``02:42:4D:…``) and serial.
- Temperatures: four PCB sensors per board around the model's board temperature (inlet side
  about 17 °C below it, outlet side up to 9 °C above), chip sensors PCB + 5 °C and PIC sensors
  PCB - 10 °C, exactly the recording's pattern; the physics model's own chip temperature
  (``truth()["chip_c"]``) is not what the firmware shows.
- The web ``stats.cgi``/``summary.cgi`` shapes follow Bitmain's published examples (no
  recording of them exists in ``shared/data``); ``get_miner_conf``'s extra keys
  (``api-*``, ``bitmain-voltage``…) likewise.
- Digest nonces are stateless (an HMAC of their time) and valid for 5 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from simulators import antminer_replies as R
from simulators.common import (
    UNREADABLE,
    Connections,
    ControlOp,
    RpcConnection,
    SimFleet,
    close_listener,
    parse_delay_s,
    serve_faulted,
    serve_until_signal,
)
from simulators.luxos import fleet_addresses, raise_open_file_limit
from simulators.luxos_model import (
    MODELS,
    Clock,
    Fault,
    FaultKind,
    MinerState,
    ModelSpec,
    Timing,
)

RPC_PORT = 4028
WEB_PORT = 80
REALM = "antMiner Configuration"
DEFAULT_USER = "root"
DEFAULT_PASSWORD = "root"
DEFAULT_CONF_DELAY_S = 0.2
SLOW_CONF_DELAY_S = 20.0
NONCE_TTL_S = 300.0
MAX_HEAD_BYTES = 8192
MAX_BODY_BYTES = 65536
HTTP_IDLE_S = 30.0
MAX_FIELD_CHARS = 256

MODE_NORMAL = 0
MODE_SLEEP = 1
MODE_LOW = 3
LOW_POWER_SHARE = 0.8

GARBAGE_REPLY = b"\x15\x03\x01\x00\x02bmminer: segfault [[["
DEFAULT_POOLS = (
    {"url": "stratum+tcp://btc.global.luxor.tech:700", "user": "site.worker", "pass": "x"},
    {"url": "stratum+tcp://btc.global.luxor.tech:700", "user": "site.worker", "pass": "x"},
    {"url": "stratum+tcp://btc.global.luxor.tech:700", "user": "site.worker", "pass": "x"},
)

_AUTH_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


@dataclass(frozen=True, slots=True)
class AntminerSpec:
    """Where one simulated Antminer listens, what it is, and its web password."""

    address: str
    model: str = "s19jpro"
    rpc_port: int = RPC_PORT
    web_port: int = WEB_PORT
    password: str = DEFAULT_PASSWORD


def antminer_specs(
    n: int,
    base: str = "127.3.0.1",
    models: Sequence[str] = ("s19jpro", "s21"),
    password: str = DEFAULT_PASSWORD,
) -> list[AntminerSpec]:
    """``n`` Antminers on consecutive loopback addresses, models round-robin."""
    if not models:
        raise ValueError("at least one model is needed")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(sorted(MODELS))}")
    if not password or len(password) > MAX_FIELD_CHARS:
        raise ValueError(f"password must have 1 to {MAX_FIELD_CHARS} characters")
    return [
        AntminerSpec(address=a, model=models[i % len(models)], password=password)
        for i, a in enumerate(fleet_addresses(n, base))
    ]


def low_power_profile(model: ModelSpec) -> str:
    """The profile stock low-power mode runs: the highest at or below 80 % of default power."""
    cap = model.profile(model.default_profile).power_w * LOW_POWER_SHARE
    fitting = [p for p in model.profiles if p.power_w <= cap]
    if not fitting:
        return min(model.profiles, key=lambda p: p.power_w).name
    return max(fitting, key=lambda p: p.power_w).name


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@dataclass(slots=True)
class _HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _WebProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol for one web UI connection, counted in the miner's connections.

    ``asyncio.start_server`` would hide the protocol; this one reports its creation, so a client
    that connects while the miner closes is dropped, never served by a miner that is down.
    """

    def __init__(self, miner: AntminerEndpoint) -> None:
        self._connections = miner.connections
        self._connections.accepted()
        super().__init__(asyncio.StreamReader(limit=MAX_HEAD_BYTES), miner.http_client)
        self._tracked: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tracked = transport
        if self._connections.made(transport):  # else dropped: no handler starts
            super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tracked is not None:
            self._connections.lost(self._tracked)
        super().connection_lost(exc)


@dataclass(slots=True)
class AntminerEndpoint:
    """One simulated stock Antminer: RPC and web listeners plus its true state."""

    spec: AntminerSpec
    state: MinerState
    conf_delay_s: float = DEFAULT_CONF_DELAY_S
    work_mode: int = MODE_NORMAL
    pools: list[dict[str, str]] = field(default_factory=list)
    blink: bool = False
    connections: Connections = field(default_factory=Connections)  # RPC and web
    _rpc: asyncio.Server | None = None
    _web: asyncio.Server | None = None
    _web_tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _nonce_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    conf_writes: int = 0

    def __post_init__(self) -> None:
        self.pools = [dict(p) for p in DEFAULT_POOLS]

    # --- Endpoint protocol ------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def fault(self) -> Fault:
        return self.state.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.state.fault = value

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._rpc = await loop.create_server(
            lambda: RpcConnection(self),
            host=self.address,
            port=self.spec.rpc_port,
            reuse_address=True,
            backlog=512,
        )
        try:
            self._web = await loop.create_server(
                lambda: _WebProtocol(self),
                host=self.address,
                port=self.spec.web_port,
                reuse_address=True,
                backlog=512,
            )
        except BaseException:
            self._rpc.close()
            self._rpc = None
            raise
        self.connections.open()

    def close(self) -> None:
        for server in (self._rpc, self._web):
            if server is not None:
                close_listener(server)
        self._rpc = self._web = None
        self.connections.close()
        for task in list(self._web_tasks):
            task.cancel()  # a handler asleep in a slow answer must not outlive the miner
        self._web_tasks.clear()

    def reset(self) -> None:
        self.state.reset()
        self.work_mode = MODE_NORMAL
        self.pools = [dict(p) for p in DEFAULT_POOLS]
        self.blink = False

    def truth(self) -> dict[str, object]:
        out = self.state.truth()
        out.pop("atm_enabled", None)  # a LuxOS notion; stock firmware has no ATM
        out.update(
            {
                "family": "antminer",
                "work_mode": self.work_mode,
                "conf_delay_s": self.conf_delay_s,
                "conf_writes": self.conf_writes,
                "pools": [p["url"] for p in self.pools],
            }
        )
        return out

    # --- operating point --------------------------------------------------------------

    def apply_work_mode(self, mode: int) -> None:
        """What the firmware does with a saved ``miner-mode``."""
        self.work_mode = mode
        if mode == MODE_SLEEP:
            self.state.sleep()
            return
        model = self.state.model
        profile = low_power_profile(model) if mode == MODE_LOW else model.default_profile
        self.state.set_profile(profile)
        self.state.wake()

    # --- RPC --------------------------------------------------------------------------

    def on_request(self, request: object, conn: RpcConnection) -> None:
        serve_faulted(
            self.state.fault,
            conn,
            lambda ignore: self.rpc_answer(request),
            error_reply=R.encode(R.error_reply(45, "Access denied")),
            garbage_reply=GARBAGE_REPLY,
        )

    def rpc_answer(self, request: object) -> bytes:
        if request is UNREADABLE or not isinstance(request, dict):
            return R.encode(R.error_reply(23, "Invalid JSON"))
        command = request.get("command")
        if not isinstance(command, str) or not command:
            return R.encode(R.error_reply(14, "Missing JSON 'command'"))
        if "+" in command:
            subs = command.split("+")
            if len(subs) > 16:
                return R.encode(R.error_reply(14, "Too many commands"))
            doc: dict[str, Any] = {}
            for sub in subs:
                doc[sub] = [self._rpc_doc(sub)]
            doc["id"] = 1
            return R.encode(doc)
        return R.encode(self._rpc_doc(command))

    def _rpc_doc(self, command: str) -> dict[str, Any]:
        m = self.state
        now = m.clock()
        if command == "version":
            return R.rpc_version(m, now)
        if command == "summary":
            return R.rpc_summary(m, now)
        if command == "stats":
            return R.rpc_stats(m, now, self.address)
        if command == "devs":
            return R.rpc_devs(m, now)
        if command == "pools":
            return R.rpc_pools(m, now, self.pools)
        return R.error_reply(14, "Invalid command")

    # --- web --------------------------------------------------------------------------

    async def http_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._web_tasks.add(task)
        try:
            while True:
                request = await self._read_http(reader)
                if request is None:
                    break
                keep_alive = await self._serve_http(request, reader, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # Only close() cancels this handler task; asyncio's own done-callback would log a
            # cancelled client task as an error, so it ends quietly instead.
            pass
        finally:
            if task is not None:
                self._web_tasks.discard(task)
            writer.close()

    async def _read_http(self, reader: asyncio.StreamReader) -> _HttpRequest | None:
        try:
            async with asyncio.timeout(HTTP_IDLE_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except ValueError:  # LimitOverrunError: a head longer than MAX_HEAD_BYTES
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY_BYTES:
            return None
        body = b""
        if int(length_text):
            async with asyncio.timeout(HTTP_IDLE_S):
                body = await reader.readexactly(int(length_text))
        path = parts[1].split("?", 1)[0]
        return _HttpRequest(parts[0].upper(), path, headers, body)

    async def _serve_http(
        self, request: _HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        fault = self.state.fault
        keep_alive = request.headers.get("connection", "").lower() != "close"
        if fault.kind is FaultKind.HANG:
            await reader.read()  # silent until the client gives up or the miner closes
            return False
        if fault.kind is FaultKind.GARBAGE:
            writer.write(GARBAGE_REPLY)
            await writer.drain()
            return False
        if fault.kind is FaultKind.REBOOT:
            return False
        if not self._authorized(request):
            await self._respond(
                writer,
                401,
                b"<html><body>401 Unauthorized</body></html>",
                content_type="text/html",
                extra=[("WWW-Authenticate", self._challenge())],
            )
            return keep_alive
        if fault.kind is FaultKind.ERROR:
            await self._respond(
                writer,
                500,
                b"<html><body>500 Internal Error</body></html>",
                content_type="text/html",
            )
            return keep_alive
        ignore = fault.kind is FaultKind.IGNORE
        delay_s = fault.delay_s if fault.kind is FaultKind.SLOW else 0.0
        status, body = self._cgi(request, ignore)
        if request.path == "/cgi-bin/set_miner_conf.cgi":
            delay_s += self.conf_delay_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        ctype = "application/json" if body.startswith((b"{", b"[")) else "text/html"
        await self._respond(writer, status, body, content_type=ctype)
        return keep_alive

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        content_type: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error"}
        head = [
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Server: lighttpd/1.4.32",
        ]
        head += [f"{k}: {v}" for k, v in extra]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    def _challenge(self) -> str:
        stamp = f"{int(time.time()):x}"
        mac = hmac.new(self._nonce_key, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return (
            f'Digest realm="{REALM}", charset="UTF-8", nonce="{stamp}{mac}", qop="auth", '
            'algorithm="MD5"'
        )

    def _nonce_fresh(self, nonce: str) -> bool:
        stamp, mac = nonce[:-24], nonce[-24:]
        want = hmac.new(self._nonce_key, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        if not stamp or not hmac.compare_digest(mac, want):
            return False
        try:
            age_s = time.time() - int(stamp, 16)
        except ValueError:
            return False
        return 0 <= age_s <= NONCE_TTL_S

    def _authorized(self, request: _HttpRequest) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Digest "):
            return False
        params = {k: (q if q else b) for k, q, b in _AUTH_PARAM.findall(header[7:])}
        needed = ("username", "realm", "nonce", "uri", "response")
        if any(k not in params for k in needed) or params["realm"] != REALM:
            return False
        if params["username"] != DEFAULT_USER or not self._nonce_fresh(params["nonce"]):
            return False
        ha1 = _md5(f"{DEFAULT_USER}:{REALM}:{self.spec.password}")
        ha2 = _md5(f"{request.method}:{params['uri']}")
        if params.get("qop") == "auth":
            expected = _md5(
                f"{ha1}:{params['nonce']}:{params.get('nc', '')}:{params.get('cnonce', '')}"
                f":auth:{ha2}"
            )
        else:
            expected = _md5(f"{ha1}:{params['nonce']}:{ha2}")
        return hmac.compare_digest(expected, params["response"])

    def _cgi(self, request: _HttpRequest, ignore: bool) -> tuple[int, bytes]:
        m = self.state
        now = m.clock()
        path = request.path
        doc: dict[str, Any]
        if path in ("/", "/index.html"):
            return 200, b"<html><head><title>Antminer</title></head><body></body></html>"
        if path == "/cgi-bin/get_system_info.cgi":
            doc = R.web_system_info(m, self.address)
        elif path == "/cgi-bin/get_network_info.cgi":
            doc = R.web_network_info(self.address)
        elif path == "/cgi-bin/get_miner_conf.cgi":
            doc = R.web_miner_conf(m, self.pools, self.work_mode)
        elif path == "/cgi-bin/summary.cgi":
            doc = R.web_summary(m, now)
        elif path == "/cgi-bin/stats.cgi":
            doc = R.web_stats(m, now, self.address, self.work_mode)
        elif path == "/cgi-bin/get_blink_status.cgi":
            doc = {"blink": self.blink}
        elif path == "/cgi-bin/blink.cgi" and request.method == "POST":
            doc = self._blink(request.body, ignore)
        elif path == "/cgi-bin/set_miner_conf.cgi" and request.method == "POST":
            doc = self._set_miner_conf(request.body, ignore)
        else:
            return 404, b"<html><body>404 Not Found</body></html>"
        return 200, json.dumps(doc).encode()

    def _blink(self, body: bytes, ignore: bool) -> dict[str, Any]:
        try:
            conf = _json_object(body)
        except ValueError:
            return {"code": "B001"}
        on = conf.get("blink") in (True, "true")
        if not ignore:
            self.blink = on
        return {"code": "B000" if on else "B100"}

    def _set_miner_conf(self, body: bytes, ignore: bool) -> dict[str, Any]:
        try:
            conf = _json_object(body)
            mode = _parse_mode(conf.get("miner-mode", self.work_mode))
            pools = _parse_pools(conf.get("pools", self.pools))
        except ValueError as exc:
            return {"stats": "error", "code": "M001", "msg": str(exc)}
        if not ignore:
            self.conf_writes += 1
            self.pools = pools
            self.apply_work_mode(mode)
        return {"stats": "success", "code": "M000", "msg": "OK!"}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("body is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("body must be a JSON object")
    return doc


def _parse_mode(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"miner-mode must be 0, 1 or 3, got {value!r}")
    if isinstance(value, str) and value.isdigit() and len(value) < 3:
        value = int(value)
    if value not in (MODE_NORMAL, MODE_SLEEP, MODE_LOW):
        raise ValueError(f"miner-mode must be 0, 1 or 3, got {value!r}")
    assert isinstance(value, int)
    return value


def _parse_pools(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        raise ValueError("pools must be a list of 1 to 3 pools")
    pools: list[dict[str, str]] = []
    for p in value:
        if not isinstance(p, dict):
            raise ValueError("each pool must be an object with url, user and pass")
        row: dict[str, str] = {}
        for key in ("url", "user", "pass"):
            v = p.get(key, "")
            if not isinstance(v, str) or len(v) > MAX_FIELD_CHARS:
                raise ValueError(f"pool {key} must be a string of at most {MAX_FIELD_CHARS}")
            row[key] = v
        pools.append(row)
    while len(pools) < 3:
        pools.append({"url": "", "user": "", "pass": ""})
    return pools


class AntminerFleet(SimFleet[AntminerEndpoint]):
    """N simulated stock Antminers in this process."""

    family = "antminer"

    def __init__(
        self,
        specs: Sequence[AntminerSpec],
        *,
        clock: Clock = time.monotonic,
        timing: Timing | None = None,
        conf_delay_s: float = DEFAULT_CONF_DELAY_S,
    ) -> None:
        conf_delay_s = parse_delay_s(conf_delay_s, "conf_delay_s")
        timing = timing or Timing()
        endpoints = []
        for spec in specs:
            if spec.model not in MODELS:
                raise ValueError(f"unknown model {spec.model!r}; known: {', '.join(MODELS)}")
            state = MinerState(spec.address, MODELS[spec.model], clock, timing)
            endpoints.append(AntminerEndpoint(spec, state, conf_delay_s=conf_delay_s))
        super().__init__(endpoints)

    def set_conf_delay(self, address: str, delay_s: float) -> None:
        """How long ``set_miner_conf`` takes to answer on one miner (20 s is realistic)."""
        self.endpoint(address).conf_delay_s = parse_delay_s(delay_s, "delay_s")

    def control_ops(self) -> dict[str, ControlOp]:
        """Family control ops: ``conf_delay`` (``address``/``addresses``, ``delay_s``)."""

        def conf_delay(request: dict[str, object]) -> dict[str, object]:
            delay = parse_delay_s(request.get("delay_s"), "delay_s")
            raw = request["addresses"] if "addresses" in request else [request.get("address")]
            if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
                raise ValueError("addresses must be a list of addresses")
            for a in raw:
                self.endpoint(str(a))
            for a in raw:
                self.set_conf_delay(str(a), delay)
            return {"ok": True}

        return {"conf_delay": conf_delay}


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.antminer",
        description="Serve N simulated stock Antminers (RPC 4028 + web 80) on loopback addresses.",
    )
    p.add_argument("--miners", type=int, default=10, help="number of miners (default 10)")
    p.add_argument("--base", default="127.3.0.1", help="first address (default 127.3.0.1)")
    p.add_argument("--models", default="s19jpro,s21", help=f"round-robin, of {', '.join(MODELS)}")
    p.add_argument("--password", default=DEFAULT_PASSWORD, help="web password of user root")
    p.add_argument("--control-port", type=int, default=0, help="control port (0: pick one)")
    p.add_argument(
        "--conf-delay-s",
        type=float,
        default=DEFAULT_CONF_DELAY_S,
        help=f"set_miner_conf answer delay (real firmware: about {SLOW_CONF_DELAY_S:g})",
    )
    defaults = Timing()
    p.add_argument("--wake-ramp-s", type=float, default=defaults.wake_ramp_s)
    p.add_argument("--sleep-ramp-s", type=float, default=defaults.sleep_ramp_s)
    p.add_argument("--profile-ramp-s", type=float, default=defaults.profile_ramp_s)
    return p


async def run_fleet_cli(argv: list[str] | None = None) -> int:
    """``python -m simulators.antminer``: one JSON line per miner, a ``ready`` line, then serve."""
    args = _parser().parse_args(argv)
    try:
        models = [m for m in args.models.split(",") if m]
        specs = antminer_specs(args.miners, args.base, models, args.password)
        timing = Timing(
            parse_delay_s(args.wake_ramp_s, "wake-ramp-s"),
            parse_delay_s(args.sleep_ramp_s, "sleep-ramp-s"),
            parse_delay_s(args.profile_ramp_s, "profile-ramp-s"),
        )
        fleet = AntminerFleet(specs, timing=timing, conf_delay_s=args.conf_delay_s)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    rows = [
        {
            "address": s.address,
            "port": s.rpc_port,
            "web_port": s.web_port,
            "model": s.model,
            "family": "antminer",
        }
        for s in specs
    ]
    return await serve_until_signal(fleet, rows, args.control_port, fleet.control_ops())


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(run_fleet_cli(sys.argv[1:])))


if __name__ == "__main__":
    main()
