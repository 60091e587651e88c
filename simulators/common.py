"""Machinery every protocol-level miner simulator shares: fault dispatch, fleets, control port, CLI.

A family simulator (``antminer.py``, ``whatsminer.py``) supplies one *endpoint* per miner: the
listening sockets of one address and the miner's true state. This module runs many endpoints in
one process, injects faults (``hang``, ``slow``, ``garbage``, ``error``, ``ignore``, ``reboot``,
``none``, the kinds of :class:`~simulators.luxos_model.FaultKind`), serves the JSON-lines control
port (``fault``, ``state``, ``states``, ``list`` and family ops) and the CLI's output. The fleet
machinery (:class:`EndpointFleet`: start, stop, reboots) is also the base of the LuxOS and Braiins
OS+ fleets, which keep their own control port. Addresses, the open-files limit and the control
client come from ``simulators.luxos`` so the families cannot drift apart.

Every control field is validated before anything changes: one bad request never touches any
miner, and a delay is a finite number of seconds in ``[0, MAX_DELAY_S]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from simulators.luxos_model import Fault, FaultKind

# One request bound for every family (``simulators.luxos`` re-exports it).
MAX_REQUEST_BYTES = 8192

MAX_DELAY_S = 3600.0
MAX_CONTROL_LINE_BYTES = 1 << 20
# Enough for any fleet this machine can hold; bounds the work one control request can cause.
MAX_ADDRESSES_PER_REQUEST = 100_000


def parse_delay_s(value: object, name: str = "delay_s") -> float:
    """A delay from untrusted input: a real number of seconds, finite, in ``[0, MAX_DELAY_S]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    delay = float(value)
    if not math.isfinite(delay) or not 0.0 <= delay <= MAX_DELAY_S:
        raise ValueError(f"{name} must be finite and within [0, {MAX_DELAY_S:g}] s, got {value!r}")
    return delay


def parse_fault(kind: object, delay_s: object = 0.0) -> Fault:
    """A :class:`Fault` from untrusted input, or ``ValueError`` naming the bad field."""
    known = ", ".join(k.value for k in FaultKind)
    if not isinstance(kind, str):
        raise ValueError(f"fault must be one of {known}, got {kind!r}")
    try:
        fault_kind = FaultKind(kind)
    except ValueError:
        raise ValueError(f"fault must be one of {known}, got {kind!r}") from None
    return Fault(fault_kind, parse_delay_s(delay_s))


# --- one RPC connection ------------------------------------------------------------------


class Connections:
    """The live connections of one miner's listeners, and those still being accepted.

    asyncio accepts a connection in a task of its own: a client that connects just before a
    listener closes gets its transport *after* ``close()`` ran, so a plain set of transports
    misses it, and it stays open (a reboot that still answers, a socket left for the garbage
    collector). Protocols report their creation (``accepted``) and ``made``; a connection made
    while the miner is not listening is dropped at once, and ``settled`` tells the fleet's stop
    when nothing is left in flight.
    """

    __slots__ = ("_accepting", "_closing", "_live", "listening")

    def __init__(self) -> None:
        self.listening = False
        self._live: set[asyncio.BaseTransport] = set()
        self._closing: set[asyncio.BaseTransport] = set()
        self._accepting = 0

    def accepted(self) -> None:
        """A protocol was created for an accepted socket (its transport comes next)."""
        self._accepting += 1

    def made(self, transport: asyncio.BaseTransport) -> bool:
        """The transport exists; False (and dropped) when the miner stopped listening."""
        self._accepting = max(0, self._accepting - 1)
        if not self.listening:
            self._abort(transport)
            return False
        self._live.add(transport)
        return True

    def lost(self, transport: asyncio.BaseTransport) -> None:
        self._live.discard(transport)
        self._closing.discard(transport)

    def open(self) -> None:
        self.listening = True

    def close(self) -> None:
        """Stop accepting and drop every live connection now."""
        self.listening = False
        for t in list(self._live):
            self._abort(t)
        self._live.clear()

    def _abort(self, transport: asyncio.BaseTransport) -> None:
        self._closing.add(transport)  # until its connection_lost runs
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()

    @property
    def accepting(self) -> int:
        """Connections accepted whose transport has not reported yet."""
        return self._accepting

    @property
    def settled(self) -> bool:
        """Nothing accepted-but-not-made, live, or aborted-but-not-yet-lost."""
        return self._accepting == 0 and not self._live and not self._closing

    def __len__(self) -> int:
        return len(self._live)


