"""The journal: commanded states, grid events and the audit trail in one SQLite file.

A restart must resume where the agent stopped, so everything that matters for that is written
here before it is acted upon: the operating point commanded for each device and since when, the
grid events in force with their baseline and per-interval compliance, the site's demand in each
interval flagged as a 4CP risk, and one audit row for every action and every rejected input.

Durability: WAL mode with ``synchronous=FULL`` (every commit is fsynced), so a committed row
survives ``kill -9`` and power loss. Safety: the file carries an ``application_id`` and a schema
version in ``PRAGMA user_version``; a corrupt file, a file that is not ours, or one written by a
newer schema raises :class:`StoreError` at open and is never recreated or migrated over. A failed
write (disk full, read-only file, I/O error) raises :class:`StoreWriteError`, which the runtime
catches to enter safe mode.

Threads: a ``sqlite3.Connection`` belongs to the thread that made it, so each :class:`Store` owns
one single-thread executor; the connection is opened, used and closed only there, and every
public method is a coroutine that hands its work to that thread. Calls therefore run one at a
time, in the order they were made.

Secrets: audit details pass through :func:`~agent.control.redaction.redact`, which masks values
under credential-like keys (password, token, secret, ...), pydantic ``SecretStr`` values, and any
known secret string the store was opened with, wherever it appears.

Error tree (all under :class:`drivers.errors.AgentError`)::

    StoreError              cannot use the journal; names the file
    ├── StoreCorrupt        the file is damaged or is not a database
    ├── StoreSchemaError    not a site-agent journal, or written by a newer version
    └── StoreWriteError     a write failed: disk full, read-only, I/O error
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Callable, Generator, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

from agent.control.redaction import redact, scrub
from agent.control.settlement import (
    FourCpInterval,
    delivered_w,
    event_target_w,
    shortfall_w,
)
from drivers.errors import AgentError
from drivers.grid.base import FailDirection, GridEvent, ProgramKind

SCHEMA_VERSION = 1
# "SAJ1": marks the file as a site-agent journal, so we never adopt someone else's database.
APPLICATION_ID = 0x53414A31
DEFAULT_INTERVAL_S = 900.0  # ERCOT settlement interval (economics.md)

_T = TypeVar("_T")
_Bad = tuple[str, str, str, str]  # a row set aside: kind, key, payload, reason


# --- errors ------------------------------------------------------------------------------


class StoreError(AgentError):
    """The journal cannot be used. ``path`` names the file; the message says why."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


class StoreCorrupt(StoreError):
    """The file is damaged or is not a database at all."""


class StoreSchemaError(StoreError):
    """The file is not a site-agent journal, or its schema is newer than this version reads."""


class StoreWriteError(StoreError):
    """A write failed (disk full, read-only, I/O error); nothing of that call was committed."""


# --- rows --------------------------------------------------------------------------------


class CommandedState(NamedTuple):
    """The operating point last commanded for a device, and when (a tuple: ``state, since``)."""

    state: str
    since: datetime


