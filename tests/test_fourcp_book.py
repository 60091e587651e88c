"""The live 4CP book: what it counts as observed, where it books a sample, what it keeps."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.control.config import parse_config
from agent.control.cooling import SiteLoadModel
from agent.journal.store import Store
from agent.runtime.fourcp import FourCpBook
from tests.sample_state import sample_snapshot

CONFIG = parse_config(
    {
        "site": {"id": "b", "interconnect_limit_kw": 100},
        "grid": {"fourcp": {"enabled": True, "risk_threshold": 0.5, "rate_usd_per_kw_year": 60}},
        "prices": {"realtime": {"type": "constant", "value": 30}},
    }
)
T0 = datetime(2023, 6, 27, 21, 45, tzinfo=UTC)


async def test_book_integrates_flagged_samples_per_interval_and_a_restart_resumes(
    tmp_path: Path,
) -> None:
    metered = replace(
        sample_snapshot(),
        fourcp_risk=0.9,
        measured_site_power_w=10_000.0,
        load_model=SiteLoadModel(source="meter"),
    )
    fallback = replace(metered, measured_site_power_w=16_000.0, load_model=SiteLoadModel())
    async with Store.open(tmp_path / "j.db") as store:
        book = FourCpBook(CONFIG, store)
        await book.record(T0, metered)  # the first sample stands for one second
        await book.record(T0 + timedelta(seconds=10), metered)
        await book.record(T0 + timedelta(seconds=20), fallback)
        iv = book.intervals[T0]
        assert iv.seconds == 21
        assert iv.metered_s == 11
        assert iv.source == "mixed"
        assert iv.demand_w == (10_000 * 11 + 16_000 * 10) / 21
        # Below the threshold: not a 4CP interval, nothing booked, and the gap is not observed.
        await book.record(T0 + timedelta(seconds=30), replace(metered, fourcp_risk=0.4))
        await book.record(T0 + timedelta(seconds=40), metered)
        assert book.intervals[T0].seconds == 22
        # The next interval starts a new figure.
        await book.record(T0 + timedelta(minutes=15, seconds=5), metered)
        assert book.intervals[T0 + timedelta(minutes=15)].seconds == 5
        (june,) = book.figures.months
        assert june.peak.start == T0
        assert june.intervals == 2
    async with Store.open(tmp_path / "j.db") as store:
        again = FourCpBook(CONFIG, store)
        await again.restore()
        assert again.intervals == book.intervals
        assert again.figures == book.figures
        # Two seasons on, the oldest leaves memory (the journal keeps it).
        await again.record(T0.replace(year=2025), metered)
        assert set(again.intervals) == {T0.replace(year=2025)}
        assert len(await store.fourcp_intervals()) == 3
