"""The journal against the real SQLite file: durability, refusal of bad files, write failures,
audit redaction and event settlement arithmetic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from agent.control.config import parse_config
from agent.control.redaction import redact, secrets_in
from agent.journal.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    AuditEntry,
    AuditResult,
    CommandedState,
    EventStatus,
    Store,
    StoreCorrupt,
    StoreError,
    StoreSchemaError,
    StoreWriteError,
    journal_path,
)
from agent.runtime.actuator import AuditSink
from drivers.grid.base import FailDirection, GridEvent, ProgramKind

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 7, 1, 18, 0, tzinfo=UTC)


def _event(event_id: str = "ev-1", **kw: object) -> GridEvent:
    fields: dict[str, object] = {
        "event_id": event_id,
        "source": "openadr",
        "program": "ercot-ers",
        "kind": ProgramKind.ECONOMIC,
        "start": T0,
        "end": T0 + timedelta(hours=1),
        "max_site_kw": 1000.0,
        "payment_usd_per_mwh": 100.0,
        "penalty_usd_per_mwh": 250.0,
        "fail": FailDirection.CURTAIL,
    }
    fields.update(kw)
    return GridEvent(**fields)  # type: ignore[arg-type]


# --- round trips ----------------------------------------------------------------------------


async def test_commanded_states_upsert_and_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Store.open(db) as store:
        await store.record_command("m-001", "sleep", T0)
        await store.record_command("m-002", "high", T0)
        await store.record_command("m-001", "low", T0 + timedelta(minutes=5))  # upsert
    async with Store.open(db) as store:
        states = await store.commanded_states()
    assert states == {
        "m-001": CommandedState("low", T0 + timedelta(minutes=5)),
        "m-002": CommandedState("high", T0),
    }
    state, since = states["m-002"]
    assert (state, since) == ("high", T0)


async def test_store_is_wal_with_full_sync_and_versioned(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Store.open(db) as store:
        # synchronous is per connection: ask the store's own (2 = FULL: fsync on every commit).
        assert await store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    finally:
        conn.close()


async def test_concurrent_calls_share_one_thread_safely(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "j.db") as store:
        await asyncio.gather(
            *(store.record_command(f"m-{i:03d}", "sleep", T0) for i in range(40)),
            *(store.audit(source="policy", action="sleep", result="ok") for _ in range(40)),
        )
        assert len(await store.commanded_states()) == 40
        assert len(await store.audit_rows(limit=None)) == 40


async def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "j.db") as store:
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.record_commands(
                [("m-1", "sleep", T0), ("m-2", "sleep", datetime(2026, 7, 1))]
            )
        assert await store.commanded_states() == {}
        with pytest.raises(ValueError, match="finite"):
            await store.upsert_event(_event(), baseline_w=float("nan"))
        with pytest.raises(KeyError, match="no journaled event 'nope'"):
            await store.record_compliance("nope", T0, 1.0, 2.0)
        await store.upsert_event(_event(), baseline_w=1_500_000)
        with pytest.raises(ValueError, match="measured_w must be a finite"):
            await store.record_compliance("ev-1", T0, 1e6, float("inf"))
        with pytest.raises(ValueError, match="non-empty"):
            await store.audit(source="", action="x", result="ok")
        assert await store.compliance("ev-1") == []
        assert await store.audit_rows() == []


async def test_events_resume_keeps_first_baseline(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    async with Store.open(db) as store:
        await store.upsert_event(_event("ev-1"), baseline_w=1_500_000)
        await store.upsert_event(_event("ev-2", start=T0 + timedelta(hours=2)), baseline_w=9.0)
        # A restart mid-event re-announces it with the (curtailed) load of now: ignored.
        await store.upsert_event(_event("ev-1", max_site_kw=800.0), baseline_w=700_000)
        await store.set_event_status("ev-2", EventStatus.CANCELLED)
        with pytest.raises(KeyError):
            await store.set_event_status("ev-9", EventStatus.ENDED)
    async with Store.open(db) as store:
        active = await store.active_events()
        everything = await store.events()
    assert [a.event.event_id for a in active] == ["ev-1"]
    assert active[0].baseline_w == 1_500_000
    assert active[0].event.max_site_kw == 800.0  # the event itself is updated
    assert active[0].event == _event("ev-1", max_site_kw=800.0)
    assert [(e.event.event_id, e.status) for e in everything] == [
        ("ev-1", EventStatus.ACTIVE),
        ("ev-2", EventStatus.CANCELLED),
    ]


# --- audit and redaction --------------------------------------------------------------------


async def test_audit_rows_round_trip_filter_and_limit(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "j.db") as store:
        await store.audit(
            source="policy",
            device_id="m-001",
            action="sleep",
            reason="price 210 > breakeven 78",
            result=AuditResult.OK,
            detail={"delta_power_w": -3068.0, "attempts": 1},
            at=T0,
        )
        await store.audit_many(
            [
                AuditEntry("mqtt", "command", "rejected", reason="bad JSON", at=T0 + timedelta(1)),
                AuditEntry("policy", "wake", "failed", "m-002", "cheap", None, T0 + timedelta(2)),
            ]
        )
        rows = await store.audit_rows()
        assert [(r.source, r.action, r.result) for r in rows] == [
            ("policy", "sleep", "ok"),
            ("mqtt", "command", "rejected"),
            ("policy", "wake", "failed"),
        ]
        first = rows[0]
        assert first.at == T0
        assert first.device_id == "m-001"
        assert first.reason == "price 210 > breakeven 78"
        assert first.detail == {"delta_power_w": -3068.0, "attempts": 1}
        assert rows[1].device_id is None
        since = await store.audit_rows(since=T0 + timedelta(hours=1))
        assert [r.action for r in since] == ["command", "wake"]
        newest = await store.audit_rows(limit=1)
        assert [r.action for r in newest] == ["wake"]
        assert [r.action for r in await store.audit_rows(device_id="m-002")] == ["wake"]
        assert await store.prune_audit(T0 + timedelta(hours=1)) == 1
        assert len(await store.audit_rows()) == 2


async def test_audit_never_stores_credentials(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    secret = "hunter2-Sup3r"
    async with Store.open(db, known_secrets=[secret]) as store:
        await store.audit(
            source="operator:alice",
            device_id="m-001",
            action="set_profile",
            result="failed",
            reason=f"login refused with password {secret}",
            detail={
                "password": "pw-in-clear",
                "miner": {"username": "root", "apiKey": "k-123", "X-Auth-Token": "t-456"},
                "mqtt_password": SecretStr("s-789"),
                "tokens": ["a", "b"],
                "url": f"http://root:{secret}@127.0.0.1/",
                "power_w": 3068.0,
                "nan": float("nan"),
            },
        )
        (row,) = await store.audit_rows()
    assert row.reason == "login refused with password ***"
    assert row.detail == {
        "password": "***",
        "miner": {"username": "root", "apiKey": "***", "X-Auth-Token": "***"},
        "mqtt_password": "***",
        "tokens": "***",
        "url": "http://root:***@127.0.0.1/",
        "power_w": 3068.0,
        "nan": "nan",
    }
    raw = _journal_bytes(tmp_path, "j.db")
    for leaked in (secret, "pw-in-clear", "k-123", "t-456", "s-789"):
        assert leaked.encode() not in raw


async def test_store_is_the_actuators_audit_sink(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "j.db") as store:
        sink: AuditSink = store  # checked by mypy: the runtime passes the store as is
        await sink.audit(
            source="policy", device_id="m-1", action="sleep:sleep", reason="r", result="ok"
        )
        (row,) = await store.audit_rows()
    assert (row.device_id, row.action, row.result) == ("m-1", "sleep:sleep", "ok")


def test_secrets_in_config_are_all_found() -> None:
    cfg = parse_config(
        {
            "site": {"id": "s1", "interconnect_limit_kw": 5000},
            "prices": {"realtime": {"type": "constant", "value": 30}},
            "miner_models": {
                "s19": {"profiles": [{"name": "p", "power_w": 3000, "hashrate_ths": 100}]}
            },
            "miners": [
                {
                    "id": "m",
                    "address": "127.1.0.1",
                    "model": "s19",
                    "credentials": {"username": "root", "password": "miner-pw"},
                }
            ],
            "mqtt": {"password": "broker-pw", "command_tokens": {"alice": "tok-a", "bob": ""}},
        }
    )
    assert sorted(secrets_in(cfg)) == ["broker-pw", "miner-pw", "tok-a"]


def test_redact_keeps_ordinary_keys() -> None:
    value = {"passive": 1, "device": "m-1", "reason": "x", "power_w": 2.0, "bypass": True}
    assert redact(value) == value


# --- event settlement -----------------------------------------------------------------------


async def test_event_report_arithmetic_hand_computed(tmp_path: Path) -> None:
    """A 1-hour event, max 1,000 kW, baseline 1,500 kW, four 15-minute intervals.

    measured 900, 1,000, 1,200, 1,100 kW:
      shortfall = (0 + 0 + 200 + 100) kW × 0.25 h = 75 kWh = 0.075 MWh
      delivered = (1500−1000 + 1500−1000 + 1500−1200 + 1500−1100) × 0.25 = 425 kWh = 0.425 MWh
      payment = 0.425 × 100 = 42.50 USD; penalty = 0.075 × 250 = 18.75 USD; net 23.75 USD
    A shed-Y event: baseline 2,000 kW, shed 500 kW → target 1,500 kW; two 5-minute intervals
    measured 1,400 and 1,600 kW: shortfall 100 kW × 1/12 h = 0.008333 MWh; delivered
    (500 + 400) kW × 1/12 h = 0.075 MWh; payment 0.075 × 80 = 6.00; penalty 0.008333 × 3,000
    = 25.00 (24.999 rounded to the cent).
    """
    async with Store.open(tmp_path / "j.db") as store:
        await store.upsert_event(_event("ev-1"), baseline_w=1_500_000)
        for i, kw in enumerate([900, 1000, 1200, 1100]):
            start = T0 + timedelta(minutes=15 * i)
            await store.record_compliance("ev-1", start, 1_000_000, kw * 1000.0)
        # A later figure for the same interval replaces the earlier one.
        await store.record_compliance("ev-1", T0, 1_000_000, 950_000)
        await store.record_compliance("ev-1", T0, 1_000_000, 900_000)
        shed = _event(
            "ev-2",
            start=T0 + timedelta(hours=3),
            end=T0 + timedelta(hours=3, minutes=10),
            max_site_kw=None,
            shed_kw=500.0,
            payment_usd_per_mwh=80.0,
            penalty_usd_per_mwh=3000.0,
            kind=ProgramKind.EMERGENCY,
        )
        await store.upsert_event(shed, baseline_w=2_000_000, status=EventStatus.ENDED)
        for i, kw in enumerate([1400, 1600]):
            start = shed.start + timedelta(minutes=5 * i)
            await store.record_compliance("ev-2", start, 1_500_000, kw * 1000.0, interval_s=300)
        one, two = await store.event_report()

    assert (one.event_id, one.status, one.start, one.end) == (
        "ev-1",
        "active",
        T0,
        T0 + timedelta(hours=1),
    )
    assert one.target_w == 1_000_000
    assert (one.intervals, one.compliant_intervals) == (4, 2)
    assert one.shortfall_mwh == 0.075
    assert one.delivered_mwh == 0.425
    assert (one.payment_usd, one.penalty_usd, one.net_usd) == (42.5, 18.75, 23.75)

    assert (two.event_id, two.status, two.kind) == ("ev-2", "ended", "emergency")
    assert two.target_w == 1_500_000
    assert (two.intervals, two.compliant_intervals) == (2, 1)
    assert two.shortfall_mwh == 0.008333
    assert two.delivered_mwh == 0.075
    assert (two.payment_usd, two.penalty_usd, two.net_usd) == (6.0, 25.0, -19.0)


# --- refusing bad files ----------------------------------------------------------------------


async def test_corrupt_file_gives_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    junk = b"this is not a database at all\n" * 200
    db.write_bytes(junk)
    with pytest.raises(StoreCorrupt) as info:
        await Store.open(db)
    assert str(db) in str(info.value)
    assert "not a readable SQLite database" in str(info.value)
    assert db.read_bytes() == junk  # never recreated over
    assert _names(tmp_path) == ["journal.db"]


async def test_damaged_page_is_detected_at_open(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Store.open(db) as store:
        await store.audit_many(
            AuditEntry("policy", "sleep", "ok", f"m-{i}", "x" * 200) for i in range(400)
        )
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    # Scribble over the middle of the file, leaving the header (page 1) intact.
    data[4 * page : 6 * page] = b"\xa5" * (2 * page)
    db.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="corrupt") as info:
        await Store.open(db)
    assert str(db) in str(info.value)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(StoreSchemaError, match="newer than this site-agent reads") as info:
        await Store.open(db)
    assert str(db) in str(info.value)
    with pytest.raises(StoreSchemaError):
        await Store.open(db, readonly=True)
    assert db.read_bytes() == before


async def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreSchemaError, match="not a site-agent journal"):
        await Store.open(db)


async def test_readonly_open_never_creates(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no journal here"):
        await Store.open(db, readonly=True)
    assert not db.exists()


async def test_readonly_store_refuses_writes_but_reads(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
    async with Store.open(db, readonly=True) as ro:
        assert (await ro.commanded_states())["m-1"].state == "sleep"
        with pytest.raises(StoreWriteError, match="read-only"):
            await ro.record_command("m-1", "high", T0)


async def test_cli_can_read_while_the_agent_writes(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    async with Store.open(db) as agent:
        await agent.record_command("m-1", "sleep", T0)
        async with Store.open(db, readonly=True) as cli:
            assert list(await cli.commanded_states()) == ["m-1"]
            await agent.record_command("m-2", "high", T0)
            assert list(await cli.commanded_states()) == ["m-1", "m-2"]
        await agent.record_command("m-3", "low", T0)  # the reader left the writer unharmed
        assert len(await agent.commanded_states()) == 3


# --- unwritable and full ---------------------------------------------------------------------


async def test_path_under_a_file_gives_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(StoreWriteError, match="cannot open the journal") as info:
        await Store.open(blocker / "journal.db")
    assert str(blocker / "journal.db") in str(info.value)


async def test_disk_full_via_max_page_count_then_recovers(tmp_path: Path) -> None:
    """Simulated disk full: SQLite's own page cap returns SQLITE_FULL, as ENOSPC does."""
    db = tmp_path / "j.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
        pages = await store._run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await store._run(lambda c: c.execute(f"PRAGMA max_page_count={pages + 2}"))
        with pytest.raises(StoreWriteError, match="disk full") as info:
            await _fill(store, rows=200, size=2000)
        assert str(db) in str(info.value)
        assert (await store.commanded_states())["m-1"].state == "sleep"
        written = len(await store.audit_rows(limit=None))
        assert written < 200
        # The fault clears (space freed): writes work again on the same store.
        await store._run(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
        await store.record_command("m-1", "high", T0)
    async with Store.open(db) as store:
        assert (await store.commanded_states())["m-1"].state == "high"
        assert len(await store.audit_rows(limit=None)) == written


def _journal_bytes(folder: Path, name: str) -> bytes:
    """The journal and its WAL/shm files, concatenated: what an attacker with the disk sees."""
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith(name))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _fill(store: Store, rows: int, size: int) -> None:
    for _ in range(rows):
        await store.audit(source="policy", action="sleep", result="ok", reason="y" * size)


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {args} here: {done.stderr.strip()}")


