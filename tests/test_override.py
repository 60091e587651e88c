"""Operator override end to end: the CLI writes the journal; the running agent obeys at once."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path

import pytest
import yaml

from agent.cli.main import main
from agent.control.config import load_config
from agent.journal.store import Store
from simulators.luxos import LuxosFleet, MinerSpec
from simulators.luxos_model import Timing
from simulators.price_server import PriceServer
from tests.site_agent import build_agent
from tests.test_e2e_miners import S19, S21, site_dict, true_site_w, truth, until


async def test_curtail_cli_brings_site_under_target_fast_and_release_restores(
    tmp_path: Path,
) -> None:
    specs = [MinerSpec(a, "s19jpro") for a in S19] + [MinerSpec(a, "s21") for a in S21]
    fleet = LuxosFleet(specs, timing=Timing(wake_ramp_s=0.4, sleep_ramp_s=0.1, profile_ramp_s=0.1))
    async with fleet, PriceServer([20.0], interval_s=3600) as server:
        data = site_dict(server.url)
        data["control"]["interval_s"] = 5.0  # slow cycles: only the fast path can be quick
        data["store"] = {"path": "journal.db"}
        cfg_file = tmp_path / "site.yaml"
        cfg_file.write_text(yaml.safe_dump(data))
        config = load_config(cfg_file)
        async with Store.open(tmp_path / "journal.db") as store:
            agent = build_agent(config, store=store)
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            try:
                await until(lambda: true_site_w(fleet) > 18_500, 15, "all mining")
                loop = asyncio.get_running_loop()
                code = await asyncio.to_thread(
                    main,
                    ["curtail", "--config", str(cfg_file), "--target-kw", "10", "--until", "+1h"],
                )
                assert code == 0
                sent = loop.time()
                await until(
                    lambda: (
                        agent.state.plan is not None
                        and agent.state.plan.binding[0].startswith("event:override-")
                    ),
                    2,
                    "a plan bound by the override",
                )
                assert loop.time() - sent < 1.5, "fast path: acted well before the 5 s cycle"
                await until(lambda: true_site_w(fleet) <= 10_000, 5, "site under 10 kW")
                # The least efficient (S19j Pro) were shed; the S21s carry the 10 kW.
                assert all(truth(fleet, a)["sleeping"] for a in S19)
                # The miners obey before the actuator has journaled what they answered: wait
                # for the three audit rows (on a busy machine they come a moment later).
                user = getpass.getuser()
                deadline = loop.time() + 10
                while True:
                    rows = await store.audit_rows()
                    sleeps = [r for r in rows if r.action == "sleep:sleep" and r.result == "ok"]
                    if len(sleeps) >= 3:
                        break
                    assert loop.time() < deadline, f"3 audited sleeps, got {len(sleeps)}"
                    await asyncio.sleep(0.05)
                assert any(r.source == f"operator:{user}" and r.action == "curtail" for r in rows)
                assert len(sleeps) == 3
                assert all("event:override" in r.reason or "limit" in r.reason for r in sleeps)

                code = await asyncio.to_thread(main, ["release", "--config", str(cfg_file)])
                assert code == 0
                await until(lambda: true_site_w(fleet) > 18_500, 10, "site restored")
                assert agent.coordinator.events == {}
                report = await store.event_report()
                assert len(report) == 1
                assert report[0].intervals >= 1
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)


def test_curtail_cli_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = site_dict("http://127.0.0.1:9")
    data["store"] = {"path": "journal.db"}
    cfg_file = tmp_path / "site.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    base = ["curtail", "--config", str(cfg_file)]
    assert main([*base, "--target-kw", "-5", "--until", "+1h"]) == 2
    assert "--target-kw must be a finite number >= 0 (got -5.0)" in capsys.readouterr().err
    assert main([*base, "--target-kw", "nan", "--until", "+1h"]) == 2
    # The same limits as MQTT and OpenADR: above the interconnect, beyond the horizon.
    assert main([*base, "--target-kw", "1e306", "--until", "+1h"]) == 2
    assert "outside 0..40 kW" in capsys.readouterr().err
    assert main([*base, "--target-kw", "10", "--until", "+200h"]) == 2
    assert "(control.max_event_horizon_s)" in capsys.readouterr().err
    assert main([*base, "--target-kw", "10", "--until", "+1e300h"]) == 2
    assert "expected +30m" in capsys.readouterr().err
    assert main([*base, "--target-kw", "10", "--until", "2001-01-01T00:00:00Z"]) == 2
    assert "is not in the future" in capsys.readouterr().err
    assert main([*base, "--target-kw", "10", "--until", "tomorrow"]) == 2
    assert (
        "expected +30m, +2h, +90s or an ISO-8601 time (got 'tomorrow')" in capsys.readouterr().err
    )
    assert not (tmp_path / "journal.db").exists()
    assert main(["release", "--config", str(cfg_file)]) == 1
