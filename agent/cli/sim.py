"""``site-agent sim``: simulated miners on loopback, for trying the agent without rigs.

``--miners N`` serves N LuxOS miners (as before). ``--mix luxos=30,braiins=20`` serves a mixed
fleet from one process: each family on its own consecutive loopback addresses from ``--base``,
one shared control port. Families whose simulators are not in this build are refused by name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

FAMILIES = ("luxos", "braiins")


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
        self._fleet(address).set_ambient(address, ambient_c)


async def _serve_mix(mix: dict[str, int], base: str, control_port: int) -> int:
    from simulators.braiins import GRPC_PORT, BraiinsFleet
    from simulators.luxos import LuxosFleet, fleet_specs, raise_open_file_limit, serve_control

    try:
        specs = fleet_specs(sum(mix.values()), base)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()
    split: dict[str, list[Any]] = {}
    i = 0
    for family in FAMILIES:
        split[family] = specs[i : i + mix.get(family, 0)]
        i += mix.get(family, 0)
    fleets: list[Any] = []
    if split["luxos"]:
        fleets.append(LuxosFleet(split["luxos"]))
    if split["braiins"]:
        fleets.append(BraiinsFleet(split["braiins"]))
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
            for family in FAMILIES:
                for s in split[family]:
                    row: dict[str, object] = {
                        "address": s.address,
                        "port": s.port,
                        "model": s.model,
                        "firmware": family,
                    }
                    if family == "braiins":
                        row["grpc_port"] = GRPC_PORT
                    print(json.dumps(row))
            print(json.dumps({"event": "ready", "miners": len(specs), "control_port": port}))
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
