"""A fleet of simulated LuxOS miners served from one asyncio process, plus its CLI.

Each miner listens on its own loopback address (``127.x.y.z:4028``; all of 127/8 is loopback on
Linux) because pyasic hard-codes port 4028. The server speaks LuxOS RPC as LuxOS 2025.4.8 does
(replies diffed against recordings in ``tests/test_sim_fidelity_luxos.py``): one request per
connection, one reply, then close; JSON requests (a trailing NUL or newline is fine) or
cgminer's text form (``command|parameter``, answered in text); ``a+b`` multicommands; size
(8 KiB) and nesting (16 levels) caps checked before parsing. One session at a time (``logon``
is refused while another client holds it; it lapses after ``Timing.session_idle_s``, a minute
by default) guards ``curtail``, ``profileset`` (by name, by the documented ``THs``/``kW``/``W``
selectors, or the legacy board form) and ``atmset``. ATM steps a profile down when the boards
pass the hot temperature and back up to the chosen one when they cool. Faults are injected per
miner at run time.

In-process use (tests)::

    fleet = LuxosFleet(fleet_specs(10), clock=fake_clock)
    async with fleet:
        fleet.set_fault("127.1.0.3", Fault(FaultKind.HANG))

Out-of-process use: ``python -m simulators.luxos --miners 1000`` prints one JSON line per miner,
then a ``ready`` line with the control port; the control port takes one JSON object per line
(``{"op": "fault", "address": ..., "fault": "hang"}``, ``{"op": "state", "address": ...}``,
``{"op": "states"}``, ``{"op": "list"}``, ``{"op": "ambient", "address": ..., "ambient_c": 40}``)
and answers one JSON line.

Differences from the recordings (``../shared/data/fixtures/miners/asic-rs/luxminer/v1``) that
remain, and why:

* ``healthchipget`` (per-chip health) is not served: no controller decision uses it, and the
  simulator has no per-chip model.
* ``events`` answers an empty list: a healthy simulated miner has no events.
* The recorded S19k Pro reports ``POWER[0].PSU`` false while mining (its PSU is not one the
  firmware switches); the simulator reports true while mining and false asleep, when LuxOS
  turns the power supply off.
* Codes the documentation does not give are chosen here and kept stable: a refused ``logon``
  (318, "Another session is already active"), ``logoff`` (317), ``profileget`` (322),
  ``limits`` (326); ``Invalid session id`` keeps code 45.
* ``profileset`` while ATM is on is refused (pyasic turns ATM off around it, which suggests
  the firmware does); relative selectors (``+1``) are not parsed.
* Rates in windows (``GHS 1m``, ``MHS 15m``...) equal the current rate; ``GHS av``, ``GHS 30m``,
  ``MHS av`` and the ``chain_rateN`` strings are the since-start average (counted from boot or
  the last wake, as the mining process restarts); shares and difficulty follow work done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import resource
import secrets
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from simulators.common import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES
from simulators.common import Connections, EndpointFleet, close_listener, serve_until_signal
from simulators.luxos_model import (
    MODELS,
    PROFILE_DRAW_RATIO,
    Clock,
    Fault,
    FaultKind,
    MinerState,
    Timing,
)
from simulators.luxos_replies import (
    close_multi,
    close_single,
    error_body,
    ok_body,
    profile_body,
    read_body,
    session_body,
    voltage_body,
)

RPC_PORT = 4028
MAX_JSON_DEPTH = 16
MAX_MULTI = 16  # commands answered in one multicommand
TEXT_MODE = "_text"  # marks a request that came in cgminer's text form
# Codes the documentation does not give (a refused logon, logoff): chosen here, kept stable.
LOGON_REFUSED_CODE = 318
LOGOFF_CODE = 317
GARBAGE_REPLY = b"\x15\x03\x01\x00\x02<html>LUXminer: internal error [[["


@dataclass(frozen=True, slots=True)
class MinerSpec:
    """Where one simulated miner listens and what it is."""

    address: str
    model: str = "s19jpro"
    port: int = RPC_PORT


def fleet_addresses(n: int, base: str = "127.1.0.1") -> list[str]:
    """``n`` consecutive loopback addresses from ``base``, skipping .0 and .255 host octets."""
    if n < 0:
        raise ValueError(f"number of miners must be >= 0, got {n}")
    start = ipaddress.IPv4Address(base)
    if not start.is_loopback:
        raise ValueError(f"base address {base} is not in 127.0.0.0/8 (loopback)")
    out: list[str] = []
    current = int(start)
    while len(out) < n:
        addr = ipaddress.IPv4Address(current)
        if not addr.is_loopback:
            raise ValueError(f"{n} miners from {base} run past 127.255.255.254")
        if current & 0xFF not in (0, 255):
            out.append(str(addr))
        current += 1
    return out


def fleet_specs(
    n: int, base: str = "127.1.0.1", models: Sequence[str] = ("s19jpro", "s21")
) -> list[MinerSpec]:
    """``n`` miners on consecutive addresses, models assigned round-robin."""
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(sorted(MODELS))}")
    if not models:
        raise ValueError("at least one model is needed")
    return [
        MinerSpec(address=a, model=models[i % len(models)])
        for i, a in enumerate(fleet_addresses(n, base))
    ]


def _fail(code: int, msg: str) -> bytes:
    return close_single(error_body(code, msg))


def answer(m: MinerState, request: object, *, ignore_writes: bool = False) -> bytes:
    """The full reply bytes for one decoded request (no fault handling except IGNORE)."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return _fail(14, "Missing JSON 'command'")
    command: str = request["command"]
    raw_param = request.get("parameter")
    param = "" if raw_param is None else str(raw_param)
    now = m.clock()
    if "+" in command:
        parts: list[tuple[str, bytes]] = []
        for sub in command.split("+")[:MAX_MULTI]:
            body = read_body(m, sub, now)
            parts.append((sub, body if body is not None else error_body(14, "Invalid command")))
        reply = close_multi(parts)
    else:
        body = read_body(m, command, now)
        reply = close_single(body if body is not None else _write(m, command, param, ignore_writes))
    if request.get(TEXT_MODE):
        return to_text(reply)
    return reply