def close_listener(server: asyncio.AbstractServer) -> None:
    """Stop a listener now without racing asyncio's accept tasks (CPython 3.11).

    ``Server.close()`` between asyncio accepting a socket and building its transport (the
    next loop turn) makes that transport fail in ``Server._attach``, an ``AssertionError``
    asyncio logs only in debug mode, and the half-built transport keeps its socket until the
    garbage collector warns "unclosed transport". So, now: the listening sockets are no longer
    read and are shut down (Linux then refuses new connections and resets those waiting in the
    backlog, as a miner that went down does); and one loop turn later, after the accept tasks
    already scheduled have built their transports (which :class:`Connections` drops at once),
    the server closes.
    """
    stop_accepting(server)
    asyncio.get_running_loop().call_soon(server.close)


def stop_accepting(server: asyncio.AbstractServer) -> None:
    """The first half of :func:`close_listener`: no accept from now on, refused at once."""
    loop = asyncio.get_running_loop()
    if isinstance(server, asyncio.Server):
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class RpcServer(Protocol):
    """What an :class:`RpcConnection` needs from the miner it belongs to."""

    connections: Connections

    def on_request(self, request: object, conn: RpcConnection) -> None:
        """Answer one request; ``request`` is the decoded JSON, or ``UNREADABLE``."""


# The longest a fleet's stop waits for its closing connections to let go of their sockets.
STOP_SETTLE_S = 2.0