class EventStatus(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    CANCELLED = "cancelled"
    QUARANTINED = "quarantined"  # failed re-validation when read back: never put in force


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """The first answer given to an operator command id (deduplication across restarts)."""

    command_id: str
    operator: str
    command: str
    accepted: bool
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    """A journal entry that failed re-validation when read back, set aside with the reason."""

    id: int
    at: datetime
    kind: str  # "event", "commanded"
    key: str
    payload: str
    reason: str


class AuditResult(StrEnum):
    """Usual values for :attr:`AuditRow.result`; any short string is accepted."""

    OK = "ok"
    FAILED = "failed"
    NOT_APPLIED = "not_applied"
    REJECTED = "rejected"  # bad input refused without effect
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A grid event as journaled: the event, the site load at its start, and its status."""

    event: GridEvent
    baseline_w: float
    status: EventStatus
    first_seen: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ComplianceRow:
    """One settlement interval of an event: the site-load target and what was measured."""

    event_id: str
    interval_start: datetime
    interval_s: float
    target_w: float
    measured_w: float

    @property
    def shortfall_w(self) -> float:
        return shortfall_w(self.measured_w, self.target_w)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit row to write (see :meth:`Store.audit_many`)."""

    source: str
    action: str
    result: str
    device_id: str | None = None
    reason: str = ""
    detail: Mapping[str, Any] | None = None
    at: datetime | None = None  # None: now


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One journaled action or rejected input."""

    id: int
    at: datetime
    source: str  # who asked: "policy", "operator:alice", "mqtt", "openadr", "price:ercot", ...
    device_id: str | None
    action: str  # "sleep", "set_gpu_cap", "command", "price_row", ...
    reason: str
    result: str  # usually an AuditResult value
    detail: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": _iso(self.at),
            "source": self.source,
            "device_id": self.device_id,
            "action": self.action,
            "reason": self.reason,
            "result": self.result,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class EventReport:
    """Settlement of one grid event from its journaled intervals.

    Per interval of length ``dt``: shortfall = max(0, measured − target) × dt; delivered = the
    reduction below the baseline, counted up to the committed level:
    max(0, baseline − max(measured, target)) × dt. Payment = delivered MWh × the event's payment
    rate; penalty = shortfall MWh × its penalty rate. MWh are rounded to 1 Wh, USD to cents.
    """

    event_id: str
    program: str
    kind: str
    status: EventStatus
    start: datetime
    end: datetime
    baseline_w: float
    target_w: float | None  # from the event (agent.control.settlement.event_target_w)
    intervals: int
    compliant_intervals: int
    delivered_mwh: float
    shortfall_mwh: float
    payment_usd: float
    penalty_usd: float

    @property
    def net_usd(self) -> float:
        return round(self.payment_usd - self.penalty_usd, 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "program": self.program,
            "kind": self.kind,
            "status": str(self.status),
            "start": _iso(self.start),
            "end": _iso(self.end),
            "baseline_w": self.baseline_w,
            "target_w": self.target_w,
            "intervals": self.intervals,
            "compliant_intervals": self.compliant_intervals,
            "delivered_mwh": self.delivered_mwh,
            "shortfall_mwh": self.shortfall_mwh,
            "payment_usd": self.payment_usd,
            "penalty_usd": self.penalty_usd,
            "net_usd": self.net_usd,
        }


# --- time and event (de)serialisation ------------------------------------------------------


def _iso(at: datetime) -> str:
    """UTC ISO text with microseconds: fixed width, so text order is time order."""
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _ts(at: datetime, what: str) -> str:
    if at.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {at.isoformat()})")
    return _iso(at)


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _finite(value: float, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number (got {value!r})")
    return v


def event_to_json(event: GridEvent) -> str:
    return json.dumps(
        {
            "event_id": event.event_id,
            "source": event.source,
            "program": event.program,
            "kind": str(event.kind),
            "start": _ts(event.start, "event start"),
            "end": _ts(event.end, "event end"),
            "max_site_kw": event.max_site_kw,
            "shed_kw": event.shed_kw,
            "payment_usd_per_mwh": event.payment_usd_per_mwh,
            "penalty_usd_per_mwh": event.penalty_usd_per_mwh,
            "fail": str(event.fail),
        },
        allow_nan=False,
        sort_keys=True,
    )


class JournalEntryInvalid(ValueError):
    """A journaled row that does not read back as what was written (edited, or a bug)."""


def _text(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise JournalEntryInvalid(f"{key} must be a non-empty string of at most 256 characters")
    return value


def _number(d: Mapping[str, Any], key: str, *, optional: bool) -> float | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JournalEntryInvalid(f"{key} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise JournalEntryInvalid(f"{key} is too large") from None
    if not math.isfinite(number):
        raise JournalEntryInvalid(f"{key} must be finite, got {value!r}")
    return number


def _aware(text: object, what: str) -> datetime:
    if not isinstance(text, str) or len(text) > 64:
        raise JournalEntryInvalid(f"{what} must be an ISO-8601 time")
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise JournalEntryInvalid(f"{what} {text[:64]!r} is not an ISO-8601 time") from None
    if at.tzinfo is None:
        raise JournalEntryInvalid(f"{what} {text!r} has no time zone")
    return at


def event_from_json(text: str) -> GridEvent:
    """A journaled event, every field re-validated; :class:`JournalEntryInvalid` otherwise."""
    if not isinstance(text, str) or len(text) > 16_384:
        raise JournalEntryInvalid("event_json is not a text of at most 16 KiB")
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise JournalEntryInvalid(f"event_json is not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise JournalEntryInvalid("event_json is not a JSON object")
    try:
        kind = ProgramKind(str(d.get("kind")))
        fail = FailDirection(str(d.get("fail")))
    except ValueError as exc:
        raise JournalEntryInvalid(str(exc)) from None
    return GridEvent(
        event_id=_text(d, "event_id"),
        source=_text(d, "source"),
        program=_text(d, "program"),
        kind=kind,
        start=_aware(d.get("start"), "start"),
        end=_aware(d.get("end"), "end"),
        max_site_kw=_number(d, "max_site_kw", optional=True),
        shed_kw=_number(d, "shed_kw", optional=True),
        payment_usd_per_mwh=_number(d, "payment_usd_per_mwh", optional=False) or 0.0,
        penalty_usd_per_mwh=_number(d, "penalty_usd_per_mwh", optional=False) or 0.0,
        fail=fail,
    )


# --- schema ------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE commanded (
    device_id  TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    since      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE events (
    event_id   TEXT PRIMARY KEY,
    event_json TEXT NOT NULL,
    baseline_w REAL NOT NULL,
    status     TEXT NOT NULL,
    start      TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX events_status ON events (status);
CREATE TABLE compliance (
    event_id       TEXT NOT NULL REFERENCES events (event_id),
    interval_start TEXT NOT NULL,
    interval_s     REAL NOT NULL,
    target_w       REAL NOT NULL,
    measured_w     REAL NOT NULL,
    PRIMARY KEY (event_id, interval_start)
);
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    source    TEXT NOT NULL,
    device_id TEXT,
    action    TEXT NOT NULL,
    reason    TEXT NOT NULL,
    result    TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
"""

# Added without a version bump: additive tables that an older reader ignores, created at every
# writable open of a version-1 journal.
_SCHEMA_V1_EXTRA = """
CREATE TABLE IF NOT EXISTS commands (
    command_id TEXT PRIMARY KEY,
    operator   TEXT NOT NULL,
    command    TEXT NOT NULL,
    accepted   INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    at         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fourcp (
    interval_start TEXT PRIMARY KEY,
    watt_seconds   REAL NOT NULL,
    seconds        REAL NOT NULL,
    metered_s      REAL NOT NULL,
    risk           REAL NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    payload TEXT NOT NULL,
    reason  TEXT NOT NULL
);
"""


def journal_path(configured: Path, config_file: Path | None = None) -> Path:
    """Where the journal lives: ``store.path`` from the config, made absolute.

    A relative path resolves against ``$STATE_DIRECTORY`` when systemd sets it (the service's
    ``StateDirectory=``), else against the config file's folder. Installs should configure an
    absolute path (``/var/lib/site-agent/journal.db``) so the CLI and the service agree.
    """
    if configured.is_absolute():
        return configured
    state_dir = os.environ.get("STATE_DIRECTORY")
    if state_dir:
        # systemd may pass several colon-separated folders; the first is ours.
        return Path(state_dir.split(":")[0]) / configured
    base = config_file.parent if config_file is not None else Path.cwd()
    return (base / configured).absolute()


# --- the store ---------------------------------------------------------------------------


class Store:
    """The journal. Open with ``async with Store.open(path) as store`` (or ``await``).

    Every method is a coroutine run on the store's own thread. Reads of a store opened with
    ``readonly=True`` never create or modify the file.
    """

    def __init__(
        self,
        path: Path,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
        readonly: bool,
        known_secrets: tuple[str, ...],
    ) -> None:
        self.path = path
        self.readonly = readonly
        self._executor = executor
        self._conn: sqlite3.Connection | None = conn
        self._secrets = known_secrets

    # -- lifecycle --

    @staticmethod
    def open(
        path: str | Path,
        *,
        readonly: bool = False,
        known_secrets: Iterable[str] = (),
    ) -> _StoreOpener:
        """Open (creating if needed, unless ``readonly``) the journal at ``path``.

        Raises :class:`StoreError` (a subclass says which) if the file is corrupt, not a
        site-agent journal, of a newer schema, or cannot be opened for writing.
        ``known_secrets`` are strings (passwords, tokens) scrubbed from every audit row.
        """
        return _StoreOpener(Path(path), readonly, tuple(s for s in known_secrets if s))

    @classmethod
    async def _open(cls, path: Path, readonly: bool, secrets: tuple[str, ...]) -> Store:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path, readonly)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn, readonly, secrets)

    async def close(self) -> None:
        """Checkpoint the WAL and close. Queued calls finish first. Closing twice is harmless."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, _close, conn, self.readonly)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None:
            raise StoreError(self.path, "the journal is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _guard_read, self.path, conn, fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None:
            raise StoreError(self.path, "the journal is closed")
        if self.readonly:
            raise StoreWriteError(self.path, "the journal was opened read-only")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _transaction, self.path, conn, fn)

    # -- commanded states --

    async def record_command(self, device_id: str, state: str, since: datetime) -> None:
        """Journal that ``device_id`` was commanded to ``state`` at ``since`` (upsert)."""
        await self.record_commands([(device_id, state, since)])

    async def record_commands(self, commands: Iterable[tuple[str, str, datetime]]) -> None:
        """Journal many commands in one transaction (one fsync for a whole cycle)."""
        now = _iso(datetime.now(UTC))
        rows = [
            (_nonempty(d, "device_id"), _nonempty(s, "state"), _ts(t, "since"), now)
            for d, s, t in commands
        ]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO commanded (device_id, state, since, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device_id) DO UPDATE SET state = excluded.state,"
                " since = excluded.since, updated_at = excluded.updated_at",
                rows,
            )

        if rows:
            await self._write(write)

    async def forget_devices(self, device_ids: Iterable[str]) -> None:
        """Drop the commanded state of devices no longer in the config."""
        ids = [(d,) for d in device_ids]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM commanded WHERE device_id = ?", ids)

        if ids:
            await self._write(write)

    async def commanded_states(self) -> dict[str, CommandedState]:
        """Commanded states; a row that does not read back is quarantined and left out."""
        bad: list[tuple[str, str, str, str]] = []

        def read(conn: sqlite3.Connection) -> dict[str, CommandedState]:
            cur = conn.execute("SELECT device_id, state, since FROM commanded ORDER BY device_id")
            out: dict[str, CommandedState] = {}
            for d, st, t in cur:
                try:
                    if not isinstance(st, str) or not st or len(st) > 64:
                        raise JournalEntryInvalid("state must be a short non-empty string")
                    out[str(d)] = CommandedState(st, _aware(t, "since"))
                except JournalEntryInvalid as exc:
                    bad.append(("commanded", str(d), json.dumps([st, t], default=str), str(exc)))
            return out

        states = await self._run(read)
        await self._quarantine(bad, table="commanded", key_column="device_id")
        return states

    # -- grid events --

    async def upsert_event(
        self,
        event: GridEvent,
        *,
        baseline_w: float,
        status: EventStatus | str = EventStatus.ACTIVE,
        at: datetime | None = None,
    ) -> None:
        """Journal a grid event (new or updated) with the site load at its start and its status.

        The baseline of an event already journaled is kept: it was measured when the event
        began, and a restart must not re-measure it on a curtailed site.
        """
        st = EventStatus(status)
        base = _finite(baseline_w, "baseline_w")
        if base < 0:
            raise ValueError(f"baseline_w must be >= 0 (got {baseline_w})")
        text = event_to_json(event)
        now = _ts(at, "at") if at is not None else _iso(datetime.now(UTC))
        start = _ts(event.start, "event start")

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO events (event_id, event_json, baseline_w, status, start, first_seen,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (event_id) DO UPDATE SET event_json = excluded.event_json,"
                " status = excluded.status, start = excluded.start,"
                " updated_at = excluded.updated_at",
                (event.event_id, text, base, str(st), start, now, now),
            )

        await self._write(write)

    async def set_event_status(
        self, event_id: str, status: EventStatus | str, at: datetime | None = None
    ) -> None:
        """Mark a journaled event ended or cancelled. Unknown ids raise ``KeyError``."""
        st = EventStatus(status)
        now = _ts(at, "at") if at is not None else _iso(datetime.now(UTC))

        def write(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE events SET status = ?, updated_at = ? WHERE event_id = ?",
                (str(st), now, event_id),
            )
            if cur.rowcount == 0:
                raise KeyError(f"no journaled event {event_id!r}")

        await self._write(write)

    async def active_events(self) -> list[StoredEvent]:
        """Events journaled as active, oldest start first (what a restart resumes)."""
        return await self._events("WHERE status = ?", (str(EventStatus.ACTIVE),))

    async def events(self) -> list[StoredEvent]:
        """Every journaled event, oldest start first."""
        return await self._events("", ())

    async def _events(self, where: str, params: tuple[str, ...]) -> list[StoredEvent]:
        """Journaled events, each re-validated: a row that fails is quarantined and left out."""
        bad: list[tuple[str, str, str, str]] = []

        def read(conn: sqlite3.Connection) -> list[StoredEvent]:
            cur = conn.execute(
                "SELECT event_id, event_json, baseline_w, status, first_seen, updated_at FROM"
                f" events {where} ORDER BY start, event_id",
                params,
            )
            out: list[StoredEvent] = []
            for eid, j, b, st, f, u in cur:
                try:
                    event = event_from_json(j)
                    if event.event_id != eid:
                        raise JournalEntryInvalid(f"event_json names {event.event_id!r}")
                    baseline = _number({"baseline_w": b}, "baseline_w", optional=False)
                    if baseline is None or baseline < 0:
                        raise JournalEntryInvalid("baseline_w must be >= 0")
                    out.append(
                        StoredEvent(
                            event,
                            baseline,
                            EventStatus(st),
                            _aware(f, "first_seen"),
                            _aware(u, "updated_at"),
                        )
                    )
                except (JournalEntryInvalid, ValueError) as exc:
                    bad.append(("event", str(eid), str(j)[:2000], str(exc)[:300]))
            return out

        events = await self._run(read)
        await self._quarantine(bad, table="events", key_column="event_id")
        return events

    async def quarantine_event(self, event_id: str, reason: str) -> None:
        """Set a journaled event aside (it failed the limits): never put in force again."""

        def read(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT event_json FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            return "" if row is None else str(row[0])

        payload = await self._run(read)
        await self._quarantine([("event", event_id, payload[:2000], reason)], "events", "event_id")

    async def _quarantine(
        self, bad: list[tuple[str, str, str, str]], table: str, key_column: str
    ) -> None:
        """Record each bad row in ``quarantine`` with an audit row, and take it out of use.

        Events are marked ``quarantined`` (kept for inspection); a commanded state is deleted
        (the first poll adopts what the device does). A read-only journal only skips them.
        """
        if not bad or self.readonly:
            return
        now = _iso(datetime.now(UTC))
        s = self._secrets

        def write(conn: sqlite3.Connection) -> None:
            for kind, key, payload, reason in bad:
                conn.execute(
                    "INSERT INTO quarantine (at, kind, key, payload, reason)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (now, kind, scrub(key, s), scrub(payload, s), scrub(reason, s)),
                )
                conn.execute(
                    "INSERT INTO audit (at, source, device_id, action, reason, result, detail)"
                    " VALUES (?, 'journal', ?, 'quarantine', ?, 'rejected', ?)",
                    (
                        now,
                        scrub(key, s) if kind == "commanded" else None,
                        scrub(f"{kind} {key}: {reason}", s),
                        json.dumps({"kind": kind, "key": scrub(key, s)}),
                    ),
                )
                if table == "events":
                    conn.execute(
                        "UPDATE events SET status = ?, updated_at = ? WHERE event_id = ?",
                        (str(EventStatus.QUARANTINED), now, key),
                    )
                else:
                    conn.execute(f"DELETE FROM {table} WHERE {key_column} = ?", (key,))

        await self._write(write)

    async def quarantined(self) -> list[QuarantineRow]:
        """Every quarantined entry, oldest first."""

        def read(conn: sqlite3.Connection) -> list[QuarantineRow]:
            if not _has_table(conn, "quarantine"):
                return []
            cur = conn.execute(
                "SELECT id, at, kind, key, payload, reason FROM quarantine ORDER BY id"
            )
            return [QuarantineRow(i, _parse_ts(a), k, key, p, r) for i, a, k, key, p, r in cur]

        return await self._run(read)

    # -- operator commands (deduplication) --

    async def command_answer(self, command_id: str) -> CommandAnswer | None:
        """The answer first given to ``command_id`` (by whichever operator), or None."""

        def read(conn: sqlite3.Connection) -> CommandAnswer | None:
            if not _has_table(conn, "commands"):
                return None
            row = conn.execute(
                "SELECT command_id, operator, command, accepted, reason, at FROM commands"
                " WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            if row is None:
                return None
            cid, op, name, accepted, reason, at = row
            return CommandAnswer(cid, op, name, bool(accepted), reason, _parse_ts(at))

        return await self._run(read)

    async def record_command_answer(
        self, command_id: str, operator: str, command: str, accepted: bool, reason: str
    ) -> None:
        """Journal the answer to a command; the first answer to an id is kept."""
        now = _iso(datetime.now(UTC))
        row = (
            _nonempty(command_id, "command_id"),
            _nonempty(operator, "operator"),
            _nonempty(command, "command"),
            1 if accepted else 0,
            scrub(reason, self._secrets),
            now,
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO commands (command_id, operator, command, accepted, reason, at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
                row,
            )

        await self._write(write)

    async def record_compliance(
        self,
        event_id: str,
        interval_start: datetime,
        target_w: float,
        measured_w: float,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        """Journal one interval of an event (upsert: the latest figure for an interval wins)."""
        start = _ts(interval_start, "interval_start")
        target = _finite(target_w, "target_w")
        measured = _finite(measured_w, "measured_w")
        length = _finite(interval_s, "interval_s")
        if length <= 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s})")

        def write(conn: sqlite3.Connection) -> None:
            known = conn.execute("SELECT 1 FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if known is None:
                raise KeyError(f"no journaled event {event_id!r}")
            conn.execute(
                "INSERT INTO compliance (event_id, interval_start, interval_s, target_w,"
                " measured_w) VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id, interval_start)"
                " DO UPDATE SET interval_s = excluded.interval_s,"
                " target_w = excluded.target_w, measured_w = excluded.measured_w",
                (event_id, start, length, target, measured),
            )

        await self._write(write)

    async def record_fourcp(self, interval: FourCpInterval) -> None:
        """Journal a 4CP-risk interval as observed so far (upsert: the latest figure wins)."""
        row = (
            _ts(interval.start, "interval_start"),
            _finite(interval.watt_seconds, "watt_seconds"),
            _finite(interval.seconds, "seconds"),
            _finite(interval.metered_s, "metered_s"),
            _finite(interval.risk, "risk"),
            _iso(datetime.now(UTC)),
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO fourcp (interval_start, watt_seconds, seconds, metered_s, risk,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (interval_start) DO UPDATE"
                " SET watt_seconds = excluded.watt_seconds, seconds = excluded.seconds,"
                " metered_s = excluded.metered_s, risk = excluded.risk,"
                " updated_at = excluded.updated_at",
                row,
            )

        await self._write(write)

    async def fourcp_intervals(self) -> list[FourCpInterval]:
        """Every journaled 4CP-risk interval, oldest first. A row that does not read back as
        finite, non-negative figures is quarantined (and left out), never trusted."""

        def read(conn: sqlite3.Connection) -> tuple[list[FourCpInterval], list[_Bad]]:
            if not _has_table(conn, "fourcp"):
                return [], []
            good: list[FourCpInterval] = []
            bad: list[_Bad] = []
            cur = conn.execute(
                "SELECT interval_start, watt_seconds, seconds, metered_s, risk FROM fourcp"
                " ORDER BY interval_start"
            )
            for row in cur:
                start, *values = row
                try:
                    at = _aware(start, "interval_start")
                    ws, secs, metered, risk = (float(v) for v in values)
                    if not all(math.isfinite(v) and v >= 0 for v in (ws, secs, metered, risk)):
                        raise ValueError("figures must be finite and not negative")
                    if metered > secs or risk > 1:
                        raise ValueError("metered seconds above seconds, or risk above 1")
                    good.append(FourCpInterval(at, ws, secs, metered, risk))
                except (JournalEntryInvalid, TypeError, ValueError) as exc:
                    bad.append(("fourcp", str(start), str(row)[:2000], str(exc)[:300]))
            return good, bad

        good, bad = await self._run(read)
        await self._quarantine(bad, table="fourcp", key_column="interval_start")
        return good

    async def compliance(self, event_id: str) -> list[ComplianceRow]:
        def read(conn: sqlite3.Connection) -> list[ComplianceRow]:
            cur = conn.execute(
                "SELECT interval_start, interval_s, target_w, measured_w FROM compliance"
                " WHERE event_id = ? ORDER BY interval_start",
                (event_id,),
            )
            return [ComplianceRow(event_id, _parse_ts(t), s, tw, m) for t, s, tw, m in cur]

        return await self._run(read)

    async def event_report(self) -> list[EventReport]:
        """Settlement of every journaled event (see :class:`EventReport` for the arithmetic)."""
        stored = await self.events()
        reports: list[EventReport] = []
        for s in stored:
            rows = await self.compliance(s.event.event_id)
            reports.append(_settle(s, rows))
        return reports

    # -- audit --

    async def audit(
        self,
        *,
        source: str,
        action: str,
        result: AuditResult | str,
        device_id: str | None = None,
        reason: str = "",
        detail: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """Journal one action or rejected input. ``detail`` is redacted before it is stored."""
        await self.audit_many(
            [AuditEntry(source, action, str(result), device_id, reason, detail, at)]
        )

    async def audit_many(self, entries: Iterable[AuditEntry]) -> None:
        """Journal many audit rows in one transaction (one fsync)."""
        now = _iso(datetime.now(UTC))
        rows = [self._audit_row(e, now) for e in entries]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO audit (at, source, device_id, action, reason, result, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        if rows:
            await self._write(write)

    def _audit_row(
        self, e: AuditEntry, now: str
    ) -> tuple[str, str, str | None, str, str, str, str]:
        s = self._secrets
        detail = redact(dict(e.detail or {}), s)
        return (
            _ts(e.at, "at") if e.at is not None else now,
            scrub(_nonempty(e.source, "source"), s),
            scrub(e.device_id, s) if e.device_id is not None else None,
            scrub(_nonempty(e.action, "action"), s),
            scrub(e.reason, s),
            scrub(_nonempty(str(e.result), "result"), s),
            json.dumps(detail, allow_nan=False, sort_keys=True),
        )

    async def audit_rows(
        self,
        since: datetime | None = None,
        limit: int | None = 1000,
        *,
        device_id: str | None = None,
    ) -> list[AuditRow]:
        """Audit rows at or after ``since``, oldest first; with ``limit``, the newest ``limit``."""
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("at >= ?")
            params.append(_ts(since, "since"))
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        tail = ""
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0 (got {limit})")
            tail = " LIMIT ?"
            params.append(limit)

        def read(conn: sqlite3.Connection) -> list[AuditRow]:
            cur = conn.execute(
                "SELECT id, at, source, device_id, action, reason, result, detail FROM audit"
                f" {where} ORDER BY id DESC{tail}",
                params,
            )
            rows = [
                AuditRow(i, _parse_ts(a), s, d, act, r, res, json.loads(det))
                for i, a, s, d, act, r, res, det in cur
            ]
            rows.reverse()
            return rows

        return await self._run(read)

    async def prune_audit(self, before: datetime) -> int:
        """Delete audit rows older than ``before``; returns how many went."""
        cutoff = _ts(before, "before")

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount

        return await self._write(write)


class _StoreOpener:
    """What :meth:`Store.open` returns: ``await`` it, or use it as an async context manager."""

    def __init__(self, path: Path, readonly: bool, secrets: tuple[str, ...]) -> None:
        self._args = (path, readonly, secrets)
        self._store: Store | None = None

    def __await__(self) -> Generator[Any, None, Store]:
        return Store._open(*self._args).__await__()

    async def __aenter__(self) -> Store:
        if self._store is not None:
            raise RuntimeError("this Store.open(...) was already entered")
        self._store = await Store._open(*self._args)
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()


# --- thread-side helpers (run only on the store's thread) -----------------------------------


def _nonempty(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string (got {value!r})")
    return value


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _describe(exc: sqlite3.Error) -> tuple[type[StoreError], str]:
    """Map an SQLite error to the store error a caller can act on."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreWriteError, f"disk full, journal write failed ({text})"
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreWriteError, f"journal is read-only, write failed ({text})"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StoreCorrupt, f"journal is corrupt ({text})"
    if name.startswith("SQLITE_CANTOPEN"):
        return StoreWriteError, (
            f"cannot open the journal file ({text}); is its folder writable and on a "
            "read-write file system?"
        )
    if name.startswith(("SQLITE_IOERR", "SQLITE_PERM")):
        return StoreWriteError, f"journal I/O error ({text})"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreWriteError, f"journal is locked by another process ({text})"
    return StoreError, f"journal error ({name or type(exc).__name__}: {text})"