def _read_only_bind(point: Path) -> None:
    _mount("--bind", str(point), str(point))
    _mount("-o", "remount,ro,bind", str(point))


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """A folder we may mount over; unmounted (even if a test fails) afterwards."""
    if not _can_mount():
        pytest.skip("needs root and mount(8) to mount a tmpfs / read-only bind")
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    while subprocess.run(["mountpoint", "-q", str(point)], check=False).returncode == 0:
        subprocess.run(["umount", "-l", str(point)], check=False)


async def test_full_tmpfs_gives_disk_full_error(mountpoint: Path) -> None:
    await asyncio.to_thread(_mount, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint))
    db = mountpoint / "journal.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
        with pytest.raises(StoreWriteError) as info:
            await _fill(store, rows=1000, size=4000)
        assert "disk full" in str(info.value) or "I/O error" in str(info.value)
        assert str(db) in str(info.value)
        assert (await store.commanded_states())["m-1"].state == "sleep"


async def test_read_only_mount_gives_clear_error_at_open(mountpoint: Path, tmp_path: Path) -> None:
    db = mountpoint / "journal.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
    await asyncio.to_thread(_read_only_bind, mountpoint)
    with pytest.raises(StoreWriteError, match=r"read-only|read-write file system") as info:
        await Store.open(db)
    assert str(db) in str(info.value)
    assert "corrupt" not in str(info.value)