class _Unreadable:
    """Marks a request that is not JSON, too long or too deep."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREADABLE"


UNREADABLE = _Unreadable()


def decode_request(raw: bytes) -> object:
    """One JSON request as CGMiner-style clients send it; a trailing NUL or newline is fine.

    Raises ``ValueError`` while the document may still be incomplete; a document nested too
    deep for the parser becomes ``UNREADABLE`` rather than a ``RecursionError``.
    """
    text = raw.rstrip(b"\x00\r\n\t ")
    try:
        return json.loads(text)
    except RecursionError:
        return UNREADABLE


class RpcConnection(asyncio.Protocol):
    """One TCP connection of the CGMiner-style RPC: one JSON request, one reply, then close."""

    __slots__ = ("_buf", "_done", "_server", "_timer", "_transport")

    def __init__(self, server: RpcServer) -> None:
        self._server = server
        self._buf = b""
        self._done = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        server.connections.accepted()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.made(transport)  # dropped at once when not listening

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()  # a slow answer for a client that left is never sent
            self._timer = None
        if self._transport is not None:
            self._server.connections.lost(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        if len(self._buf) > MAX_REQUEST_BYTES:
            self._finish(UNREADABLE)
            return
        try:
            request = decode_request(self._buf)
        except ValueError:
            return  # wait for the rest of the document (or EOF)
        self._finish(request)

    def eof_received(self) -> bool | None:
        if not self._done and self._buf:
            try:
                request = decode_request(self._buf)
            except ValueError:
                request = UNREADABLE
            self._finish(request)
        # Keep our half open while a reply is owed (slow fault); otherwise close as usual.
        return True if self._done else None

    def _finish(self, request: object) -> None:
        self._done = True
        self._server.on_request(request, self)

    def send(self, reply: bytes) -> None:
        """Write ``reply`` (possibly empty) and close the connection."""
        t = self._transport
        if t is not None and not t.is_closing():
            if reply:
                t.write(reply)
            t.close()

    def send_later(self, delay_s: float, make_reply: Callable[[], bytes]) -> None:
        """Answer after ``delay_s``, computing the reply then (the state may have moved)."""
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            self.send(make_reply())

        self._timer = loop.call_later(delay_s, fire)


def serve_faulted(
    fault: Fault,
    conn: RpcConnection,
    answer: Callable[[bool], bytes],
    *,
    error_reply: bytes,
    garbage_reply: bytes,
) -> None:
    """Answer through ``fault``; ``answer(ignore_writes)`` builds the correct reply."""
    kind = fault.kind
    if kind is FaultKind.NONE:
        conn.send(answer(False))
    elif kind is FaultKind.HANG:
        pass  # keep the connection open and silent; the client's timeout ends it
    elif kind is FaultKind.SLOW:
        conn.send_later(fault.delay_s, lambda: answer(False))
    elif kind is FaultKind.GARBAGE:
        conn.send(garbage_reply)
    elif kind is FaultKind.ERROR:
        conn.send(error_reply)
    elif kind is FaultKind.IGNORE:
        conn.send(answer(True))
    else:  # REBOOT: the listeners are closed, but a request may have raced the close
        conn.send(b"")


# --- fleets ------------------------------------------------------------------------------


class Endpoint(Protocol):
    """One simulated miner: its address, its listeners and its true state."""

    connections: Connections

    @property
    def address(self) -> str: ...

    @property
    def fault(self) -> Fault: ...

    @fault.setter
    def fault(self, value: Fault) -> None: ...

    async def open(self) -> None:
        """Start listening (at start and after a reboot)."""

    def close(self) -> Awaitable[None] | None:
        """Stop listening and drop every live connection, now.

        An endpoint whose listener finishes closing later (a gRPC server) returns what to
        await for that; the fleet awaits it before a reboot's downtime starts and at stop.
        """

    def reset(self) -> None:
        """Boot state: what a power cycle leaves."""

    def truth(self) -> dict[str, object]:
        """The true state as JSON-able data."""


E = TypeVar("E", bound=Endpoint)


class EndpointFleet(Generic[E]):
    """N simulated miners of one family in this process; an async context manager, entered once.

    It owns the endpoints, starts and stops them, injects faults and runs reboots. Each family
    decides what its ``miners`` are (:class:`SimFleet`: the endpoints).
    """

    family = "miner"

    def __init__(self, endpoints: Iterable[E]) -> None:
        self._endpoints: dict[str, E] = {}
        for ep in endpoints:
            if ep.address in self._endpoints:
                raise ValueError(f"duplicate miner address {ep.address}")
            self._endpoints[ep.address] = ep
        self._started = False
        self._reboots: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[str]:
        return list(self._endpoints)

    def endpoint(self, address: str) -> E:
        try:
            return self._endpoints[address]
        except KeyError:
            raise KeyError(f"no simulated {self.family} at {address}") from None

    async def start(self) -> None:
        if self._started:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._started = True
        try:
            for ep in self._endpoints.values():
                await ep.open()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in list(self._reboots):
            task.cancel()
        for task in list(self._reboots):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        closing = [ep.close() for ep in self._endpoints.values()]
        for pending in closing:
            if pending is not None:
                await pending
        await self._settle()

    async def _settle(self, within_s: float = STOP_SETTLE_S) -> None:
        """Let the loop finish what the closes started, so no socket outlives the fleet.

        Connections accepted just before a listener closed get their transport only now (and
        are dropped at once); aborted ones need a loop turn to release their socket. Bounded:
        a transport that never reports back cannot hold a stop for long.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        await asyncio.sleep(0)  # accept tasks already scheduled start now
        while loop.time() < deadline:
            if all(ep.connections.settled for ep in self._endpoints.values()):
                return
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def set_fault(self, address: str, fault: Fault | FaultKind | str, delay_s: float = 0.0) -> None:
        """Make one miner misbehave from now on (``none`` heals it)."""
        if not isinstance(fault, Fault):
            fault = parse_fault(str(fault), delay_s)
        else:
            parse_delay_s(fault.delay_s)
        ep = self.endpoint(address)
        if fault.kind is FaultKind.REBOOT and not self._started:
            raise RuntimeError("a reboot needs a started fleet")
        ep.fault = fault
        if fault.kind is FaultKind.REBOOT:
            closing = ep.close()
            reboot = self._reboot(ep, fault.delay_s, closing)
            task = asyncio.get_running_loop().create_task(reboot)
            self._reboots.add(task)
            task.add_done_callback(self._reboots.discard)

    async def _reboot(self, ep: E, downtime_s: float, closing: Awaitable[None] | None) -> None:
        if closing is not None:
            await closing  # the downtime starts once the listeners are gone
        await asyncio.sleep(downtime_s)
        ep.reset()
        ep.fault = Fault()
        await ep.open()

    def truth(self, address: str) -> dict[str, object]:
        return self.endpoint(address).truth()


