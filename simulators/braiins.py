"""A fleet of simulated Braiins OS+ (BOSer) miners: cgminer RPC on 4028 and gRPC on 50051.

Each miner listens on its own loopback address (pyasic hard-codes both ports). The RPC port
answers the cgminer-style commands pyasic's BOSer backend sends (``version`` with "BOSer" in
it, which is how pyasic identifies Braiins OS+, ``devdetails`` whose ``Model`` picks the
class, ``summary``, ``devs``, ``tunerstatus``, ``fans``, ``pools``, ``stats``; ``a+b``
multicommands, which is how the agent reads a miner in one round trip). The gRPC port serves the
``braiins.bos.v1`` services through the betterproto service base classes that pyasic ships,
on grpclib's ``Server``:

* ``AuthenticationService/Login`` checks the password and returns the token both in the
  reply and in the initial metadata key ``authorization`` (where pyasic reads it); every other
  call needs that token in its ``authorization`` metadata or fails ``UNAUTHENTICATED``;
* ``ActionsService/PauseMining`` / ``ResumeMining`` (reply ``already_paused`` /
  ``already_mining``), ``Get/SetLocateDeviceStatus``;
* ``PerformanceService/SetPowerTarget`` with the model's allowed range; a target outside it is
  refused with ``INVALID_ARGUMENT`` and the firmware's message ``power target [XW] is not in
  allowed range [MIN, MAX]`` (the text users report, pyasic #242), nothing changes;
  ``GetTunerState``, ``GetActivePerformanceMode``; ``ConfigurationService/GetConstraints``
  and ``GetMinerConfiguration``;
* ``MinerService/GetMinerDetails``, ``GetMinerStats`` (``power_stats.approximated_consumption``
  is the simulated draw), ``GetHashboards``; ``CoolingService/GetCoolingState``;
  ``PoolService/GetPoolGroups``; ``ApiVersionService/GetApiVersion``.

Physics, fault kinds and the control port are those of :mod:`simulators.luxos` (one
:class:`~simulators.luxos_model.MinerState` per miner, driven by a continuous power target).
Faults on gRPC: ``hang`` never answers, ``slow`` answers after the delay, ``error`` fails
``INTERNAL``, ``garbage`` fails ``UNKNOWN`` with an undecodable message (grpclib frames every
reply, so bytes that are not protobuf cannot be sent through it; on RPC it is real garbage),
``ignore`` answers success and changes nothing, ``reboot`` closes both ports for the delay.

Differences from the recordings in ``../shared/data/fixtures/miners/asic-rs/braiins/`` (25.11
and 26.04) that remain, and why (``tests/test_sim_fidelity_braiins.py`` checks everything else):

* the simulator serves pyasic 0.79's proto, which is older than the recorded API (1.3): the
  tuner state is ``power_target_mode_state`` at the top, not inside a ``mode_state`` oneof, and
  ``best_share_str`` and a pool group's ``uid`` do not exist in it (pyasic can neither send nor
  read them);
* the recordings' JSON nests a oneof under its group's name (``strategy.quota``) where
  betterproto flattens it (``quota``): the same field on the wire;
* ``miner_errors``, ``network``, ``actions_locate`` beyond its flag, and the GraphQL ``v21_09``
  era are not served: pyasic 0.79's BOSer backend does not call them;
* ``real_hashrate`` windows other than ``last_5s`` and ``since_restart`` equal the current
  rate (the physics keeps no per-window history); shares and best share follow work done;
* the RPC ``fans`` reply (``FANS[n].RPM``/``Speed``) follows bosminer's cgminer API as pyasic's
  BOSMiner backend parses it; no recording of it exists in ``shared/data``;
* a refused login is ``UNAUTHENTICATED`` "Invalid username or password" (the firmware's exact
  text is not recorded).

Usage: ``python -m simulators.braiins --miners 100`` (same output and control port as
``python -m simulators.luxos``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpclib.const
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.server import Server, Stream

from simulators.common import (
    Connections,
    EndpointFleet,
    close_listener,
    serve_until_signal,
    stop_accepting,
)
from simulators.luxos import (
    RPC_PORT,
    MinerSpec,
    _Connection,
    fleet_specs,
    raise_open_file_limit,
    serve_control,
)
from simulators.luxos_model import MODELS, Clock, Fault, FaultKind, MinerState, Timing


def _import_proto() -> Any:
    # Importing pyasic runs logging.basicConfig(); undo exactly that (as drivers/ does).
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from pyasic.web.braiins_os.proto.braiins import bos
    from pyasic.web.braiins_os.proto.braiins.bos import v1

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return bos, v1


_bos, pb = _import_proto()

GRPC_PORT = 50051
BOS_VERSION = "2026-04-14-0-912d084c-26.04-plus"
BOSER = "boser-buildroot 0.1.0-912d084c"
GARBAGE_REPLY = b"\x00\x00\x00\x00\x05\xff\xfe BOSer: internal error {{{"
DEFAULT_PASSWORD = "root"


@dataclass(frozen=True, slots=True)
class PowerRange:
    """The tuner's allowed power targets for a model (``GetConstraints``)."""

    min_w: int
    default_w: int
    max_w: int


