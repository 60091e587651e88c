"""A stand-in training job for job-control tests: counts steps and checkpoints them.

Usage: checkpoint_job.py CHECKPOINT_FILE [INTERVAL_S [RUN_S]]. It writes the step count to
CHECKPOINT_FILE (atomically) once at start, every INTERVAL_S seconds, on SIGUSR1 (and keeps
going) and on SIGTERM (then exits 0). It starts from the step count in an existing checkpoint,
as a resumed training job would, and exits 0 after RUN_S seconds if given.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def main() -> None:
    path = Path(sys.argv[1])
    interval_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    run_s = float(sys.argv[3]) if len(sys.argv) > 3 else None
    steps = int(path.read_text()) if path.exists() else 0

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(steps))
        os.replace(tmp, path)

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        save()

    def on_term(signum: int, frame: FrameType | None) -> None:
        save()
        sys.exit(0)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)
    save()  # at once: tells a test that the handlers are in place
    started = last_save = time.monotonic()
    while run_s is None or time.monotonic() - started < run_s:
        time.sleep(0.05)
        steps += 1
        if time.monotonic() - last_save >= interval_s:
            save()
            last_save = time.monotonic()
    save()


if __name__ == "__main__":
    main()