def _transaction(
    path: Path, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]
) -> _T:
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = fn(conn)
        conn.execute("COMMIT")
        return result
    except BaseException as exc:
        if conn.in_transaction:
            # SQLite may already have rolled back by itself (e.g. after SQLITE_FULL).
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            kind, message = _describe(exc)
            raise kind(path, message) from exc
        raise


def _guard_read(path: Path, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    try:
        return fn(conn)
    except sqlite3.Error as exc:
        kind, message = _describe(exc)
        raise kind(path, message) from exc


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        if not path.is_file():
            raise StoreError(path, "no journal here (is the path right? the agent creates it)")
        target = f"file:{quote(str(path.absolute()))}?mode=ro"
    else:
        if path.exists() and not path.is_file():
            raise StoreError(path, "not a regular file")
        target = f"file:{quote(str(path.absolute()))}?mode=rwc"
    try:
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves, one per call.
        conn = sqlite3.connect(target, uri=True, isolation_level=None, timeout=5.0)
    except sqlite3.Error as exc:
        raise StoreWriteError(
            path, f"cannot open the journal ({exc}); does its folder exist and is it writable?"
        ) from exc
    try:
        _prepare(path, conn, readonly)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(path: Path, conn: sqlite3.Connection, readonly: bool) -> None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error as exc:
        kind, message = _describe(exc)
        if kind is StoreCorrupt or kind is StoreError:
            raise StoreCorrupt(
                path,
                f"not a readable SQLite database ({exc}); refusing to use or replace it. "
                "Move it aside (keep it for inspection) and restart to start a new journal",
            ) from exc
        raise kind(path, message) from exc
    fresh = version == 0 and app_id == 0 and tables == 0
    if not fresh:
        if app_id != APPLICATION_ID:
            raise StoreSchemaError(
                path, "is a SQLite database but not a site-agent journal; refusing to touch it"
            )
        if version > SCHEMA_VERSION:
            raise StoreSchemaError(
                path,
                f"journal schema {version} is newer than this site-agent reads "
                f"(up to {SCHEMA_VERSION}); upgrade site-agent or restore the matching version",
            )
        if version < 1:
            raise StoreSchemaError(path, f"unknown journal schema version {version}")
        _check_integrity(path, conn)
    if readonly:
        if fresh:
            raise StoreSchemaError(path, "empty file, not a site-agent journal")
        return
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(path, f"cannot switch the journal to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if fresh:
            # One transaction: tables, application id and version appear together or not at
            # all, so a crash mid-creation never leaves a file we would later refuse.
            conn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA_V1}"
                f"PRAGMA application_id={APPLICATION_ID};"
                f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        kind, message = _describe(exc)
        raise kind(path, f"cannot prepare the journal: {message}") from exc
    if not fresh:
        _probe_write(path, conn)
    try:
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA_V1_EXTRA}COMMIT;")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        kind, message = _describe(exc)
        raise kind(path, f"cannot prepare the journal: {message}") from exc