def power_range(model_key: str) -> PowerRange:
    """Allowed targets: about half the default power up to the PSU's rating."""
    m = MODELS[model_key]
    default = round(m.profile(m.default_profile).power_w)
    return PowerRange(round(default * 0.5), default, int(m.nameplate_w))


def _mac(address: str) -> str:
    octets = [int(x) for x in address.split(".")]
    return "02:b0:5e:" + ":".join(f"{o:02x}" for o in octets[1:])


def _model_name(m: MinerState) -> str:
    return m.model.type_name  # "Antminer S19j Pro"


# --- cgminer RPC (port 4028) -------------------------------------------------------------


def _status(code: int, msg: str, ok: bool = True) -> dict[str, object]:
    return {
        "STATUS": "S" if ok else "E",
        "When": int(time.time()),
        "Code": code,
        "Msg": msg,
        "Description": f"BOSer {BOSER}",
    }


def _fans(m: MinerState, now: float) -> tuple[float, list[int]]:
    """The fans' speed ratio and RPMs (the same on gRPC ``GetCoolingState`` and RPC ``fans``)."""
    ratio = min(1.0, 0.3 + 0.2 * m.power_w(now) / 1000.0)
    rpm = int(6000 * ratio)
    return ratio, [rpm + 10 * i for i in range(m.model.fans)]


def _rpc_body(m: MinerState, command: str, now: float) -> dict[str, object] | None:
    ths = m.hashrate_ths(now)
    mhs = ths * 1e6
    avg_mhs = m.average_hashrate_ths(now) * 1e6
    elapsed = int(now - m.boot_at)
    if command == "version":
        return {
            "STATUS": [_status(22, "BOSer versions")],
            "VERSION": [{"API": "3.7", "BOSer": BOSER}],
        }
    if command == "devdetails":
        rows = [
            {
                "DEVDETAILS": i,
                "Name": "",
                "ID": i,
                "Driver": "",
                "Kernel": "",
                "Model": f"Bitmain {_model_name(m)}",
                "Chips": m.model.chips_per_board,
                "Cores": m.model.chips_per_board * 4,
                "Frequency": m.model.profile(m.model.default_profile).frequency_mhz,
                "Voltage": m.model.profile(m.model.default_profile).voltage_v,
            }
            for i in range(m.model.boards)
        ]
        return {"STATUS": [_status(69, "Device Details")], "DEVDETAILS": rows}
    if command == "summary":
        row: dict[str, object] = {
            "Elapsed": elapsed,
            "MHS av": round(avg_mhs, 2),
            "MHS 5s": round(mhs, 2),
            "MHS 1m": round(mhs, 2),
            "MHS 5m": round(mhs, 2),
            "MHS 15m": round(mhs, 2),
            "Accepted": m.accepted_shares,
            "Rejected": 0,
            "Hardware Errors": 0,
            "Utility": 0.0,
            "Found Blocks": 0,
        }
        return {"STATUS": [_status(11, "Summary")], "SUMMARY": [row]}
    if command == "devs":
        boards = m.model.boards
        rows = [
            {
                "ASC": i,
                "Name": "",
                "ID": i + 1,
                "Enabled": "Y",
                "Status": "Alive",
                "Temperature": round(m.pcb_c(now), 1),
                "MHS av": round(avg_mhs / boards, 2),
                "MHS 5s": round(mhs / boards, 2),
                "MHS 1m": round(mhs / boards, 2),
                "MHS 5m": round(mhs / boards, 2),
                "MHS 15m": round(mhs / boards, 2),
                "Nominal MHS": round(m.target()[1] * 1e6 / boards, 2),
                "Device Elapsed": elapsed,
            }
            for i in range(boards)
        ]
        return {"STATUS": [_status(9, f"{boards} ASC(s)")], "DEVS": rows}
    if command == "tunerstatus":
        target = m.power_target_w or 0.0
        chains: list[dict[str, object]] = [
            {
                "HashchainIndex": i + 1,
                "Iteration": 0,
                "LoadedProfile": True,
                "ProfileStatus": "Ready",
                "Status": "Stable" if not m.sleeping else "Paused",
                "StatusMessages": [],
                "PowerLimitWatt": int(target / m.model.boards),
            }
            for i in range(m.model.boards)
        ]
        row = {
            "ApproximateChainPowerConsumption": round(m.power_w(now)),
            "ApproximateMinerPowerConsumption": round(m.power_w(now)),
            "DynamicPowerScaling": "Disabled",
            "PowerLimit": int(target),
            "TunerChainStatus": chains,
            "TunerMode": "PowerTarget",
        }
        return {"STATUS": [_status(1, "Tuner Status")], "TUNERSTATUS": [row]}
    if command == "pools":
        pool: dict[str, object] = {
            "POOL": 0,
            "URL": "stratum+tcp://stratum.braiins.com:3333",
            "Status": "Alive",
            "Priority": 0,
            "Quota": 1,
            "User": "site.worker",
            "Accepted": m.accepted_shares,
            "Rejected": 0,
            "Stratum Active": True,
        }
        return {"STATUS": [_status(7, "1 Pool(s)")], "POOLS": [pool]}
    if command == "fans":
        ratio, rpms = _fans(m, now)
        fan_rows = [
            {"FAN": i, "ID": i, "RPM": rpm, "Speed": round(100 * ratio)}
            for i, rpm in enumerate(rpms)
        ]
        return {"STATUS": [_status(202, f"{len(rpms)} Fan(s)")], "FANS": fan_rows}
    if command == "stats":
        row = {"STATS": 0, "ID": "BOSer0", "Elapsed": elapsed, "MHS av": round(avg_mhs, 2)}
        return {"STATUS": [_status(70, "BOSer stats")], "STATS": [row]}
    return None


