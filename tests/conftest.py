"""Shared test helpers: where the real data lives, and skipping cleanly when it is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SITE_AGENT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ../shared/data (real ERCOT prices, recorded fixtures); skips if missing."""
    if not (SHARED_DATA / "ercot").is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (set SITE_AGENT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto broker on a free loopback port, with users agent and operator."""
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
