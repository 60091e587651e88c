"""A fleet of simulated LuxOS miners served from one asyncio process, plus its CLI.

Each miner listens on its own loopback address (``127.x.y.z:4028``; all of 127/8 is loopback on
Linux) because pyasic hard-codes port 4028. The server speaks LuxOS RPC: one JSON request per
connection, one JSON reply, then close; ``a+b`` multicommands; sessions for privileged commands
(``curtail``, ``profileset``, ``atmset``). Faults are injected per miner at run time.

In-process use (tests)::

    fleet = LuxosFleet(fleet_specs(10), clock=fake_clock)
    async with fleet:
        fleet.set_fault("127.1.0.3", Fault(FaultKind.HANG))

Out-of-process use: ``python -m simulators.luxos --miners 1000`` prints one JSON line per miner,
then a ``ready`` line with the control port; the control port takes one JSON object per line
(``{"op": "fault", "address": ..., "fault": "hang"}``, ``{"op": "state", "address": ...}``,
``{"op": "states"}``, ``{"op": "list"}``) and answers one JSON line.
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
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from simulators.luxos_model import MODELS, Clock, Fault, FaultKind, MinerState, Timing
from simulators.luxos_replies import (
    close_multi,
    close_single,
    error_body,
    ok_body,
    read_body,
    session_body,
)

RPC_PORT = 4028
MAX_REQUEST_BYTES = 8192
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
        for sub in command.split("+"):
            body = read_body(m, sub, now)
            parts.append((sub, body if body is not None else error_body(14, "Invalid command")))
        return close_multi(parts)
    body = read_body(m, command, now)
    if body is not None:
        return close_single(body)
    return close_single(_write(m, command, param, ignore_writes))


def _write(m: MinerState, command: str, param: str, ignore: bool) -> bytes:
    if command == "session":
        return session_body(m.session_id)
    if command == "logon":
        if not m.session_id:
            m.session_id = secrets.token_hex(4)
        return session_body(m.session_id)
    args = param.split(",") if param else []
    if command not in ("logoff", "curtail", "profileset", "atmset"):
        return error_body(14, f"Invalid command '{command}'")
    if not args or not m.session_id or args[0] != m.session_id:
        return error_body(45, "Invalid session id")
    rest = args[1:]
    if command == "logoff":
        m.session_id = ""
        return ok_body(341, "Session closed")
    if command == "curtail":
        if rest not in (["sleep"], ["wakeup"]):
            return error_body(12, f"Invalid curtail mode {','.join(rest)!r}")
        if ignore:
            pass
        elif rest == ["sleep"]:
            m.sleep()
        else:
            m.wake()
        return ok_body(315, f"Curtail {rest[0]}")
    if command == "profileset":
        if len(rest) != 1:
            return error_body(12, "profileset needs one profile name")
        name = rest[0]
        try:
            m.model.profile(name)
        except KeyError:
            return error_body(12, f"Profile {name!r} not found")
        if m.atm_enabled:
            return error_body(12, "Cannot set profile while ATM is enabled")
        if not ignore:
            m.set_profile(name)
        return ok_body(329, "Profile set", "PROFILE", {"Profile": name, "Result": "success"})
    # atmset: key=value pairs; only "enabled" changes behaviour here.
    for kv in rest:
        key, _, value = kv.partition("=")
        if key == "enabled" and value in ("true", "false"):
            if not ignore:
                m.atm_enabled = value == "true"
        elif key not in ("startup_minutes", "post_ramp_minutes", "temp_window"):
            return error_body(12, f"Invalid atmset parameter {kv!r}")
    return ok_body(339, "ATM configuration updated")


class _Connection(asyncio.Protocol):
    """One RPC connection: read one JSON request, answer once, close."""

    __slots__ = ("_buf", "_done", "_server", "_transport")

    def __init__(self, server: _MinerServer) -> None:
        self._server = server
        self._buf = b""
        self._done = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        try:
            request = json.loads(self._buf)
        except ValueError:
            if len(self._buf) > MAX_REQUEST_BYTES:
                self._done = True
                self.send(_fail(14, "Request too long or not JSON"))
            return  # wait for the rest of the document
        self._done = True
        self._server.handle(request, self)

    def eof_received(self) -> bool | None:
        if not self._done and self._buf:
            self._done = True
            self.send(_fail(14, "Request is not JSON"))
        return None

    def send(self, reply: bytes) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(reply)
            t.close()


class _MinerServer:
    """The listening socket and live connections of one simulated miner."""

    def __init__(self, spec: MinerSpec, state: MinerState) -> None:
        self.spec = spec
        self.state = state
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Transport] = set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self),
            host=self.spec.address,
            port=self.spec.port,
            reuse_address=True,
            backlog=512,
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for t in list(self.connections):
            t.abort()
        self.connections.clear()

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


class LuxosFleet:
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
        self._servers: dict[str, _MinerServer] = {}
        for spec in specs:
            if spec.address in self._servers:
                raise ValueError(f"duplicate miner address {spec.address}")
            if spec.model not in MODELS:
                raise ValueError(f"unknown model {spec.model!r}; known: {', '.join(MODELS)}")
            state = MinerState(spec.address, MODELS[spec.model], clock, self._timing)
            state.ambient, state.thermal_tau_s = ambient_c, thermal_tau_s
            self._servers[spec.address] = _MinerServer(spec, state)
        self._started = False
        self._reboots: set[asyncio.Task[None]] = set()

    @property
    def miners(self) -> dict[str, MinerState]:
        """True state of every miner, by address."""
        return {a: s.state for a, s in self._servers.items()}

    @property
    def addresses(self) -> list[str]:
        return list(self._servers)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("LuxosFleet already started")
        self._started = True
        try:
            for s in self._servers.values():
                await s.open()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in list(self._reboots):
            task.cancel()
        for task in list(self._reboots):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for s in self._servers.values():
            s.close()
        # Let the loop process the closes so no transport outlives the fleet.
        await asyncio.sleep(0)

    async def __aenter__(self) -> LuxosFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _server(self, address: str) -> _MinerServer:
        try:
            return self._servers[address]
        except KeyError:
            raise KeyError(f"no simulated miner at {address}") from None

    def set_fault(self, address: str, fault: Fault | FaultKind | str, delay_s: float = 0.0) -> None:
        """Make one miner misbehave from now on (``FaultKind.NONE`` heals it)."""
        if not isinstance(fault, Fault):
            fault = Fault(FaultKind(fault), delay_s)
        if fault.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {fault.delay_s}")
        server = self._server(address)
        server.state.fault = fault
        if fault.kind is FaultKind.REBOOT:
            if not self._started:
                raise RuntimeError("a reboot needs a started fleet")
            server.close()
            task = asyncio.get_running_loop().create_task(self._reboot(server, fault.delay_s))
            self._reboots.add(task)
            task.add_done_callback(self._reboots.discard)

    async def _reboot(self, server: _MinerServer, downtime_s: float) -> None:
        await asyncio.sleep(downtime_s)
        server.state.reset()
        server.state.fault = Fault()
        await server.open()

    def truth(self, address: str) -> dict[str, object]:
        return self._server(address).state.truth()

    def set_hot_spot(self, address: str, extra_c: float) -> None:
        """This miner's intake runs ``extra_c`` hotter than the site's air."""
        if not math.isfinite(extra_c) or not -20.0 <= extra_c <= 40.0:
            raise ValueError(f"hot spot {extra_c} °C outside -20..40")
        state = self._server(address).state
        state.pcb_c()  # settle the thermal integral up to now
        state.hot_spot_c = extra_c


# --- control endpoint --------------------------------------------------------------------


MAX_FAULT_DELAY_S = 3600.0  # a longer fault is a typo; inf or NaN would hang a timer forever
_FAULT_KEYS = frozenset({"op", "fault", "address", "addresses", "delay_s"})


def _fault_request(fleet: LuxosFleet, request: dict[str, object]) -> tuple[list[str], Fault]:
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
        fleet._server(a)  # every address known before any miner changes
    if fault.kind is FaultKind.REBOOT and not fleet._started:
        raise ValueError("a reboot needs a started fleet")
    return addresses, fault


def _control(fleet: LuxosFleet, request: object) -> dict[str, object]:
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
        if op == "fault":
            addresses, fault = _fault_request(fleet, request)
            for a in addresses:
                fleet.set_fault(a, fault)
            return {"ok": True}
    except (KeyError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)[:300]}
    return {"ok": False, "error": f"unknown op {str(op)[:40]!r}; known: list, state, states, fault"}


def _decode_request(line: bytes) -> object:
    """One control line as JSON: strict UTF-8, no NaN/Infinity, bounded nesting (ValueError)."""

    def no_constants(name: str) -> object:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(line.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def serve_control(fleet: LuxosFleet, port: int, host: str = "127.0.0.1") -> asyncio.Server:
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with fleet:
            control = await serve_control(fleet, args.control_port)
            port = control.sockets[0].getsockname()[1]
            out = sys.stdout
            for s in specs:
                out.write(json.dumps({"address": s.address, "port": s.port, "model": s.model}))
                out.write("\n")
            out.write(json.dumps({"event": "ready", "miners": len(specs), "control_port": port}))
            out.write("\n")
            out.flush()
            try:
                await stop.wait()
            finally:
                control.close()
    except OSError as exc:
        print(f"error: cannot serve miners: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def main() -> None:
    sys.exit(asyncio.run(run_fleet_cli(sys.argv[1:])))


if __name__ == "__main__":
    main()
