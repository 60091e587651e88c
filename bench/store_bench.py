"""Journal write and read cost on this disk: one JSON line per figure.

Every commit is fsynced (WAL, ``synchronous=FULL``), so the cost of a single audit row is one
fsync; the batch APIs (``audit_many``, ``record_commands``) pay one fsync per cycle instead.
Run: ``.venv/bin/python -m bench.store_bench [--dir PATH]`` (default: a temp folder in cwd, so
the figure is for the disk the journal would live on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime

from agent.journal.store import AuditEntry, Store


def _emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"bench": "store", "name": name, "value": round(value, 3), "unit": unit}))


async def run(folder: str, singles: int, batch: int) -> None:
    async with Store.open(f"{folder}/journal.db") as store:
        t = time.perf_counter()
        for i in range(singles):
            await store.audit(source="policy", action="sleep", result="ok", device_id=f"m-{i}")
        _emit("audit_single_row", (time.perf_counter() - t) / singles * 1e3, "ms")

        now = datetime.now(UTC)
        t = time.perf_counter()
        await store.audit_many(
            AuditEntry("policy", "sleep", "ok", f"m-{i}", "bench", {"delta_power_w": -3068.0})
            for i in range(batch)
        )
        await store.record_commands((f"m-{i}", "sleep", now) for i in range(batch))
        _emit(f"cycle_{batch}_audits_and_{batch}_commands", (time.perf_counter() - t) * 1e3, "ms")

        t = time.perf_counter()
        rows = await store.audit_rows(limit=None)
        _emit(f"read_{len(rows)}_audit_rows", (time.perf_counter() - t) * 1e3, "ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=".", help="folder on the disk to measure (default: cwd)")
    p.add_argument("--singles", type=int, default=200)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="store-bench-") as folder:
        asyncio.run(run(folder, args.singles, args.batch))


if __name__ == "__main__":
    main()
