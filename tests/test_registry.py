"""The driver registry: config keys choose drivers; what no driver serves is a clear error."""

from __future__ import annotations

from typing import Any

import pytest

from agent.control.config import AgentConfig, ConfigError, parse_config
from agent.runtime.miner_fleet import MinerDevice
from agent.runtime.registry import DriverConfigError, MinerLine, live_drivers
from agent.runtime.wiring import build_miners
from drivers.miners.pyasic_driver import PyasicMiner


def site(*miners: dict[str, Any]) -> AgentConfig:
    return parse_config(
        {
            "site": {"id": "t", "interconnect_limit_kw": 100},
            "miner_models": {
                "S19jPro": {
                    "standby_w": 28,
                    "profiles": [{"name": "default", "power_w": 3068, "hashrate_ths": 104}],
                }
            },
            "miners": list(miners),
            "prices": {"realtime": {"type": "constant", "value": 30}},
        }
    )


def test_luxos_and_auto_build_the_pyasic_driver_one_per_miner() -> None:
    cfg = site(
        {"id": "a", "address": "127.0.0.1", "model": "S19jPro", "firmware": "luxos", "count": 2},
        {"id": "b", "address": "127.0.1.1", "model": "S19jPro"},  # firmware: auto
    )
    miners = build_miners(cfg)
    assert sorted(miners) == ["a-001", "a-002", "b"]
    assert all(isinstance(m, PyasicMiner) for m in miners.values())
    assert [m.address for m in miners.values()] == ["127.0.0.1", "127.0.0.2", "127.0.1.1"]


def test_firmware_without_a_driver_and_unread_credentials_are_errors_naming_the_key() -> None:
    cfg = site(
        {"id": "a", "address": "127.0.0.1", "model": "S19jPro", "firmware": "braiins", "count": 3},
        {
            "id": "b",
            "address": "127.0.1.1",
            "model": "S19jPro",
            "firmware": "luxos",
            "credentials": {"password": "pw"},
        },
    )
    with pytest.raises(ConfigError) as err:
        build_miners(cfg, source="site.yaml")
    assert err.value.problems == [
        "site.yaml: miners.0.firmware: braiins has no driver in this build "
        "(available firmwares: auto, luxos)",
        "site.yaml: miners.1.credentials: firmware luxos does not read this key; remove it",
    ]


def test_a_registered_family_driver_gets_the_line_with_its_credentials() -> None:
    """The hook the multi-family miner driver uses: a factory per ``firmware:``."""
    seen: list[MinerLine] = []

    def braiins(line: MinerLine) -> MinerDevice:
        seen.append(line)
        if line.config.credentials is None:
            raise DriverConfigError("Braiins OS needs credentials", key="credentials")
        return PyasicMiner.luxos(line.address, line.semaphore, device_id=line.device_id)

    registry = live_drivers().with_(
        miners={"braiins": braiins}, reads={"firmware:braiins": frozenset({"credentials"})}
    )
    cfg = site(
        {
            "id": "a",
            "address": "127.0.0.1",
            "model": "S19jPro",
            "firmware": "braiins",
            "count": 2,
            "credentials": {"username": "root", "password": "pw"},
        }
    )
    assert sorted(build_miners(cfg, registry)) == ["a-001", "a-002"]
    assert [line.device_id for line in seen] == ["a-001", "a-002"]
    assert seen[0].config.credentials is not None
    assert seen[0].config.credentials.password.get_secret_value() == "pw"
    assert seen[0].semaphore is seen[1].semaphore  # one bound for the whole fleet
    assert "braiins" not in live_drivers().miners  # the copy, not the live table, changed