async def test_read_only_mount_of_live_journal_fails_at_open(
    mountpoint: Path, tmp_path: Path
) -> None:
    """As above, while another connection keeps the WAL files: SQLite would open read-only."""
    db = mountpoint / "journal.db"
    async with Store.open(db) as store:
        await store.record_command("m-1", "sleep", T0)
        await asyncio.to_thread(_read_only_bind, mountpoint)
        with pytest.raises(StoreWriteError, match="read-only") as info:
            await Store.open(db)
        assert str(db) in str(info.value)
        async with Store.open(db, readonly=True) as ro:  # the CLI can still read it
            assert (await ro.commanded_states())["m-1"].state == "sleep"


# --- kill -9 ---------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from agent.journal.store import Store

    async def main(path):
        async with Store.open(path) as store:
            i = 0
            while True:
                await store.record_command(f"m-{i:05d}", "sleep", datetime.now(UTC))
                await store.audit(source="policy", action="sleep", result="ok",
                                  device_id=f"m-{i:05d}")
                i += 1
                print(i, flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_committed_rows_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WRITER,
        str(db),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    acknowledged = 0
    try:
        async with asyncio.timeout(30):
            while acknowledged < 60:
                line = await proc.stdout.readline()
                assert line, "writer died before writing"
                acknowledged = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Acknowledgements still in the pipe count too: the writer got that far before the kill.
    for line in (await proc.stdout.read()).split():
        acknowledged = int(line)
    async with Store.open(db) as store:
        states = await store.commanded_states()
        audited = {r.device_id for r in await store.audit_rows(limit=None)}
    for i in range(acknowledged):
        assert f"m-{i:05d}" in states
        assert f"m-{i:05d}" in audited
    # At most the command after the last acknowledgement was committed unacknowledged.
    assert len(states) <= acknowledged + 1


# --- paths -----------------------------------------------------------------------------------


def test_journal_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = tmp_path / "etc" / "site.yaml"
    assert journal_path(Path("/var/lib/x/j.db"), cfg) == Path("/var/lib/x/j.db")
    assert journal_path(Path("j.db"), cfg) == tmp_path / "etc" / "j.db"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/site-agent:/var/lib/other")
    assert journal_path(Path("j.db"), cfg) == Path("/var/lib/site-agent/j.db")


def test_to_json_is_plain_json() -> None:
    from agent.journal.store import AuditRow

    row = AuditRow(1, T0, "policy", None, "sleep", "r", "ok", {"a": 1})
    assert json.loads(json.dumps(row.to_json()))["at"] == "2026-07-01T18:00:00.000000+00:00"
