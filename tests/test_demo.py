"""``site-agent demo`` with GPU nodes: the shipped demo config runs and shows the AI side."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from agent.cli.demo import DEFAULT_CONFIG
from agent.cli.demo_site import run_demo
from agent.control.config import load_config
from tests.loopback import NET

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


async def test_demo_runs_miners_and_gpu_nodes_and_reports_ai_revenue(shared_data: Path) -> None:
    config = load_config(DEFAULT_CONFIG)
    assert sum(n.gpus * n.count for n in config.gpu_nodes) == 16
    out = io.StringIO()
    # The demo's miners on this process's own net, so a second run beside this one never collides.
    assert await run_demo(DEFAULT_CONFIG, 10.0, out=out, loopback_net=NET) == 0
    text = out.getvalue()
    assert "2 GPU nodes (16 simulated H100-SXM)" in text
    assert "AI jobs S/P/F" in text
    # Once the GPUs have been read, every status line shows the SLA job and the GPU power.
    lines = [line for line in text.splitlines() if re.match(r"\d\d:\d\d ", line)]
    assert any(re.search(r" 1/\d/\d +\d +\d+/\d+ +\d+\.\d", line) for line in lines), lines
    ai = re.search(r"AI revenue \$ +([\d.]+) +([\d.]+)", text)
    assert ai is not None, text
    assert 0 < float(ai.group(1)) <= float(ai.group(2))
    assert re.search(r"AI jobs suspended \(sla 0, ", text), text
    assert "(0 failed)" in text
    # The demo's agent reads the simulated SunSpec meter: the metered load is the device sum
    # plus cooling, and the summary says so, with the trim.
    assert "at a simulated SunSpec meter" in text
    meter = re.search(r"meter: site ([\d,.]+) kWh metered vs ([\d,.]+) kWh device sum", text)
    assert meter is not None, text
    metered, devices = (float(g.replace(",", "")) for g in meter.groups())
    assert 1.01 * devices < metered < 1.15 * devices, text
    assert re.search(r"trim -?\d+\.\d kW at the end", text), text