def _probe_write(path: Path, conn: sqlite3.Connection) -> None:
    """Fail at open, not at the first command, if the journal cannot be written.

    SQLite quietly opens a file it may not write as read-only (a read-only mount), and root
    ignores file modes, so a real committed write is the only honest test.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        kind, message = _describe(exc)
        raise kind(path, f"cannot write the journal at start: {message}") from exc


def _check_integrity(path: Path, conn: sqlite3.Connection) -> None:
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(path, f"journal is corrupt ({exc}); refusing to use it") from exc
    if problems != ["ok"]:
        raise StoreCorrupt(
            path, "journal is corrupt (" + "; ".join(problems) + "); refusing to use it"
        )


def _close(conn: sqlite3.Connection, readonly: bool) -> None:
    try:
        if not readonly:
            # Fold the WAL back into the main file so a clean stop leaves one file.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass  # the WAL is still valid; the next open replays it
    finally:
        conn.close()


def _settle(stored: StoredEvent, rows: list[ComplianceRow]) -> EventReport:
    ev = stored.event
    delivered_wh = 0.0
    shortfall_wh = 0.0
    compliant = 0
    for r in rows:
        hours = r.interval_s / 3600.0
        shortfall_wh += r.shortfall_w * hours
        delivered_wh += delivered_w(stored.baseline_w, r.measured_w, r.target_w) * hours
        if r.measured_w <= r.target_w:
            compliant += 1
    delivered_mwh = round(delivered_wh / 1e6, 6)
    shortfall_mwh = round(shortfall_wh / 1e6, 6)
    return EventReport(
        event_id=ev.event_id,
        program=ev.program,
        kind=str(ev.kind),
        status=stored.status,
        start=ev.start,
        end=ev.end,
        baseline_w=stored.baseline_w,
        target_w=event_target_w(ev, stored.baseline_w),
        intervals=len(rows),
        compliant_intervals=compliant,
        delivered_mwh=delivered_mwh,
        shortfall_mwh=shortfall_mwh,
        payment_usd=round(delivered_mwh * ev.payment_usd_per_mwh, 2),
        penalty_usd=round(shortfall_mwh * ev.penalty_usd_per_mwh, 2),
    )
