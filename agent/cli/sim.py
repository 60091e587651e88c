"""``site-agent sim``: simulated miners on loopback, for trying the agent without rigs.

``--miners N`` serves N LuxOS miners (as before). ``--mix luxos=30,braiins=20`` serves a mixed
fleet from one process: each family on its own consecutive loopback addresses from ``--base``,
one shared control port (ops ``list``, ``state``, ``states``, ``fault``, ``ambient``). The stock
Antminer's web API needs port 80, so root.

``site-agent sim node --config node.yaml`` runs a node agent over simulated GPUs and jobs (the
demo's GPU hosts; see :mod:`agent.cli.demo_nodes`), where ``site-agent node`` refuses them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

FAMILIES = ("luxos", "antminer", "braiins", "whatsminer")


def register(sub: Any) -> None:
    p = sub.add_parser("sim", help="run simulated miners on loopback")
    p.add_argument("--miners", type=int, default=10, help="how many LuxOS miners")
    p.add_argument(
        "--mix",
        default="",
        help=f"a mixed fleet, e.g. luxos=30,braiins=20 (families: {', '.join(FAMILIES)})",
    )
    p.add_argument("--base", default="127.1.0.1", help="first loopback address")
    p.add_argument("--control-port", type=int, default=0, help="JSON control port (0: any)")
    p.set_defaults(func=sim)
    kinds = p.add_subparsers(dest="sim_kind")
    node = kinds.add_parser(
        "node", help="a node agent over simulated NVML and jobs (the demo's GPU hosts)"
    )
    node.add_argument("--config", type=Path, required=True, help="node YAML (with node:)")
    node.set_defaults(func=sim_node)


def sim_node(args: argparse.Namespace) -> int:
    from agent.cli.demo_nodes import serve_sim_node

    return asyncio.run(serve_sim_node(args.config))


def parse_mix(text: str) -> dict[str, int]:
    """``luxos=30,braiins=20`` as counts by family; a one-line ValueError for anything else."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        family, sep, count = part.partition("=")
        if not sep or family not in FAMILIES:
            raise ValueError(
                f"--mix: {part!r} is not FAMILY=COUNT with FAMILY one of {', '.join(FAMILIES)}"
            )
        if family in out:
            raise ValueError(f"--mix: {family} given twice")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--mix: {family} count {count!r} is not a whole number") from None
        if not 0 <= n <= 50_000:
            raise ValueError(f"--mix: {family} count must be 0..50000, got {n}")
        out[family] = n
    if not out or sum(out.values()) == 0:
        raise ValueError("--mix needs at least one miner")
    return out


def sim(args: argparse.Namespace) -> int:
    from agent.cli.common import bounded_args

    if not bounded_args(
        [(args.miners, 1, 100_000, "--miners"), (args.control_port, 0, 65535, "--control-port")]
    ):
        return 2
    if not args.mix:
        from simulators.luxos import run_fleet_cli

        argv = ["--miners", str(args.miners), "--base", args.base]
        if args.control_port:
            argv += ["--control-port", str(args.control_port)]
        return asyncio.run(run_fleet_cli(argv))
    try:
        mix = parse_mix(args.mix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve_mix(mix, args.base, args.control_port))


class _Mixed:
    """Several fleets behind one control port (the surface ``serve_control`` needs)."""

    def __init__(self, fleets: list[Any]) -> None:
        self.fleets = fleets
        self.by_address = {a: f for f in fleets for a in f.addresses}

    @property
    def addresses(self) -> list[str]:
        return list(self.by_address)

    def _fleet(self, address: str) -> Any:
        try:
            return self.by_address[address]
        except KeyError:
            raise KeyError(f"no simulated miner at {address}") from None

    def truth(self, address: str) -> dict[str, object]:
        out: dict[str, object] = self._fleet(address).truth(address)
        return out

    def set_fault(self, address: str, fault: Any, delay_s: float = 0.0) -> None:
        self._fleet(address).set_fault(address, fault, delay_s)

    def set_ambient(self, address: str, ambient_c: float) -> None:
        fleet = self._fleet(address)
        if not hasattr(fleet, "set_ambient"):
            raise ValueError(f"{address}: its simulator has no ambient control")
        fleet.set_ambient(address, ambient_c)


async def _serve_mix(mix: dict[str, int], base: str, control_port: int) -> int:
    from simulators.antminer import AntminerFleet, AntminerSpec
    from simulators.braiins import GRPC_PORT, BraiinsFleet
    from simulators.luxos import (
        LuxosFleet,
        fleet_addresses,
        fleet_specs,
        raise_open_file_limit,
        serve_control,
    )
    from simulators.whatsminer import WhatsminerFleet, WhatsminerSpec

    try:
        addresses = fleet_addresses(sum(mix.values()), base)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    split: dict[str, list[str]] = {}
    i = 0
    for family in FAMILIES:
        split[family] = addresses[i : i + mix.get(family, 0)]
        i += mix.get(family, 0)
    asic_models = ("s19jpro", "s21")
    wm_models = ("m30s+v40", "m60svk30")
    fleets: list[Any] = []
    rows: list[dict[str, object]] = []
    if split["luxos"]:
        specs = fleet_specs(len(split["luxos"]), split["luxos"][0])
        fleets.append(LuxosFleet(specs))
        rows += [{"address": s.address, "port": s.port, "model": s.model} for s in specs]
    if split["antminer"]:
        ants = [AntminerSpec(a, asic_models[k % 2]) for k, a in enumerate(split["antminer"])]
        fleets.append(AntminerFleet(ants))
        rows += [
            {"address": s.address, "port": s.rpc_port, "web_port": s.web_port, "model": s.model}
            for s in ants
        ]
    if split["braiins"]:
        specs = fleet_specs(len(split["braiins"]), split["braiins"][0])
        fleets.append(BraiinsFleet(specs))
        rows += [
            {"address": s.address, "port": s.port, "grpc_port": GRPC_PORT, "model": s.model}
            for s in specs
        ]
    if split["whatsminer"]:
        wms = [WhatsminerSpec(a, wm_models[k % 2]) for k, a in enumerate(split["whatsminer"])]
        fleets.append(WhatsminerFleet(wms))
        rows += [{"address": s.address, "port": s.port, "model": s.model} for s in wms]
    firmware = {a: family for family in FAMILIES for a in split[family]}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for f in fleets:
                await stack.enter_async_context(f)
            control = await serve_control(_Mixed(fleets), control_port)
            port = control.sockets[0].getsockname()[1]
            for row in rows:
                print(json.dumps({**row, "firmware": firmware[str(row["address"])]}))
            print(json.dumps({"event": "ready", "miners": len(rows), "control_port": port}))
            sys.stdout.flush()
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
