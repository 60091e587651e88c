"""A daily hashprice series as a live source: read on the market's clock when prices replay."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.control.config import load_config
from agent.runtime.wiring import build_price_source, build_signals
from drivers.errors import BadInput, SourceError
from drivers.prices.hashprice import CsvHashpriceSettings, HashpriceReplay


async def test_replay_reads_the_day_of_its_clock(tmp_path: Path) -> None:
    csv = tmp_path / "btc.csv"
    csv.write_text(
        "date,btc_usd,difficulty,hashprice_usd_per_ph_day\n"
        "2023-09-04,25812.42,55621444139430.00,58.3472\n"
        "2023-09-05,25779.77,55621444139430.00,58.2734\n"
        "2023-09-06,25753.25,55621444139430.00,58.2134\n"
    )
    now = {"t": datetime(2023, 9, 5, 23, 59, tzinfo=UTC)}
    src = HashpriceReplay.from_settings(CsvHashpriceSettings(path=csv), clock=lambda: now["t"])
    reading = await src.latest()
    assert reading.value == 58.2734
    assert reading.interval_start == datetime(2023, 9, 5, tzinfo=UTC)
    assert reading.interval_s == 86400.0
    now["t"] = datetime(2023, 9, 6, 0, 0, tzinfo=UTC)
    assert (await src.latest()).value == 58.2134
    now["t"] = datetime(2023, 9, 7, 0, 0, tzinfo=UTC)
    with pytest.raises(SourceError, match="no hashprice for 2023-09-07: the series covers"):
        await src.latest()
    bad = tmp_path / "bad.csv"
    bad.write_text("date,hashprice_usd_per_ph_day\n2023-09-04,0\n2023-09-05,1\n")
    with pytest.raises(BadInput, match="hashprice must be within"):
        HashpriceReplay.from_settings(CsvHashpriceSettings(path=bad))


async def test_wiring_replays_hashprice_on_the_price_replay_clock(tmp_path: Path) -> None:
    """A config that replays 2023-09-05 prices reads that day's hashprice, not today's."""
    (tmp_path / "rt.csv").write_text(
        "interval_start_utc,HB_WEST\n"
        "2023-09-05T00:00:00Z,20.00\n2023-09-05T00:15:00Z,21.00\n2023-09-05T00:30:00Z,22.00\n"
    )
    (tmp_path / "hp.csv").write_text(
        "date,hashprice_usd_per_ph_day\n2023-09-04,58.3472\n2023-09-05,58.2734\n"
    )
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "site: {id: t, interconnect_limit_kw: 100}\n"
        "economics: {hashprice: {usd_per_ph_day: 55, feed: {type: csv_replay, path: hp.csv}}}\n"
        "prices: {realtime: {type: csv_replay, path: rt.csv, column: HB_WEST,"
        " start: '2023-09-05T00:20:00Z'}}\n"
        "miner_models:\n"
        "  M: {profiles: [{name: run, power_w: 3000, hashrate_ths: 100}]}\n"
        "miners: [{id: m, address: 10.1.0.1, model: M}]\n"
    )
    config = load_config(cfg)
    src = build_signals(config, build_price_source(config)).hashprice_source
    assert isinstance(src, HashpriceReplay)
    reading = await src.latest()
    assert reading.value == 58.2734
    assert reading.interval_start == datetime(2023, 9, 5, tzinfo=UTC)


@pytest.mark.shared_data
async def test_the_shared_btc_file_loads(shared_data: Path) -> None:
    path = shared_data / "btc" / "btc_daily_2021_2024.csv"
    at = datetime(2023, 6, 27, 20, tzinfo=UTC)
    src = HashpriceReplay.from_settings(CsvHashpriceSettings(path=path), clock=lambda: at)
    reading = await src.latest()
    assert len(src.series.values) == 1461
    line = next(x for x in path.read_text().splitlines() if x.startswith("2023-06-27,"))
    assert reading.value == float(line.split(",")[3])