def to_text(reply: bytes) -> bytes:
    """A JSON reply in cgminer's text format (``STATUS=S,...|SECTION,k=v,...|``), NUL-ended."""
    doc = json.loads(reply)
    if "STATUS" not in doc:  # a multicommand: text mode has none, answer its first part
        first = next(v for k, v in doc.items() if k != "id")
        doc = first[0]
    status: list[str] = []
    rest: list[str] = []
    for name, rows in doc.items():
        if name == "id" or not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, dict):
                continue
            pairs = [f"{k}={v}" for k, v in row.items() if not isinstance(v, dict | list)]
            if name == "STATUS":
                flag = f"STATUS={row.get('STATUS', '')}"
                status.append(",".join([flag, *(p for p in pairs if not p.startswith("STATUS="))]))
            else:
                rest.append(",".join([name, *pairs]))
    return ("|".join(status + rest) + "|").encode() + b"\x00"


_CURTAIL_ACTIONS = {"sleep": "sleep mode", "wakeup": "wake up"}
_CURTAIL_OPTIONS = ("mode", "voltage_step", "frequency_step")


def _select_profile(m: MinerState, selector: str) -> str | None:
    """A profile name from a name or a documented selector (``THs``, ``kW``, ``W`` suffixes).

    A selector picks the profile whose estimate is nearest (the lower one on a tie).
    """
    names = [p.name for p in m.model.profiles]
    if selector in names:
        return selector
    if selector.endswith("THs"):
        number, attr, scale = selector[:-3], "hashrate_ths", 1.0
    elif selector.endswith("kW"):
        number, attr, scale = selector[:-2], "power_w", 1000.0
    elif selector.endswith("W"):
        number, attr, scale = selector[:-1], "power_w", 1.0
    else:
        return None
    try:
        value = float(number) * scale
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    best = min(m.model.profiles, key=lambda p: (abs(getattr(p, attr) - value), getattr(p, attr)))
    return best.name