class SimFleet(EndpointFleet[E]):
    """A fleet whose ``miners`` are its endpoints (the Antminer and Whatsminer simulators)."""

    @property
    def miners(self) -> dict[str, E]:
        """Every endpoint, by address (their true state is on them)."""
        return dict(self._endpoints)


# --- control port ------------------------------------------------------------------------

ControlOp = Callable[[dict[str, object]], dict[str, object]]


def _addresses(fleet: EndpointFleet[E], request: Mapping[str, object]) -> list[str]:
    raw = request["addresses"] if "addresses" in request else [request.get("address")]
    if not isinstance(raw, list):
        raise ValueError("addresses must be a list of addresses")
    if len(raw) > MAX_ADDRESSES_PER_REQUEST:
        raise ValueError(f"at most {MAX_ADDRESSES_PER_REQUEST} addresses per request")
    out: list[str] = []
    for a in raw:
        if not isinstance(a, str):
            raise ValueError(f"an address must be a string, got {a!r}")
        fleet.endpoint(a)  # KeyError names an unknown address
        out.append(a)
    return out


def control_answer(
    fleet: EndpointFleet[E], request: object, extra_ops: Mapping[str, ControlOp] | None = None
) -> dict[str, object]:
    """The answer to one control request; validates everything before changing anything."""
    ops = dict(extra_ops or {})
    known = ", ".join(["list", "state", "states", "fault", *ops])
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    try:
        if op == "list":
            return {"ok": True, "miners": fleet.addresses}
        if op == "state":
            address = request.get("address")
            if not isinstance(address, str):
                raise ValueError("address must be a string")
            return {"ok": True, "state": fleet.truth(address)}
        if op == "states":
            return {"ok": True, "states": [fleet.truth(a) for a in fleet.addresses]}
        if op == "fault":
            if "fault" not in request:
                raise ValueError("fault is required")
            fault = parse_fault(request["fault"], request.get("delay_s", 0.0))
            addresses = _addresses(fleet, request)
            for a in addresses:
                fleet.set_fault(a, fault)
            return {"ok": True}
        if isinstance(op, str) and op in ops:
            return ops[op](request)
    except KeyError as exc:
        return {"ok": False, "error": str(exc.args[0]) if exc.args else "unknown key"}
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown op {op!r}; known: {known}"}


async def serve_control(
    fleet: EndpointFleet[E],
    port: int,
    host: str = "127.0.0.1",
    extra_ops: Mapping[str, ControlOp] | None = None,
) -> asyncio.Server:
    """Serve the JSON-lines control endpoint for ``fleet``; returns the listening server."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the limit: answer once and hang up
                    reply: dict[str, object] = {"ok": False, "error": "request line too long"}
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    reply = {"ok": False, "error": f"not JSON: {exc}"}
                else:
                    reply = control_answer(fleet, request, extra_ops)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, host=host, port=port, limit=MAX_CONTROL_LINE_BYTES)


# --- CLI ---------------------------------------------------------------------------------


async def serve_until_signal(
    fleet: EndpointFleet[E],
    rows: Iterable[Mapping[str, object]],
    control_port: int,
    extra_ops: Mapping[str, ControlOp] | None = None,
    *,
    control: Callable[[int], Awaitable[asyncio.Server]] | None = None,
) -> int:
    """Start ``fleet``, print one JSON line per miner and a ``ready`` line, serve until SIGTERM.

    ``control(port)`` serves the control port; by default :func:`serve_control` with
    ``extra_ops`` (the LuxOS and Braiins fleets pass their own).
    """
    if control is None:

        def control(port: int) -> Awaitable[asyncio.Server]:
            return serve_control(fleet, port, extra_ops=extra_ops)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with fleet:
            server = await control(control_port)
            port = server.sockets[0].getsockname()[1]
            out = sys.stdout
            count = 0
            for row in rows:
                out.write(json.dumps(dict(row)) + "\n")
                count += 1
            out.write(json.dumps({"event": "ready", "miners": count, "control_port": port}))
            out.write("\n")
            out.flush()
            try:
                await stop.wait()
            finally:
                server.close()
    except OSError as exc:
        print(f"error: cannot serve miners: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
