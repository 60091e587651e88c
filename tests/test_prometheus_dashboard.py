"""The Grafana dashboard JSON is importable as is: inputs, datasource variable, sane panels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "configs" / "grafana-dashboard.json"

# Metrics the dashboard queries before the agent exports them (name -> why): their panels stay
# empty until then; the real-Prometheus test checks their queries parse and lists them as pending.
# None today: the meter, cooling and derate panels query what the agent exports.
PENDING_METRICS: dict[str, str] = {}


def queried_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (every name this project uses starts with site_)."""
    return set(re.findall(r"\b(site_[a-z0-9_]+)\b", expr))


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in load()["panels"] for t in p.get("targets", [])]


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_datasource_is_an_input_and_a_variable() -> None:
    dash = load()
    assert dash["__inputs"][0]["type"] == "datasource"
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    assert ds["current"]["value"] == "${" + dash["__inputs"][0]["name"] + "}"
    assert dash["id"] is None  # Grafana assigns its own on import
    assert dash["uid"]


def test_every_panel_uses_the_datasource_variable_and_has_queries() -> None:
    dash = load()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["expr"].strip()
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
    text = " ".join(titles).lower()
    for topic in ("limit", "breakeven", "workload", "miners", "grid", "ages", "faulted"):
        assert topic in text, topic


def test_dashboard_only_queries_metrics_the_agent_exports_or_pending_ones() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from agent.outputs.metrics import build_registry
    from tests.sample_state import NOW, sample_config, sample_state

    exported = set()
    text = generate_latest(build_registry(sample_state(), sample_config(), clock=lambda: NOW))
    for fam in text_string_to_metric_families(text.decode()):
        exported |= {s.name for s in fam.samples}
    used = set().union(*(queried_metrics(e) for e in dashboard_exprs()))
    assert any(m.startswith("site_agent_") for m in used), "no site_agent metric in the dashboard"
    assert used <= exported | set(PENDING_METRICS), f"unknown metrics: {used - exported}"
    # A pending metric the agent now exports: take it off the list (its queries must have data).
    assert not exported & set(PENDING_METRICS), exported & set(PENDING_METRICS)
    assert set(PENDING_METRICS) <= used, "pending metrics no panel queries"
    # The meter, cooling and derate panels read the agent's own series.
    for name in (
        "site_agent_meter_power_watts",
        "site_agent_meter_trim_watts",
        "site_agent_meter_up",
        "site_agent_device_power_watts",
        "site_agent_cooling_power_watts",
        "site_agent_thermal_derated_devices",
        "site_agent_thermal_derate_actions_total",
    ):
        assert name in used, name