def _write(m: MinerState, command: str, param: str, ignore: bool) -> bytes:
    now = m.clock()
    holder = m.session_holder(now)
    args = param.split(",") if param else []
    if command == "session":
        return session_body(holder)
    if command == "logon":
        if holder:
            # Only one session at a time: the holder keeps it until logoff or a minute idle.
            return error_body(LOGON_REFUSED_CODE, "Another session is already active")
        m.session_id = secrets.token_urlsafe(6)[:8]
        m.touch_session(now)
        return session_body(m.session_id, 316, "Session created")
    if command == "profileget":
        name = args[0] if args else ""
        try:
            return profile_body(m, name)
        except KeyError:
            return error_body(12, f"Profile {name!r} not found")
    if command == "voltageget":
        try:
            board = int(args[0]) if args else -1
        except ValueError:
            board = -1
        if not 0 <= board < m.model.boards:
            return error_body(12, f"Invalid board id {args[0] if args else ''!r}")
        return voltage_body(m, board)
    if command not in ("logoff", "curtail", "profileset", "atmset"):
        return error_body(14, f"Invalid command '{command}'")
    if not args or not holder or args[0] != holder:
        return error_body(45, "Invalid session id")
    m.touch_session(now)
    rest = args[1:]
    if command == "logoff":
        m.session_id = ""
        return ok_body(LOGOFF_CODE, "Session dropped")
    if command == "curtail":
        action = rest[0] if rest else ""
        extras = [kv.partition("=")[0] for kv in rest[1:]]
        if action not in _CURTAIL_ACTIONS or any(k not in _CURTAIL_OPTIONS for k in extras):
            return error_body(12, f"Invalid curtail parameters {','.join(rest)!r}")
        if ignore:
            pass
        elif action == "sleep":
            m.sleep()
        else:
            m.wake()
        return ok_body(
            335, "Curtailment command sent", "CURTAIL", {"Action": _CURTAIL_ACTIONS[action]}
        )
    if command == "profileset":
        # Legacy form: "<sid>,<board 0-3>,<profile>"; the profile still applies to all boards.
        if len(rest) == 2 and rest[0].isdigit() and 0 <= int(rest[0]) <= 3:
            rest = rest[1:]
        if len(rest) != 1 or not rest[0]:
            return error_body(12, "profileset needs one profile name or selector")
        selected = _select_profile(m, rest[0])
        if selected is None:
            return error_body(12, f"Profile {rest[0]!r} not found")
        name = selected
        if m.atm_enabled:
            return error_body(12, "Cannot set profile while ATM is enabled")
        if not ignore:
            m.set_profile(name)
        row = {"Board": 0, "FrequencyStep": 5, "Profile": name, "VoltageStep": 0.05}
        return ok_body(321, "Profile Set", "PROFILE", row)
    # atmset: key=value pairs; only "enabled" changes behaviour here.
    for kv in rest:
        key, _, value = kv.partition("=")
        if key == "enabled" and value in ("true", "false"):
            if not ignore:
                m.atm_enabled = value == "true"
        elif key not in (
            "startup_minutes",
            "post_ramp_minutes",
            "temp_window",
            "min_profile",
            "max_profile",
        ):
            return error_body(12, f"Invalid atmset parameter {kv!r}")
    return ok_body(339, "ATM configuration updated")


def json_depth_ok(data: bytes, limit: int) -> bool:
    """True when no JSON array/object nests deeper than ``limit`` (strings skipped).

    Checked before ``json.loads`` so a hostile request cannot drive the parser into deep
    recursion.
    """
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


