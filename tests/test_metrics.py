"""The Prometheus collector: values from a hand-built AgentState, naming, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import replace
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.outputs.metrics import AgentCollector, build_registry, start_metrics_server
from agent.runtime.state import AgentState
from tests.sample_state import NOW, STARTED, sample_config, sample_state


def registry() -> CollectorRegistry:
    return build_registry(sample_state(), sample_config(), clock=lambda: NOW)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def test_site_power_limits_and_plan() -> None:
    reg = registry()
    assert value(reg, "site_agent_site_power_watts") == 18_898.0
    assert value(reg, "site_agent_planned_power_watts") == 13_800.0
    assert value(reg, "site_agent_effective_limit_watts") == 14_000.0
    assert value(reg, "site_agent_interconnect_limit_watts") == 500_000.0
    assert value(reg, "site_agent_plan_value_usd_per_hour") == 12.5
    assert value(reg, "site_agent_plan_cost_usd_per_hour") == 11.2
    assert value(reg, "site_agent_plan_margin_usd_per_hour") == pytest.approx(1.3)
    assert value(reg, "site_agent_plan_actions", kind="sleep") == 1.0
    assert value(reg, "site_agent_plan_binding_limit", limit="event:ev-1") == 1.0


def test_miner_series_units_and_state() -> None:
    reg = registry()
    assert value(reg, "site_agent_miner_power_watts", miner="m-001", model="S21") == 3510.0
    # TH/s in the domain, hashes per second on the wire.
    hs = value(reg, "site_agent_miner_hashrate_hashes_per_second", miner="m-002", model="S21")
    assert hs == pytest.approx(200.5e12)
    assert value(reg, "site_agent_miner_state", miner="m-003", state="sleeping") == 1.0
    assert value(reg, "site_agent_miner_state", miner="m-003", state="running") is None
    assert value(reg, "site_agent_miner_state", miner="m-004", state="faulted") == 1.0
    assert value(reg, "site_agent_miners", state="running") == 2.0
    assert value(reg, "site_agent_workload_power_watts", workload="mining") == 10_098.0
    assert value(reg, "site_agent_workload_power_watts", workload="ai") == 4_800.0
    # 504 TH/s at 55 USD/PH/day, no pool fee: 55 × 0.504 / 24.
    assert value(reg, "site_agent_mining_revenue_usd_per_hour") == pytest.approx(1.155)


def test_prices_and_breakeven_follow_economics_md() -> None:
    reg = registry()
    assert value(reg, "site_agent_price_usd_per_mwh", market="realtime") == 812.5
    assert value(reg, "site_agent_price_usd_per_mwh", market="day_ahead") == 300.0
    assert value(reg, "site_agent_price_age_seconds") == 60.0
    assert value(reg, "site_agent_hashprice_usd_per_ph_day") == 55.0
    # economics.md: S19j Pro at 29.5 J/TH and hashprice 55 → 77.7 USD/MWh; S21 → 131.
    s19 = value(reg, "site_agent_miner_breakeven_usd_per_mwh", model="S19jPro", profile="stock")
    s21 = value(reg, "site_agent_miner_breakeven_usd_per_mwh", model="S21", profile="stock")
    assert s19 == pytest.approx(77.7, abs=0.1)
    assert s21 == pytest.approx(131.0, abs=0.1)


def test_counters_sources_and_faults() -> None:
    reg = registry()
    assert value(reg, "site_agent_actions_total", kind="sleep", result="ok") == 7.0
    assert value(reg, "site_agent_actions_total", kind="sleep", result="not_applied") == 1.0
    assert value(reg, "site_agent_rejected_inputs_total", source="mqtt", reason="unauthorized") == 1
    assert value(reg, "site_agent_control_cycles_total") == 240.0
    assert value(reg, "site_agent_source_age_seconds", source="price:realtime") == 90.0
    # Never succeeded: as old as the agent.
    assert value(reg, "site_agent_source_age_seconds", source="grid:openadr") == 3600.0
    assert value(reg, "site_agent_source_up", source="grid:openadr") == 0.0
    assert value(reg, "site_agent_source_poll_duration_seconds", source="miners") == 1.5
    assert value(reg, "site_agent_source_polls_total", source="miners", result="failed") == 3.0
    assert value(reg, "site_agent_device_faulted", device="m-004") == 1.0
    assert value(reg, "site_agent_devices_faulted", kind="miner") == 1.0
    assert value(reg, "site_agent_devices", kind="miner") == 4.0
    assert value(reg, "site_agent_mode", mode="auto") == 1.0


def test_gpus_jobs_and_grid_events() -> None:
    reg = registry()
    gpu = {"node": "g-01", "gpu": "1", "UUID": "GPU-0000-1", "modelName": "NVIDIA H100 80GB HBM3"}
    assert value(reg, "site_agent_gpu_power_watts", **gpu) == 401.0
    assert value(reg, "site_agent_gpu_power_limit_watts", **gpu) == 700.0
    assert value(reg, "site_agent_gpu_utilization_ratio", **gpu) == pytest.approx(0.51)
    assert value(reg, "site_agent_gpu_temperature_celsius", **gpu) == 61.0
    assert value(reg, "site_agent_gpu_memory_used_bytes", **gpu) == 1024 * 2**20
    assert value(reg, "site_agent_gpu_node_power_cap_watts", node="g-01") == 700.0
    assert value(reg, "site_agent_jobs", job_class="sla", state="running") == 1.0
    assert value(reg, "site_agent_jobs", job_class="filler", state="suspended") == 1.0
    assert value(reg, "site_agent_jobs", job_class="preemptible", state="running") == 0.0
    # One SLA job on 4 GPUs at full cap, 2.5 USD/GPU-h; the suspended filler earns nothing.
    assert value(reg, "site_agent_ai_revenue_usd_per_hour") == pytest.approx(10.0)
    assert value(reg, "site_agent_grid_events_active") == 1.0
    ev = {"event_id": "ev-1", "program": "ercot-ers"}
    assert value(reg, "site_agent_grid_event_target_watts", **ev) == 14_000.0
    assert value(reg, "site_agent_grid_event_shortfall_watts", **ev) == 4_898.0
    assert value(reg, "site_agent_grid_shortfall_watts") == 4_898.0


def test_compliant_site_has_no_shortfall_and_ages_advance() -> None:
    state = sample_state()
    assert state.snapshot is not None
    state.snapshot = replace(state.snapshot, measured_site_power_w=13_000.0)
    later = NOW + timedelta(seconds=30)
    reg = build_registry(state, sample_config(), clock=lambda: later)
    assert value(reg, "site_agent_grid_shortfall_watts") == 0.0
    assert value(reg, "site_agent_price_age_seconds") == 90.0
    assert value(reg, "site_agent_source_age_seconds", source="miners") == 38.0
    assert value(reg, "site_agent_snapshot_age_seconds") == 30.0


def test_empty_state_exports_without_snapshot_or_config() -> None:
    reg = build_registry(AgentState("s", STARTED), clock=lambda: NOW)
    assert value(reg, "site_agent_info", site="s") == 1.0
    assert value(reg, "site_agent_site_power_watts") is None
    assert value(reg, "site_agent_devices", kind="miner") == 0.0


def test_collector_reads_state_live_not_a_copy() -> None:
    state = sample_state()
    reg = build_registry(state, sample_config(), clock=lambda: NOW)
    state.actions[("wake", "failed")] += 2
    state.mode = "manual"
    assert value(reg, "site_agent_actions_total", kind="wake", result="failed") == 2.0
    assert value(reg, "site_agent_mode", mode="manual") == 1.0
    assert value(reg, "site_agent_mode", mode="auto") == 0.0


def test_naming_conventions_help_and_bounded_labels() -> None:
    text = generate_latest(registry()).decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) > 40
    unit_words = (
        "watts",
        "seconds",
        "hashes_per_second",
        "usd_per_mwh",
        "usd_per_hour",
        "ratio",
        "celsius",
        "bytes",
        "joules",
        "usd_per_ph_day",
    )
    counts = (
        "info",
        "mode",
        "state",
        "miners",
        "jobs",
        "devices",
        "faulted",
        "active",
        "actions",
        "limit",
        "up",
        "cycles",
        "polls",
        "rejected_inputs",
        "restarts",
    )
    for fam in families:
        assert fam.name.startswith("site_agent_"), fam.name
        assert fam.documentation.strip(), f"{fam.name} has no HELP"
        base = fam.name
        assert base.endswith(unit_words) or base.endswith(counts), f"{base}: unit not in name"
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
            # No free text in labels: fault reasons and plan summaries stay out.
            free = {k: v for k, v in s.labels.items() if k != "modelName"}
            assert all(" " not in v for v in free.values()), (s.name, s.labels)
    assert "ignored sleep command" not in text


def test_collect_does_no_io_and_is_registered_on_given_registry() -> None:
    reg = CollectorRegistry()
    collector = AgentCollector(sample_state(), sample_config(), clock=lambda: NOW)
    reg.register(collector)
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("site_agent_site_power_watts") is None
    assert reg.get_sample_value("site_agent_site_power_watts") == 18_898.0


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def test_http_endpoint_serves_metrics_on_ephemeral_port() -> None:
    state = sample_state()
    server = await start_metrics_server(build_registry(state, sample_config()), "127.0.0.1", 0)
    try:
        assert server.port > 0
        raw = await _http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"text/plain" in head
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["site_agent_site_power_watts"].samples[0].value == 18_898.0
        # OpenMetrics negotiation, as a real Prometheus asks for it.
        raw = await _http(
            server.port,
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        )
        assert b"application/openmetrics-text" in raw.partition(b"\r\n\r\n")[0]
        assert raw.rstrip().endswith(b"# EOF")
        # Read-only: nothing but GET/HEAD.
        raw = await _http(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 405")
        raw = await _http(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404")
        raw = await _http(server.port, b"garbage\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")
    finally:
        await server.close()


def test_counter_type_of_rejected_inputs() -> None:
    state = AgentState("s", STARTED)
    state.rejected = Counter({("mqtt", "malformed"): 3})
    reg = build_registry(state, clock=lambda: NOW)
    assert value(reg, "site_agent_rejected_inputs_total", source="mqtt", reason="malformed") == 3
    assert re.search(
        r"# TYPE site_agent_rejected_inputs_total counter", generate_latest(reg).decode()
    )


class Broken:
    def collect(self) -> list[object]:
        raise RuntimeError("collector bug")


async def test_a_failing_collector_gives_500_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = CollectorRegistry()
    reg.register(Broken())  # type: ignore[arg-type]
    server = await start_metrics_server(reg, "127.0.0.1", 0)
    try:
        raw = await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 500")
        assert "collecting failed" in caplog.text
        raw = await _http(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200")
    finally:
        await server.close()
