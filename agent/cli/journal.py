"""Sub-commands that read the journal: ``site-agent audit`` and ``site-agent events report``.

Both open the journal read-only, so they are safe to run while the agent is running and never
create a journal where there was none. The journal is found with ``--db PATH``, or through
``store.path`` of ``--config SITE.yaml`` (default ``$SITE_AGENT_CONFIG`` or
``/etc/site-agent/site.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.journal.store import AuditRow, EventReport


DEFAULT_CONFIG = Path("/etc/site-agent/site.yaml")
_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="print the audit journal (every action, every rejection)")
    _db_options(audit)
    audit.add_argument(
        "--since",
        type=parse_since,
        default=None,
        help="only rows at or after this time: ISO 8601 (UTC if no zone) or an age (-1h, 30m, 2d)",
    )
    # argparse takes "-1h" for an option unless it looks like a negative number to it; widen
    # its (private, but stable since 2.7) matcher so "--since -1h" works, not only "--since=-1h".
    audit._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[smhdw]?$")
    audit.add_argument("--device", default=None, help="only rows about this device id")
    audit.add_argument(
        "--limit", type=int, default=1000, help="at most the newest N rows (default 1000; 0: all)"
    )
    audit.add_argument("--json", action="store_true", help="print a JSON array")
    audit.set_defaults(func=audit_command)

    events = sub.add_parser("events", help="grid events in the journal")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    report = events_sub.add_parser(
        "report", help="per event: window, target, intervals, shortfall MWh, payment and penalty"
    )
    _db_options(report)
    report.add_argument("--json", action="store_true", help="print a JSON array")
    report.set_defaults(func=events_report_command)


def _db_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--db", type=Path, help="journal file")
    g.add_argument("--config", type=Path, help="site YAML; its store.path names the journal")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An age before now (``-1h``, ``30m``, ``-2d``; the minus is optional), or an ISO time
    (naive means UTC)."""
    m = _RELATIVE.match(text.strip())
    if m:
        try:
            delta = timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
            return (now or datetime.now(UTC)) - delta
        except OverflowError:
            raise argparse.ArgumentTypeError(f"not a time: {text[:40]!r} is too far back") from None
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use ISO 8601 like 2026-11-23T01:00Z, or -1h, -30m, -2d)"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def resolve_db(args: argparse.Namespace) -> Path:
    """The journal path from ``--db`` or the config; raises :class:`ConfigError` if unknown."""
    from agent.journal.store import journal_path

    if args.db is not None:
        return Path(args.db)
    cfg_path = args.config
    if cfg_path is None:
        cfg_path = Path(os.environ.get("SITE_AGENT_CONFIG", DEFAULT_CONFIG))
    return journal_path(store_path_from_config(Path(cfg_path)), Path(cfg_path))


def store_path_from_config(path: Path) -> Path:
    """``store.path`` of a site config, read without validating the rest of the file.

    The full load resolves credentials (``cred:`` needs the service's
    ``$CREDENTIALS_DIRECTORY``), which an operator reading the audit from a shell does not
    have and must not need.
    """
    from pydantic import ValidationError

    from agent.control.config import ConfigError, StoreConfig
    from drivers.inputs import MAX_CONFIG_BYTES, InputRejected, load_yaml

    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        # The same bounded loader as load_config: no aliases, duplicates, or endless files.
        data = load_yaml(raw, str(path), max_bytes=MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
    except InputRejected as exc:
        raise ConfigError(str(path), [f"{path}: {exc.message}"]) from None
    store = data.get("store") if isinstance(data, dict) else None
    if store is None:
        return StoreConfig().path
    try:
        return StoreConfig.model_validate(store).path
    except ValidationError as exc:
        problems = [
            f"{path}: store.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError(str(path), problems) from None


def _open_db(args: argparse.Namespace) -> Path | None:
    from agent.control.config import ConfigError

    try:
        return resolve_db(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print("(give the journal with --db PATH or a site config with --config)", file=sys.stderr)
        return None


def audit_command(args: argparse.Namespace) -> int:
    from agent.journal.store import StoreError

    db = _open_db(args)
    if db is None:
        return 2
    limit = None if args.limit == 0 else args.limit
    if limit is not None and limit < 0:
        print(f"--limit must be >= 0 (got {args.limit})", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(_read_audit(db, args.since, limit, args.device))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        for r in rows:
            print(format_audit_row(r))
    return 0


async def _read_audit(
    db: Path, since: datetime | None, limit: int | None, device: str | None
) -> list[AuditRow]:
    from agent.journal.store import Store

    async with Store.open(db, readonly=True) as store:
        return await store.audit_rows(since, limit, device_id=device)


def format_audit_row(r: AuditRow) -> str:
    at = r.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    detail = json.dumps(dict(r.detail), sort_keys=True) if r.detail else ""
    parts = [at, r.source, r.device_id or "-", r.action, r.result, r.reason, detail]
    return "  ".join(p for p in parts if p)


def events_report_command(args: argparse.Namespace) -> int:
    from agent.journal.store import StoreError

    db = _open_db(args)
    if db is None:
        return 2
    try:
        reports = asyncio.run(_read_reports(db))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
        return 0
    if not reports:
        print("no grid events in the journal")
        return 0
    print(
        f"{'event':<24} {'program':<14} {'status':<9} {'window (UTC)':<35} {'target kW':>10} "
        f"{'intervals':>9} {'shortfall MWh':>13} {'payment $':>10} {'penalty $':>10}"
    )
    for r in reports:
        print(format_event_report(r))
    return 0


async def _read_reports(db: Path) -> list[EventReport]:
    from agent.journal.store import Store

    async with Store.open(db, readonly=True) as store:
        return await store.event_report()


def format_event_report(r: EventReport) -> str:
    fmt = "%Y-%m-%d %H:%M"
    window = f"{r.start.astimezone(UTC):{fmt}} – {r.end.astimezone(UTC):{fmt}}"
    target = f"{r.target_w / 1000:.1f}" if r.target_w is not None else "-"
    intervals = f"{r.compliant_intervals}/{r.intervals}"
    return (
        f"{r.event_id:<24} {r.program:<14} {r.status!s:<9} {window:<35} {target:>10} "
        f"{intervals:>9} {r.shortfall_mwh:>13.6f} {r.payment_usd:>10.2f} {r.penalty_usd:>10.2f}"
    )