class _Connection(asyncio.Protocol):
    """One RPC connection: read one request (JSON or text), answer once, close.

    A JSON request is complete when it parses (a trailing NUL or newline is tolerated); a
    request that does not start with ``{`` is cgminer's text form (``command|parameter``),
    complete at its first NUL or newline or at the end of the first read, as cgminer reads.
    Requests over ``MAX_REQUEST_BYTES`` or nested deeper than ``MAX_JSON_DEPTH`` are refused.
    """

    __slots__ = ("_buf", "_done", "_server", "_transport")

    def __init__(self, server: _MinerServer) -> None:
        self._server = server
        self._buf = b""
        self._done = False
        self._transport: asyncio.Transport | None = None
        server.connections.accepted()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.made(transport)  # dropped at once when not listening

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.connections.lost(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        if len(self._buf) > MAX_REQUEST_BYTES:
            self._finish_error(14, f"Request too long (over {MAX_REQUEST_BYTES} bytes)")
            return
        head = self._buf.lstrip()
        if not head:
            return
        if not head.startswith(b"{"):
            self._text(head)
            return
        ended = head.rstrip(b" \t\r\n\x00")
        if not json_depth_ok(ended, MAX_JSON_DEPTH):
            self._finish_error(14, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return
        try:
            request = json.loads(ended)
        except (ValueError, RecursionError):
            if head != head.rstrip(b"\x00") or head.endswith(b"\n"):
                self._finish_error(14, "Request is not JSON")
            return  # else wait for the rest of the document
        self._done = True
        self._server.handle(request, self)

    def _text(self, head: bytes) -> None:
        line = head.split(b"\x00", 1)[0].split(b"\n", 1)[0].strip()
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._finish_error(14, "Request is not text or JSON")
            return
        command, _, parameter = text.partition("|")
        self._done = True
        request: dict[str, object] = {"command": command, TEXT_MODE: True}
        if parameter:
            request["parameter"] = parameter
        self._server.handle(request, self)

    def _finish_error(self, code: int, msg: str) -> None:
        self._done = True
        self.send(_fail(code, msg))

    def eof_received(self) -> bool | None:
        if not self._done and self._buf.strip():
            self._finish_error(14, "Request is not JSON")
        return None

    def send(self, reply: bytes) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(reply)
            t.close()


class _MinerServer:
    """The listening socket and live connections of one simulated miner (a fleet endpoint)."""

    def __init__(self, spec: MinerSpec, state: MinerState) -> None:
        self.spec = spec
        self.state = state
        self.server: asyncio.Server | None = None
        self.connections = Connections()

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def fault(self) -> Fault:
        return self.state.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.state.fault = value

    def reset(self) -> None:
        self.state.reset()

    def truth(self) -> dict[str, object]:
        return self.state.truth()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self),
            host=self.spec.address,
            port=self.spec.port,
            reuse_address=True,
            backlog=512,
        )
        self.connections.open()

    def close(self) -> None:
        if self.server is not None:
            close_listener(self.server)
            self.server = None
        self.connections.close()

    def handle(self, request: object, conn: _Connection) -> None:
        fault = self.state.fault
        kind = fault.kind
        if kind is FaultKind.NONE:
            conn.send(answer(self.state, request))
        elif kind is FaultKind.HANG:
            pass  # keep the connection open and silent; close() or the client ends it
        elif kind is FaultKind.SLOW:
            loop = asyncio.get_running_loop()
            loop.call_later(fault.delay_s, lambda: conn.send(answer(self.state, request)))
        elif kind is FaultKind.GARBAGE:
            conn.send(GARBAGE_REPLY)
        elif kind is FaultKind.ERROR:
            conn.send(_fail(45, "Access denied"))
        elif kind is FaultKind.IGNORE:
            conn.send(answer(self.state, request, ignore_writes=True))
        else:  # REBOOT: the listener is closed, but a request may have raced it
            conn.send(b"")


