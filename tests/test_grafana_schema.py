"""configs/grafana-dashboard.json against Grafana's own dashboard schema (Grafana cannot run here).

The facts checked come from Grafana's sources, not from this dashboard:

* Grafana's dashboard kind, ``kinds/dashboard/dashboard_kind.cue`` in grafana/grafana:
  ``schemaVersion: uint16``; ``graphTooltip: 0 | 1 | 2``; ``#GridPos: h: uint32 & >0,
  w: uint32 & >0 & <=24, x: uint32 & >=0 & <24, y: uint32 & >=0, static?: bool``;
  ``#DataSourceRef: {type?: string, uid?: string}``; ``#VariableType: "query" | "adhoc" |
  "constant" | "datasource" | "interval" | "textbox" | "custom" | "system"``;
  ``#ThresholdsMode: "absolute" | "percentage"``; ``#MappingType: "value" | "range" | "regex" |
  "special"``; annotation queries have ``name``, ``datasource``, ``enable``, ``iconColor``.
* The typed models Grafana generates from those schemas, grafana-foundation-sdk
  ``python/grafana_foundation_sdk/models/dashboard.py`` (``Dashboard``, ``Panel``, ``RowPanel``,
  ``FieldConfigSource``) and ``models/prometheus.py`` (``Dataquery``): the JSON keys each
  object may carry (below), a row carries ``collapsed``, ``id`` and ``panels``, a panel's
  ``type`` is its plugin id, ``fieldConfig`` has ``defaults`` and ``overrides``, and a
  Prometheus query's ``format`` is ``time_series``, ``table`` or ``heatmap``.

The SDK itself (PyPI ``grafana-foundation-sdk``) is not a dependency: generating the dashboard
with it would add one. These tests hold the hand-written JSON to the same schema instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "configs" / "grafana-dashboard.json"

# JSON keys of the SDK's models (to_json), plus the export-for-import keys Grafana adds
# around a dashboard ("__inputs", "__requires", "__elements").
DASHBOARD_KEYS = {
    "id", "uid", "title", "description", "revision", "gnetId", "tags", "timezone", "editable",
    "graphTooltip", "time", "timepicker", "fiscalYearStartMonth", "liveNow", "weekStart",
    "refresh", "schemaVersion", "version", "panels", "templating", "annotations", "links",
    "snapshot", "__inputs", "__requires", "__elements",
}  # fmt: skip
PANEL_KEYS = {
    "type", "id", "pluginVersion", "tags", "targets", "title", "description", "transparent",
    "datasource", "gridPos", "links", "repeat", "repeatDirection", "maxPerRow", "maxDataPoints",
    "transformations", "interval", "timeFrom", "timeShift", "hideTimeOverride", "libraryPanel",
    "options", "fieldConfig",
}  # fmt: skip
ROW_KEYS = {"type", "collapsed", "title", "datasource", "gridPos", "id", "panels", "repeat"}
PROMETHEUS_QUERY_KEYS = {
    "expr", "instant", "range", "exemplar", "editorMode", "format", "legendFormat",
    "intervalFactor", "refId", "hide", "queryType", "datasource", "interval",
}  # fmt: skip
FIELD_CONFIG_KEYS = {
    "displayName", "displayNameFromDS", "description", "path", "writeable", "filterable", "unit",
    "decimals", "min", "max", "mappings", "thresholds", "color", "links", "noValue", "custom",
}  # fmt: skip
VARIABLE_TYPES = {
    "query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system",
}  # fmt: skip
# Core panel plugins this dashboard may use (Grafana's built-in visualisation ids).
PANEL_TYPES = {"timeseries", "stat", "table", "gauge", "bargauge", "text", "state-timeline"}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        if p["type"] == "row":
            out += p["panels"]  # a collapsed row keeps its panels inside
    return out


def is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_datasource_ref(ref: object, where: str) -> None:
    assert isinstance(ref, dict), f"{where}: datasource must be an object (a DataSourceRef)"
    assert set(ref) <= {"type", "uid"}, f"{where}: DataSourceRef keys {set(ref)}"
    assert all(isinstance(v, str) for v in ref.values()), where


def check_grid_pos(pos: object, where: str) -> None:
    assert isinstance(pos, dict), where
    assert set(pos) <= {"h", "w", "x", "y", "static"}, f"{where}: gridPos keys {set(pos)}"
    assert all(is_uint(pos[k]) for k in ("h", "w", "x", "y")), f"{where}: {pos}"
    assert pos["h"] > 0, where
    assert 0 < pos["w"] <= 24, where
    assert pos["x"] < 24, where
    assert pos["x"] + pos["w"] <= 24, f"{where}: wider than the 24-column grid"


def test_top_level_matches_the_dashboard_kind() -> None:
    dash = load()
    assert set(dash) <= DASHBOARD_KEYS, set(dash) - DASHBOARD_KEYS
    assert is_uint(dash["schemaVersion"])
    assert dash["schemaVersion"] <= 0xFFFF
    # Grafana migrates older dashboards on load; 36 is the kind's default, so start there.
    assert dash["schemaVersion"] >= 36
    assert isinstance(dash["title"], str)
    assert dash["title"]
    assert 8 <= len(dash["uid"]) <= 40  # "string (8-40)"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", dash["uid"])
    assert isinstance(dash["editable"], bool)
    assert dash["graphTooltip"] in (0, 1, 2)
    assert dash["timezone"] in ("browser", "utc") or "/" in dash["timezone"]
    assert set(dash["time"]) == {"from", "to"}
    assert all(isinstance(v, str) for v in dash["time"].values())
    assert dash["refresh"] is False or re.fullmatch(r"\d+[smhd]", dash["refresh"])
    assert isinstance(dash["tags"], list)
    assert all(isinstance(t, str) for t in dash["tags"])


def test_variables_and_annotations_match_the_schema() -> None:
    dash = load()
    for var in dash["templating"]["list"]:
        assert var["type"] in VARIABLE_TYPES, var["type"]
        assert isinstance(var["name"], str)
        assert var["name"]
        if "datasource" in var:
            check_datasource_ref(var["datasource"], f"variable {var['name']}")
        assert var.get("hide", 0) in (0, 1, 2)
        assert var.get("refresh", 0) in (0, 1, 2)
    for ann in dash["annotations"]["list"]:
        assert isinstance(ann["name"], str)
        check_datasource_ref(ann["datasource"], f"annotation {ann['name']}")
        assert isinstance(ann["enable"], bool)
        assert isinstance(ann["iconColor"], str)


def test_panels_rows_and_their_positions_match_the_schema() -> None:
    dash = load()
    ids = []
    for panel in all_panels(dash):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        assert isinstance(panel["type"], str)
        assert panel["type"], where  # "empty is actually invalid"
        assert is_uint(panel["id"]), where
        ids.append(panel["id"])
        check_grid_pos(panel["gridPos"], where)
        if panel["type"] == "row":
            assert set(panel) <= ROW_KEYS, f"{where}: {set(panel) - ROW_KEYS}"
            assert isinstance(panel["collapsed"], bool), where
            assert isinstance(panel["panels"], list), where
            assert panel["gridPos"]["w"] == 24, f"{where}: a row spans the grid"
            continue
        assert set(panel) <= PANEL_KEYS, f"{where}: {set(panel) - PANEL_KEYS}"
        assert panel["type"] in PANEL_TYPES, f"{where}: unknown plugin {panel['type']}"
        check_datasource_ref(panel["datasource"], where)
        field_config = panel["fieldConfig"]
        assert set(field_config) == {"defaults", "overrides"}, where
        assert isinstance(field_config["overrides"], list), where
        defaults = field_config["defaults"]
        assert set(defaults) <= FIELD_CONFIG_KEYS, f"{where}: {set(defaults) - FIELD_CONFIG_KEYS}"
        if "unit" in defaults:
            assert isinstance(defaults["unit"], str), where
        if "thresholds" in defaults:
            th = defaults["thresholds"]
            assert th["mode"] in ("absolute", "percentage"), where
            assert th["steps"][0]["value"] is None, f"{where}: the first step is -Infinity"
            for step in th["steps"]:
                assert isinstance(step["color"], str), where
        for mapping in defaults.get("mappings", []):
            assert mapping["type"] in ("value", "range", "regex", "special"), where
            assert isinstance(mapping["options"], dict), where
        assert isinstance(panel.get("options", {}), dict), where
    assert len(ids) == len(set(ids)), "panel ids must be unique within a dashboard"


def test_targets_are_prometheus_dataqueries() -> None:
    dash = load()
    for panel in all_panels(dash):
        if panel["type"] == "row":
            continue
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["targets"], f"{where}: no queries"
        refs = []
        for target in panel["targets"]:
            assert set(target) <= PROMETHEUS_QUERY_KEYS, set(target) - PROMETHEUS_QUERY_KEYS
            assert isinstance(target["refId"], str), where
            assert target["refId"], where
            refs.append(target["refId"])
            assert isinstance(target["expr"], str), where
            assert target["expr"].strip(), where
            check_datasource_ref(target["datasource"], where)
            assert target["datasource"]["type"] == "prometheus", where
            assert target.get("format", "time_series") in ("time_series", "table", "heatmap")
            for flag in ("instant", "range", "exemplar", "hide"):
                assert isinstance(target.get(flag, False), bool), f"{where}: {flag}"
            if "legendFormat" in target:
                assert isinstance(target["legendFormat"], str), where
        assert len(refs) == len(set(refs)), f"{where}: refIds must be unique in a panel"


def test_panels_do_not_overlap_on_the_grid() -> None:
    dash = load()
    taken: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:  # top level only: a collapsed row's panels are not laid out
        pos = panel["gridPos"]
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                other = taken.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d["panels"][1]["gridPos"].update(w=25), "24"),
        (lambda d: d["panels"][1]["gridPos"].update(x=20, w=8), "24-column"),
        (lambda d: d["panels"][1].update(gridpos={"h": 1}), "gridpos"),
        (lambda d: d["panels"][1]["targets"][0].update(refid="B"), "refid"),
        (lambda d: d["panels"][1].update(datasource="prometheus"), "DataSourceRef"),
        (lambda d: d.update(graphTooltip=3), ""),
        (lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), "unique"),
    ],
)
def test_the_checks_catch_schema_violations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mutation: Any, message: str
) -> None:
    broken = load()
    mutation(broken)
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(broken))
    monkeypatch.setattr(__import__(__name__, fromlist=["DASHBOARD"]), "DASHBOARD", path)
    checks = (
        test_top_level_matches_the_dashboard_kind,
        test_panels_rows_and_their_positions_match_the_schema,
        test_targets_are_prometheus_dataqueries,
    )
    failures = []
    for check in checks:
        try:
            check()
        except (AssertionError, KeyError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    assert failures, "a broken dashboard passed every check"
    assert any(message in f for f in failures), failures
