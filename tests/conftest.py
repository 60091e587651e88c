"""Shared test helpers: where the real data lives, and skipping cleanly when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SITE_AGENT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ../shared/data (real ERCOT prices, recorded fixtures); skips if missing."""
    if not (SHARED_DATA / "ercot").is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is missing (set SITE_AGENT_SHARED_DATA)")
    return SHARED_DATA