class LuxosFleet(EndpointFleet[_MinerServer]):
    """N simulated LuxOS miners in this process. An async context manager, entered once."""

    def __init__(
        self,
        specs: Iterable[MinerSpec],
        *,
        clock: Clock = time.monotonic,
        timing: Timing | None = None,
        ambient_c: Clock | None = None,
        thermal_tau_s: float | None = None,
    ) -> None:
        """``ambient_c`` gives the site's air temperature (a hot afternoon); ``thermal_tau_s``
        overrides the models' thermal time constant (tests that cannot wait a minute)."""
        self._clock = clock
        self._timing = timing or Timing()
        servers: list[_MinerServer] = []
        for spec in specs:
            if spec.model not in MODELS:
                raise ValueError(f"unknown model {spec.model!r}; known: {', '.join(MODELS)}")
            state = MinerState(
                spec.address,
                MODELS[spec.model],
                clock,
                self._timing,
                profile_draw_ratio=PROFILE_DRAW_RATIO,
            )
            state.ambient, state.thermal_tau_s = ambient_c, thermal_tau_s
            servers.append(_MinerServer(spec, state))
        super().__init__(servers)

    @property
    def miners(self) -> dict[str, MinerState]:
        """True state of every miner, by address."""
        return {a: s.state for a, s in self._endpoints.items()}

    def set_ambient(self, address: str, ambient_c: float) -> None:
        """The air one miner breathes (a hot aisle makes ATM step its profile down); it
        replaces the site's ambient curve for this miner."""
        state = self.endpoint(address).state
        state.pcb_c()  # settle the thermal integral up to now
        state.ambient, state.ambient_c = None, ambient_c

    def set_hot_spot(self, address: str, extra_c: float) -> None:
        """This miner's intake runs ``extra_c`` hotter than the site's air."""
        if not math.isfinite(extra_c) or not -20.0 <= extra_c <= 40.0:
            raise ValueError(f"hot spot {extra_c} °C outside -20..40")
        state = self.endpoint(address).state
        state.pcb_c()  # settle the thermal integral up to now
        state.hot_spot_c = extra_c


# --- control endpoint --------------------------------------------------------------------


class ControlledFleet(Protocol):
    """What the control port needs of a fleet (LuxOS here, Braiins OS+ in simulators.braiins)."""

    @property
    def addresses(self) -> list[str]: ...

    def truth(self, address: str) -> dict[str, object]: ...

    def set_fault(
        self, address: str, fault: Fault | FaultKind | str, delay_s: float = 0.0
    ) -> None: ...

    def set_ambient(self, address: str, ambient_c: float) -> None: ...


MAX_FAULT_DELAY_S = 3600.0  # a longer fault is a typo; inf or NaN would hang a timer forever
_FAULT_KEYS = frozenset({"op", "fault", "address", "addresses", "delay_s"})


def _fault_request(fleet: ControlledFleet, request: dict[str, object]) -> tuple[list[str], Fault]:
    """Validate every field of a fault request before anything changes (ValueError if bad)."""
    unknown = sorted(str(k) for k in request if k not in _FAULT_KEYS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(_FAULT_KEYS)}")
    addresses = request.get("addresses", [request.get("address")])
    if not isinstance(addresses, list) or not addresses:
        raise ValueError("addresses must be a non-empty list")
    if not all(isinstance(a, str) for a in addresses):
        raise ValueError("every address must be a string")
    if len(set(addresses)) != len(addresses):
        raise ValueError("an address is listed twice")
    kind = request.get("fault")
    if not isinstance(kind, str):
        raise ValueError(f"fault must be one of {[k.value for k in FaultKind]}")
    delay_s = request.get("delay_s", 0.0)
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        raise ValueError(f"delay_s must be a number of seconds, got {delay_s!r}"[:120])
    if not math.isfinite(delay_s) or not 0 <= delay_s <= MAX_FAULT_DELAY_S:
        raise ValueError(f"delay_s must be 0 to {MAX_FAULT_DELAY_S:g} s, got {delay_s!r}")
    fault = Fault(FaultKind(kind), float(delay_s))
    for a in addresses:
        fleet.truth(a)  # every address known before any miner changes (KeyError)
    if fault.kind is FaultKind.REBOOT and not getattr(fleet, "_started", True):
        raise ValueError("a reboot needs a started fleet")
    return addresses, fault


