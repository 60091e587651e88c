"""``site-agent audit`` and ``site-agent events report`` against a real journal file."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.cli import journal as store_cli
from agent.cli import main as cli
from agent.cli.journal import parse_since
from agent.journal.store import Store
from drivers.grid.base import GridEvent, ProgramKind

NOW = datetime.now(UTC)


def main(argv: list[str]) -> int:
    """``site-agent`` with only this module's sub-commands, as agent.cli.main.main builds them.

    Built here rather than through agent.cli.main so these tests do not depend on every other
    command module importing cleanly.
    """
    parser = argparse.ArgumentParser(prog="site-agent")
    store_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_includes_these_commands() -> None:
    assert "agent.cli.journal" in cli.COMMAND_MODULES


async def _fill(db: Path) -> None:
    async with Store.open(db) as store:
        await store.audit(
            source="policy",
            device_id="m-001",
            action="sleep",
            result="ok",
            reason="price above breakeven",
            detail={"delta_power_w": -3068.0},
            at=NOW - timedelta(hours=3),
        )
        await store.audit(
            source="mqtt",
            action="command",
            result="rejected",
            reason="bad token",
            detail={"token": "leaked?"},
            at=NOW - timedelta(minutes=10),
        )
        event = GridEvent(
            event_id="ev-1",
            source="mqtt",
            program="ers",
            kind=ProgramKind.ECONOMIC,
            start=datetime(2026, 7, 1, 18, tzinfo=UTC),
            end=datetime(2026, 7, 1, 19, tzinfo=UTC),
            max_site_kw=1000.0,
            payment_usd_per_mwh=100.0,
            penalty_usd_per_mwh=250.0,
        )
        await store.upsert_event(event, baseline_w=1_500_000)
        await store.record_compliance("ev-1", event.start, 1_000_000, 1_200_000)


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    db = tmp_path / "journal.db"
    asyncio.run(_fill(db))
    return db


def test_audit_prints_rows_oldest_first(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--db", str(journal)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "policy  m-001  sleep  ok  price above breakeven" in lines[0]
    assert '"delta_power_w": -3068.0' in lines[0]
    assert "mqtt  -  command  rejected  bad token" in lines[1]
    assert "leaked?" not in "\n".join(lines)


def test_audit_since_relative_and_json(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--db", str(journal), "--since", "-1h", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["source"], r["result"], r["detail"]) for r in rows] == [
        ("mqtt", "rejected", {"token": "***"})
    ]
    since = (NOW - timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%S")
    assert main(["audit", "--db", str(journal), "--since", since, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_audit_through_config_store_path(
    journal: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "site: {id: s1, interconnect_limit_kw: 5000}\n"
        "prices: {realtime: {type: constant, value: 30}}\n"
        # Only the service has $CREDENTIALS_DIRECTORY; reading the audit must not need it.
        "mqtt: {enabled: true, username: agent, password: 'cred:mqtt-password'}\n"
        f"store: {{path: {journal.name}}}\n"
    )
    assert main(["audit", "--config", str(cfg), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_config_with_bad_store_path_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text("store: {path: [1, 2]}\n")
    assert main(["events", "report", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: store.path:" in err


def test_audit_missing_journal_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "nothing.db"
    assert main(["audit", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert str(db) in err
    assert "no journal here" in err
    assert not db.exists()


def test_bad_since_is_rejected(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "--db", str(journal), "--since", "yesterday"])
    assert info.value.code == 2
    assert "not a time: 'yesterday'" in capsys.readouterr().err


def test_parse_since() -> None:
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert parse_since("-90m", now) == datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    assert parse_since("-2d", now) == datetime(2026, 11, 21, 12, tzinfo=UTC)
    assert parse_since("2d", now) == parse_since("-2d", now)
    assert parse_since("2026-11-23T01:00Z") == datetime(2026, 11, 23, 1, tzinfo=UTC)
    assert parse_since("2026-11-23 01:00") == datetime(2026, 11, 23, 1, tzinfo=UTC)


def test_events_report_text_and_json(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "report", "--db", str(journal), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    # one 15-min interval 200 kW over target: 0.05 MWh short (12.50 USD); 300 kW delivered.
    assert report["shortfall_mwh"] == 0.05
    assert report["delivered_mwh"] == 0.075
    assert (report["payment_usd"], report["penalty_usd"], report["net_usd"]) == (7.5, 12.5, -5.0)
    assert main(["events", "report", "--db", str(journal)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["event", "program", "status"]
    assert out[1].split()[:3] == ["ev-1", "ers", "active"]
    assert "2026-07-01 18:00 – 2026-07-01 19:00" in out[1]
    assert out[1].split()[-5:] == ["1000.0", "0/1", "0.050000", "7.50", "12.50"]