def rpc_answer(m: MinerState, request: object) -> bytes:
    """The reply bytes for one decoded cgminer request (read-only commands only)."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        body: dict[str, object] = {"STATUS": [_status(14, "Missing JSON 'command'", ok=False)]}
        return json.dumps({**body, "id": 1}).encode()
    command: str = request["command"]
    now = m.clock()
    if "+" in command:
        out: dict[str, object] = {}
        for sub in command.split("+")[:16]:
            b = _rpc_body(m, sub, now) or {"STATUS": [_status(14, "Invalid command", ok=False)]}
            out[sub] = [{**b, "id": 1}]
        out["id"] = 1
        return json.dumps(out).encode()
    b = _rpc_body(m, command, now) or {"STATUS": [_status(14, "Invalid command", ok=False)]}
    return json.dumps({**b, "id": 1}).encode()


# --- gRPC (port 50051) -------------------------------------------------------------------


def _gh(ths: float) -> Any:
    return pb.GigaHashrate(gigahash_per_second=ths * 1000.0)


def _work_solver_stats(m: MinerState, now: float, share: float) -> Any:
    ths = m.hashrate_ths(now) * share
    since = m.average_hashrate_ths(now) * share
    rh = pb.RealHashrate(
        last_5_s=_gh(ths),
        last_15_s=_gh(ths),
        last_30_s=_gh(ths),
        last_1_m=_gh(ths),
        last_5_m=_gh(ths),
        last_15_m=_gh(ths),
        last_30_m=_gh(ths),
        last_1_h=_gh(ths),
        last_24_h=_gh(ths),
        since_restart=_gh(since),
    )
    return pb.WorkSolverStats(
        real_hashrate=rh,
        nominal_hashrate=_gh(m.target()[1] * share),
        error_hashrate=pb.MegaHashrate(megahash_per_second=0.0),
        found_blocks=0,
        best_share=int(m.work_th(now) * 1000) % 500_000_000,
    )


def _pool_stats(m: MinerState, now: float) -> Any:
    # About one share per 500 TH at the recorded difficulty: shares follow work done.
    shares = int(m.work_th(now) / 500.0)
    return pb.PoolStats(
        accepted_shares=shares,
        rejected_shares=0,
        stale_shares=0,
        last_difficulty=524288,
        best_share=int(m.work_th(now) * 1000) % 500_000_000,
        generated_work=int(m.work_th(now) * 1000),
        last_share_time=datetime.fromtimestamp(time.time() - 1.0, UTC),
    )


class BraiinsMiner:
    """One simulated BOS+ miner: its physics, its token, and both of its listeners.

    A fleet endpoint (:class:`simulators.common.Endpoint`) whose gRPC listener closes
    asynchronously: ``close`` returns the task that finishes it.
    """

    def __init__(self, spec: MinerSpec, state: MinerState, password: str) -> None:
        self.spec = spec
        self.state = state
        self.password = password
        self.range = power_range(spec.model)
        self.token = ""
        self.logins = 0  # successful logins since start (tests: who logged in when)
        self.refused_logins = 0
        self.locate = False
        self.rpc_server: asyncio.Server | None = None
        self.grpc_server: Server | None = None
        self.connections = Connections()
        self.closed = asyncio.Event()
        self.boot()

    def boot(self) -> None:
        # Braiins boots on its saved power target (the model's default), mining.
        self.state.reset()
        self.state.set_power_target(float(self.range.default_w))
        self.state.reset_ramp()
        self.token = ""

    # -- fleet endpoint

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def fault(self) -> Fault:
        return self.state.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.state.fault = value
        if value.kind is not FaultKind.HANG:
            self.closed.set()  # release calls hung under a previous fault
            self.closed = asyncio.Event()

    def reset(self) -> None:
        self.boot()

    def truth(self) -> dict[str, object]:
        return self.state.truth()

    # -- listeners

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
        self.rpc_server = await loop.create_server(
            lambda: _Connection(self),  # type: ignore[arg-type]
            host=self.spec.address,
            port=self.spec.port,
            reuse_address=True,
            backlog=512,
        )
        self.connections.open()
        services = _services(self)
        server = Server(services)
        await server.start(self.spec.address, GRPC_PORT, reuse_address=True)
        self.grpc_server = server

    def close(self) -> asyncio.Task[None] | None:
        """Close both listeners now; the returned task waits for the gRPC server to finish."""
        self.closed.set()  # releases hung handlers
        if self.rpc_server is not None:
            close_listener(self.rpc_server)
            self.rpc_server = None
        self.connections.close()
        if self.grpc_server is None:
            return None
        server, self.grpc_server = self.grpc_server, None
        # grpclib's listener has the same accept race (see close_listener): stop accepting
        # now, close a loop turn later, when late connections are grpclib's handlers to close.
        listener = getattr(server, "_server", None)
        if isinstance(listener, asyncio.AbstractServer):
            stop_accepting(listener)
        return asyncio.get_running_loop().create_task(_close_grpc(server))

    # -- RPC (called by luxos._Connection)

    def handle(self, request: object, conn: _Connection) -> None:
        fault = self.state.fault
        kind = fault.kind
        if kind in (FaultKind.NONE, FaultKind.IGNORE):
            conn.send(rpc_answer(self.state, request))
        elif kind is FaultKind.HANG:
            pass
        elif kind is FaultKind.SLOW:
            loop = asyncio.get_running_loop()
            loop.call_later(fault.delay_s, lambda: conn.send(rpc_answer(self.state, request)))
        elif kind is FaultKind.GARBAGE:
            conn.send(GARBAGE_REPLY)
        elif kind is FaultKind.ERROR:
            err = {"STATUS": [_status(45, "Access denied", ok=False)], "id": 1}
            conn.send(json.dumps(err).encode())
        else:
            conn.send(b"")

    # -- gRPC gate: faults first, then authentication

    async def gate(self, stream: Stream[Any, Any], *, public: bool = False) -> None:
        fault = self.state.fault
        if fault.kind is FaultKind.HANG:
            await self.closed.wait()
            raise GRPCError(Status.UNAVAILABLE, "miner went away")
        if fault.kind is FaultKind.SLOW:
            await asyncio.sleep(fault.delay_s)
        elif fault.kind is FaultKind.ERROR:
            raise GRPCError(Status.INTERNAL, "bosminer: internal error")
        elif fault.kind is FaultKind.GARBAGE:
            raise GRPCError(Status.UNKNOWN, "\ufffd\ufffd\x15garbled{{{")
        if public:
            return
        token = stream.metadata.get("authorization") if stream.metadata else None
        if not self.token or token != self.token:
            raise GRPCError(Status.UNAUTHENTICATED, "Unauthenticated: invalid or missing token")

    @property
    def ignoring(self) -> bool:
        return self.state.fault.kind is FaultKind.IGNORE


Handler = Callable[[Stream[Any, Any]], Awaitable[None]]


async def _close_grpc(server: Server) -> None:
    await asyncio.sleep(0)  # the accept tasks already scheduled build their transports first
    server.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await server.wait_closed()


def _guard(miner: BraiinsMiner, mapping: dict[str, Any], public: frozenset[str]) -> dict[str, Any]:
    """Wrap every handler of a service so faults and authentication apply before it runs."""
    out: dict[str, Any] = {}
    for path, h in mapping.items():

        def wrap(func: Handler, is_public: bool) -> Handler:
            async def guarded(stream: Stream[Any, Any]) -> None:
                await miner.gate(stream, public=is_public)
                await func(stream)

            return guarded

        out[path] = grpclib.const.Handler(
            wrap(h.func, path in public), h.cardinality, h.request_type, h.reply_type
        )
    return out


def _services(miner: BraiinsMiner) -> list[Any]:
    m = miner.state

    class Auth(pb.AuthenticationServiceBase):  # type: ignore[misc,name-defined]
        async def _login(self, stream: Stream[Any, Any]) -> None:
            await miner.gate(stream, public=True)
            request = await stream.recv_message()
            if request is None or request.username != "root" or request.password != miner.password:
                miner.refused_logins += 1
                raise GRPCError(Status.UNAUTHENTICATED, "Invalid username or password")
            if not miner.token:
                miner.token = secrets.token_urlsafe(12)
            miner.logins += 1
            await stream.send_initial_metadata(metadata={"authorization": miner.token})
            await stream.send_message(pb.LoginResponse(token=miner.token, timeout_s=3600))

        def __mapping__(self) -> dict[str, Any]:
            base = super().__mapping__()
            login = "/braiins.bos.v1.AuthenticationService/Login"
            out = _guard(miner, base, frozenset())
            h = base[login]
            out[login] = grpclib.const.Handler(
                self._login, h.cardinality, h.request_type, h.reply_type
            )
            return out

    class Actions(pb.ActionsServiceBase):  # type: ignore[misc,name-defined]
        async def pause_mining(self, request: Any) -> Any:
            already = m.sleeping
            if not miner.ignoring:
                m.sleep()
            return pb.PauseMiningResponse(already_paused=already)

        async def resume_mining(self, request: Any) -> Any:
            already = not m.sleeping
            if not miner.ignoring:
                m.wake()
            return pb.ResumeMiningResponse(already_mining=already)

        async def get_locate_device_status(self, request: Any) -> Any:
            return pb.LocateDeviceStatusResponse(enabled=miner.locate)

        async def set_locate_device_status(self, request: Any) -> Any:
            if not miner.ignoring:
                miner.locate = bool(request.enable)
            return pb.LocateDeviceStatusResponse(enabled=miner.locate)

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Performance(pb.PerformanceServiceBase):  # type: ignore[misc,name-defined]
        async def set_power_target(self, request: Any) -> Any:
            watt = int(request.power_target.watt)
            r = miner.range
            if not r.min_w <= watt <= r.max_w:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"power target [{watt}W] is not in allowed range [{r.min_w}, {r.max_w}]",
                )
            if not miner.ignoring:
                m.set_power_target(float(watt))
            return pb.SetPowerTargetResponse(power_target=pb.Power(watt=watt))

        async def get_tuner_state(self, request: Any) -> Any:
            now = m.clock()
            target = int(m.power_target_w or miner.range.default_w)
            profile = pb.PowerTargetProfile(
                created=datetime.fromtimestamp(time.time() - (now - m.boot_at), UTC),
                target=pb.Power(watt=target),
                measured_hashrate=_gh(m.model.hashrate_at_w(target)),
                estimated_power_consumption=pb.Power(watt=int(target * 0.995)),
            )
            return pb.GetTunerStateResponse(
                overall_tuner_state=pb.TunerState.STABLE,
                power_target_mode_state=pb.PowerTargetModeState(
                    profile=profile, current_target=pb.Power(watt=target)
                ),
            )

        async def get_active_performance_mode(self, request: Any) -> Any:
            target = int(m.power_target_w or miner.range.default_w)
            return pb.PerformanceMode(
                tuner_mode=pb.TunerPerformanceMode(
                    power_target=pb.PowerTargetMode(power_target=pb.Power(watt=target))
                )
            )

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Configuration(pb.ConfigurationServiceBase):  # type: ignore[misc,name-defined]
        async def get_constraints(self, request: Any) -> Any:
            r = miner.range
            return pb.GetConstraintsResponse(
                tuner_constraints=pb.TunerConstraints(
                    power_target=pb.PowerConstraints(
                        default=pb.Power(watt=r.default_w),
                        min=pb.Power(watt=r.min_w),
                        max=pb.Power(watt=r.max_w),
                    ),
                    enabled=pb.BooleanConstraint(default=True),
                    default_mode=pb.TunerMode.POWER_TARGET,
                )
            )

        async def get_miner_configuration(self, request: Any) -> Any:
            target = int(m.power_target_w or miner.range.default_w)
            return pb.GetMinerConfigurationResponse(
                tuner=pb.TunerConfiguration(
                    enabled=True,
                    tuner_mode=pb.TunerMode.POWER_TARGET,
                    power_target=pb.Power(watt=target),
                )
            )

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Miner(pb.MinerServiceBase):  # type: ignore[misc,name-defined]
        async def get_miner_details(self, request: Any) -> Any:
            now = m.clock()
            up = int(now - m.boot_at)
            name = _model_name(m)
            return pb.GetMinerDetailsResponse(
                uid="sim" + m.address.replace(".", ""),
                miner_identity=pb.MinerIdentity(brand=1, name=name, miner_model=name),
                platform=4,
                bos_mode=4,
                bos_version=pb.BosVersion(
                    current=BOS_VERSION, major="2022-09-13-0-11012d53-22.08-plus", bos_plus=True
                ),
                hostname="Antminer",
                mac_address=_mac(m.address),
                system_uptime=up + 160,
                system_uptime_s=up + 160,
                bosminer_uptime_s=up,
                sticker_hashrate=_gh(m.model.profile(m.model.default_profile).hashrate_ths),
                status=pb.MinerStatus.PAUSED if m.sleeping else pb.MinerStatus.NORMAL,
                kernel_version="4.9.113",
                psu_info=pb.PsuInfo(
                    version=118,
                    fw_version=6920,
                    serial_number="SIMPSU" + m.address.replace(".", ""),
                    model_name="APW121215f",
                    min_voltage=pb.Voltage(volt=12.0),
                    max_voltage=pb.Voltage(volt=15.0),
                ),
                control_board_soc_family=3,
                serial_number="SIM" + m.address.replace(".", "").rjust(14, "0"),
            )

        async def get_miner_stats(self, request: Any) -> Any:
            now = m.clock()
            watts = round(m.power_w(now))
            ths = m.hashrate_ths(now)
            return pb.GetMinerStatsResponse(
                pool_stats=_pool_stats(m, now),
                miner_stats=_work_solver_stats(m, now, 1.0),
                power_stats=pb.MinerPowerStats(
                    approximated_consumption=pb.Power(watt=watts),
                    efficiency=pb.PowerEfficiency(
                        joule_per_terahash=watts / ths if ths > 0.01 else 0.0
                    ),
                ),
            )

        async def get_hashboards(self, request: Any) -> Any:
            now = m.clock()
            boards = m.model.boards
            pcb = m.pcb_c(now)
            chip = m.chip_c(now)
            p = m.model.profile(m.model.default_profile)
            rows = [
                pb.Hashboard(
                    id=str(i + 1),
                    enabled=True,
                    chips_count=m.model.chips_per_board,
                    current_voltage=pb.Voltage(volt=p.voltage_v),
                    current_frequency=pb.Frequency(hertz=p.frequency_mhz * 1e6),
                    highest_chip_temp=pb.TemperatureSensor(
                        id=i + 1, location=1, temperature=pb.Temperature(degree_c=chip)
                    ),
                    board_temp=pb.Temperature(degree_c=pcb),
                    stats=_work_solver_stats(m, now, 1.0 / boards),
                    model="BHB42601",
                    lowest_inlet_temp=pb.Temperature(degree_c=m.inlet_c(now)),
                    highest_outlet_temp=pb.Temperature(degree_c=pcb),
                    serial_number=f"SIMHB{i + 1}" + m.address.replace(".", ""),
                    board_name="BHB42601",
                    chip_type="BM1362",
                )
                for i in range(boards)
            ]
            return pb.GetHashboardsResponse(hashboards=rows)

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Cooling(pb.CoolingServiceBase):  # type: ignore[misc,name-defined]
        async def get_cooling_state(self, request: Any) -> Any:
            now = m.clock()
            ratio, rpms = _fans(m, now)
            fans = [
                pb.FanState(position=i, rpm=rpm, target_speed_ratio=round(ratio, 2))
                for i, rpm in enumerate(rpms)
            ]
            return pb.GetCoolingStateResponse(
                fans=fans,
                highest_temperature=pb.TemperatureSensor(
                    location=1, temperature=pb.Temperature(degree_c=m.chip_c(now))
                ),
            )

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Pools(pb.PoolServiceBase):  # type: ignore[misc,name-defined]
        async def get_pool_groups(self, request: Any) -> Any:
            pool = pb.Pool(
                uid="1",
                url="stratum+tcp://stratum.braiins.com:3333",
                user="site.worker",
                enabled=True,
                alive=True,
                active=not m.sleeping,
                stats=_pool_stats(m, m.clock()),
            )
            group = pb.PoolGroup(name="Default", quota=pb.Quota(value=1), pools=[pool])
            return pb.GetPoolGroupsResponse(pool_groups=[group])

        def __mapping__(self) -> dict[str, Any]:
            return _guard(miner, super().__mapping__(), frozenset())

    class Version(_bos.ApiVersionServiceBase):  # type: ignore[misc,name-defined]
        async def get_api_version(self, request: Any) -> Any:
            return _bos.ApiVersion(major=1, minor=3, patch=0)

        def __mapping__(self) -> dict[str, Any]:
            base = super().__mapping__()
            return _guard(miner, base, frozenset(base))

    return [
        Auth(),
        Actions(),
        Performance(),
        Configuration(),
        Miner(),
        Cooling(),
        Pools(),
        Version(),
    ]


class BraiinsFleet(EndpointFleet[BraiinsMiner]):
    """N simulated Braiins OS+ miners in this process. An async context manager, entered once.

    Offers the same surface as :class:`simulators.luxos.LuxosFleet` (``miners``,
    ``addresses``, ``set_fault``, ``truth``), so the same control port serves it.
    """

    def __init__(
        self,
        specs: Iterable[MinerSpec],
        *,
        clock: Clock = time.monotonic,
        timing: Timing | None = None,
        password: str = DEFAULT_PASSWORD,
    ) -> None:
        self._clock = clock
        self._timing = timing or Timing()
        miners: list[BraiinsMiner] = []
        for spec in specs:
            if spec.model not in MODELS:
                raise ValueError(f"unknown model {spec.model!r}; known: {', '.join(MODELS)}")
            state = MinerState(spec.address, MODELS[spec.model], clock, self._timing)
            miners.append(BraiinsMiner(spec, state, password))
        super().__init__(miners)

    @property
    def miners(self) -> dict[str, MinerState]:
        return {a: s.state for a, s in self._endpoints.items()}

    def power_range(self, address: str) -> PowerRange:
        return self.endpoint(address).range

    def set_ambient(self, address: str, ambient_c: float) -> None:
        self.endpoint(address).state.ambient_c = ambient_c


# --- CLI ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulators.braiins",
        description="Serve N simulated Braiins OS+ miners (RPC 4028, gRPC 50051) on loopback.",
    )
    p.add_argument("--miners", type=int, default=10)
    p.add_argument("--base", default="127.3.0.1")
    p.add_argument("--models", default="s19jpro,s21")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--password", default=DEFAULT_PASSWORD)
    return p


async def run_fleet_cli(argv: list[str] | None = None) -> int:
    """``python -m simulators.braiins``: one JSON line per miner, then ``ready``; until SIGTERM."""
    args = _parser().parse_args(argv)
    try:
        specs = fleet_specs(args.miners, args.base, [m for m in args.models.split(",") if m])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    fleet = BraiinsFleet(specs, password=args.password)
    rows = [
        {
            "address": s.address,
            "port": RPC_PORT,
            "grpc_port": GRPC_PORT,
            "model": s.model,
            "firmware": "braiins",
        }
        for s in specs
    ]
    return await serve_until_signal(
        fleet, rows, args.control_port, control=lambda port: serve_control(fleet, port)
    )


def main() -> None:
    sys.exit(asyncio.run(run_fleet_cli(sys.argv[1:])))


if __name__ == "__main__":
    main()