def _control(fleet: ControlledFleet, request: object) -> dict[str, object]:
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    try:
        if op == "list":
            return {"ok": True, "miners": fleet.addresses}
        if op == "state":
            return {"ok": True, "state": fleet.truth(str(request.get("address")))}
        if op == "states":
            return {"ok": True, "states": [fleet.truth(a) for a in fleet.addresses]}
        if op == "ambient":
            value = request.get("ambient_c")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not -40.0 <= value <= 70.0
            ):
                return {"ok": False, "error": "ambient_c must be a number in [-40, 70]"}
            fleet.set_ambient(str(request.get("address")), float(value))
            return {"ok": True}
        if op == "fault":
            addresses, fault = _fault_request(fleet, request)
            for a in addresses:
                fleet.set_fault(a, fault)
            return {"ok": True}
    except (KeyError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)[:300]}
    return {
        "ok": False,
        "error": f"unknown op {str(op)[:40]!r}; known: list, state, states, fault, ambient",
    }


def _decode_request(line: bytes) -> object:
    """One control line as JSON: strict UTF-8, no NaN/Infinity, bounded nesting (ValueError)."""

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(line.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def serve_control(
    fleet: ControlledFleet, port: int, host: str = "127.0.0.1"
) -> asyncio.Server:
    """Serve the JSON-lines control endpoint for ``fleet``; returns the listening server."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = _control(fleet, _decode_request(line))
                except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
                    reply = {"ok": False, "error": f"not JSON: {exc}"[:300]}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: a line over the 1 MiB limit
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, host=host, port=port, limit=1 << 20)


async def control_request(
    port: int, request: dict[str, object], host: str = "127.0.0.1"
) -> dict[str, object]:
    """Send one request to a fleet's control endpoint and return its decoded answer."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError(f"control endpoint answered {line!r}")
    return reply


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.luxos",
        description="Serve N simulated LuxOS miners on consecutive loopback addresses.",
    )
    p.add_argument("--miners", type=int, default=10, help="number of miners (default 10)")
    p.add_argument("--base", default="127.1.0.1", help="first address (default 127.1.0.1)")
    p.add_argument(
        "--models",
        default="s19jpro,s21",
        help=f"comma-separated models, round-robin (known: {', '.join(MODELS)})",
    )
    p.add_argument("--control-port", type=int, default=0, help="control port (0: pick one)")
    defaults = Timing()
    p.add_argument("--wake-ramp-s", type=float, default=defaults.wake_ramp_s)
    p.add_argument("--sleep-ramp-s", type=float, default=defaults.sleep_ramp_s)
    p.add_argument("--profile-ramp-s", type=float, default=defaults.profile_ramp_s)
    return p


def raise_open_file_limit() -> None:
    """Lift the soft open-files limit to the hard one: each miner holds a listening socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_fleet_cli(argv: list[str] | None = None) -> int:
    """Entry point behind ``python -m simulators.luxos`` and ``site-agent sim``.

    Prints one JSON line per miner (``{"address", "port", "model"}``), then
    ``{"event": "ready", "miners": N, "control_port": P}``; serves until SIGINT/SIGTERM.
    Returns the process exit status (2 for bad arguments).
    """
    args = _parser().parse_args(argv)
    try:
        specs = fleet_specs(args.miners, args.base, [m for m in args.models.split(",") if m])
        timing = Timing(args.wake_ramp_s, args.sleep_ramp_s, args.profile_ramp_s)
        if min(timing.wake_ramp_s, timing.sleep_ramp_s, timing.profile_ramp_s) < 0:
            raise ValueError("ramp times must be >= 0")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    fleet = LuxosFleet(specs, timing=timing)
    rows = [{"address": s.address, "port": s.port, "model": s.model} for s in specs]
    return await serve_until_signal(
        fleet, rows, args.control_port, control=lambda port: serve_control(fleet, port)
    )


def main() -> None:
    sys.exit(asyncio.run(run_fleet_cli(sys.argv[1:])))


if __name__ == "__main__":
    main()
