"""Operator overrides: ``site-agent curtail`` and ``site-agent release``.

An override is a grid event of kind ``override`` written into the journal, which the running
agent reads every cycle (and within half a second, through its event watch). Only someone who
can write the journal can command the site this way: on an installed site that is root, since
the journal lives in the service's private state directory. Every override and every release is
audited with the operating-system user who gave it. Bad input (a target outside 0..the
interconnect limit, a time in the past or beyond ``control.max_event_horizon_s``) is refused
with a one-line error and writes nothing: the same limits MQTT and OpenADR get
(:mod:`agent.control.limits`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.control.config import AgentConfig


def register(sub: Any) -> None:
    p = sub.add_parser("curtail", help="operator override: hold site load at or below a target")
    p.add_argument("--config", type=Path, required=True, help="site YAML (finds the journal)")
    # Bounds (finite, ≥ 0, ≤ the interconnect) are checked in curtail(), with the config.
    p.add_argument(
        "--target-kw", type=float, required=True, help="site load ceiling, kW (0 to interconnect)"
    )
    p.add_argument("--until", required=True, help="end: +30m, +2h or an ISO-8601 time")
    p.add_argument("--reason", default="operator override", help="why (audited)")
    p.set_defaults(func=curtail)

    p = sub.add_parser("release", help="end operator overrides (all, or one by --event)")
    p.add_argument("--config", type=Path, required=True, help="site YAML (finds the journal)")
    p.add_argument("--event", help="the override's event id (default: every active override)")
    p.set_defaults(func=release)


def _load(config: Path) -> AgentConfig | None:
    from agent.control.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return None


def _journal(config: Path) -> Path | None:
    from agent.journal.store import journal_path

    cfg = _load(config)
    return None if cfg is None else journal_path(cfg.store.path, config)


def curtail(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    # A bad target is refused before anything loads: an operator in an emergency gets the
    # answer at once.
    if not math.isfinite(args.target_kw) or args.target_kw < 0:
        print(f"--target-kw must be a finite number >= 0 (got {args.target_kw})", file=sys.stderr)
        return 2

    from agent.control.limits import CommandLimits, LimitError, check_end, check_target_kw
    from agent.journal.store import Store, journal_path
    from agent.runtime.events import describe, parse_until
    from drivers.errors import AgentError
    from drivers.grid.base import FailDirection, GridEvent, ProgramKind

    cfg = _load(args.config)
    if cfg is None:
        return 2
    # The same limits as MQTT and OpenADR (agent.control.limits): 0 <= kW <= interconnect,
    # an end within control.max_event_horizon_s.
    limits = CommandLimits.of(cfg)
    try:
        target_kw = check_target_kw(args.target_kw, limits, "--target-kw")
    except LimitError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        until = parse_until(args.until, now)
    except (ValueError, OverflowError):
        print(
            f"--until: expected +30m, +2h, +90s or an ISO-8601 time (got {args.until!r})",
            file=sys.stderr,
        )
        return 2
    try:
        check_end(until, now, limits, "--until")
    except LimitError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    path = journal_path(cfg.store.path, args.config)
    user = getpass.getuser()
    event = GridEvent(
        event_id=f"override-{now:%Y%m%dT%H%M%S}-{user}",
        source=f"operator:{user}",
        program="operator-override",
        kind=ProgramKind.OVERRIDE,
        start=now,
        end=until,
        max_site_kw=target_kw,
        fail=FailDirection.HOLD,
    )

    async def write() -> None:
        async with Store.open(path) as store:
            await store.upsert_event(event, baseline_w=0.0)
            await store.audit(
                source=f"operator:{user}",
                action="curtail",
                result="accepted",
                reason=f"{event.event_id}: {describe(event, 0.0)}; {args.reason}",
            )

    try:
        asyncio.run(write())
    except AgentError as exc:
        print(f"cannot write the override: {exc}", file=sys.stderr)
        return 2
    print(f"{event.event_id}: {describe(event, 0.0)}")
    return 0


def release(args: argparse.Namespace) -> int:
    from agent.journal.store import EventStatus, Store
    from drivers.errors import AgentError
    from drivers.grid.base import ProgramKind

    path = _journal(args.config)
    if path is None:
        return 2
    user = getpass.getuser()

    async def write() -> list[str]:
        async with Store.open(path) as store:
            active = [
                s.event
                for s in await store.active_events()
                if s.event.kind is ProgramKind.OVERRIDE
                and (args.event is None or s.event.event_id == args.event)
            ]
            for event in active:
                await store.set_event_status(event.event_id, EventStatus.ENDED)
                await store.audit(
                    source=f"operator:{user}",
                    action="release",
                    result="accepted",
                    reason=f"{event.event_id} released",
                )
            return [e.event_id for e in active]

    try:
        released = asyncio.run(write())
    except AgentError as exc:
        print(f"cannot release: {exc}", file=sys.stderr)
        return 2
    if not released:
        which = f"override {args.event}" if args.event else "active override"
        print(f"no {which} to release", file=sys.stderr)
        return 1
    for eid in released:
        print(f"{eid}: released")
    return 0
