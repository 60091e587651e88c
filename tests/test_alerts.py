"""Prometheus alert rules in configs/alerts.yml: promtool checks them and runs their unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.servers import require_binary

pytestmark = pytest.mark.prometheus

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REQUIRED = {
    "SiteAgentDown",
    "SiteAgentPriceStale",
    "SiteAgentGridSignalStale",
    "SiteAgentDeviceFaults",
    "SiteAgentCurtailmentTargetMissed",
    "SiteAgentAboveInterconnectLimit",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool", "prometheus")
    return subprocess.run(
        [binary, *args], cwd=CONFIGS, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    rules = yaml.safe_load((CONFIGS / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names >= REQUIRED
    tests = yaml.safe_load((CONFIGS / "alerts_test.yml").read_text())
    fired = {
        t["alertname"]
        for case in tests["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert fired == names, f"alerts without a firing test: {names - fired}"
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
            assert r["annotations"]["summary"], r["alert"]


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    # The check above can fail: a rule with bad PromQL is refused.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(\n")
    binary = require_binary("promtool", "prometheus")
    result = subprocess.run(
        [binary, "check", "rules", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
