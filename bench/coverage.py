"""Branch coverage of agent/, drivers/ and simulators/, subprocesses included.

Tests such as ``tests/test_restart.py`` run ``site-agent run`` as a child process; plain
``pytest --cov`` does not see the restart and serve code they exercise. This script measures
them too: for the duration of the run it drops a ``.pth`` file into the test environment
(``.venv``, never the installed system) that calls ``coverage.process_startup()``, which starts
coverage in every Python process that has ``COVERAGE_PROCESS_START`` in its environment, then
combines the data files of all processes and prints the report. The ``.pth`` file is removed
afterwards, whatever happens.

    .venv/bin/python bench/coverage.py                      # every test (long)
    .venv/bin/python bench/coverage.py tests/test_restart.py tests/test_integrity.py

The last line is one JSON object: ``{"branch_coverage_pct": ..., "tests": [...]}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
PTH_NAME = "zz_site_agent_coverage_subprocess.pth"


def site_packages() -> Path:
    """The test environment's site-packages (asked of the venv's own interpreter)."""
    out = subprocess.run(
        [str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def main(argv: list[str]) -> int:
    tests = argv or ["tests"]
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        rc = Path(tmp) / "coveragerc"
        rc.write_text(
            "[run]\n"
            "branch = True\n"
            "parallel = True\n"
            "sigterm = True\n"
            f"data_file = {tmp}/.coverage\n"
            "source =\n    agent\n    drivers\n    simulators\n"
            "[report]\n"
            "precision = 1\n"
            "skip_empty = True\n"
        )
        pth = site_packages() / PTH_NAME
        pth.write_text("import coverage; coverage.process_startup()\n")
        env = {**os.environ, "COVERAGE_PROCESS_START": str(rc)}
        try:
            # The pytest process itself starts coverage through the .pth as well.
            subprocess.run(
                [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                cwd=ROOT,
                env=env,
                check=False,
            )
        finally:
            pth.unlink(missing_ok=True)
        cov = [str(PYTHON), "-m", "coverage"]
        subprocess.run([*cov, "combine", f"--rcfile={rc}", "-q"], cwd=ROOT, check=True)
        report = subprocess.run(
            [*cov, "report", f"--rcfile={rc}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        print(report)
        data = subprocess.run(
            [*cov, "json", f"--rcfile={rc}", "-o", "-", "-q"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        totals = json.loads(data)["totals"]
    branches = totals["num_branches"]
    pct = 100.0 * totals["covered_branches"] / branches if branches else 100.0
    print(
        json.dumps(
            {
                "branch_coverage_pct": round(pct, 1),
                "line_and_branch_pct": round(totals["percent_covered"], 1),
                "tests": tests,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
