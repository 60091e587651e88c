"""The Braiins OS+ simulator against replies recorded from real BOSer (25.11 and 26.04).

The recordings are the gRPC replies as JSON (snake_case, enums as numbers, unset optionals as
``null``). Each is compared with the simulator's reply to the same call, made over gRPC with a
login token: every recorded key present with the same JSON type (numbers, strings, booleans,
objects, lists), and no key the recording lacks. The differences that remain are the ones
listed in ``simulators/braiins.py``'s docstring, each with its reason.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import betterproto
import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality
from pyasic.web.braiins_os.proto.braiins.bos import ApiVersionRequest, ApiVersionServiceStub
from pyasic.web.braiins_os.proto.braiins.bos.v1 import (
    ActionsServiceStub,
    ConfigurationServiceStub,
    CoolingServiceStub,
    GetCoolingStateRequest,
    GetHashboardsRequest,
    GetLocateDeviceStatusRequest,
    GetMinerConfigurationRequest,
    GetMinerDetailsRequest,
    GetMinerStatsRequest,
    GetPoolGroupsRequest,
    GetTunerStateRequest,
    LoginRequest,
    LoginResponse,
    MinerServiceStub,
    PerformanceServiceStub,
    PoolServiceStub,
)

from simulators.braiins import GRPC_PORT, BraiinsFleet
from simulators.luxos import fleet_specs
from simulators.luxos_model import ManualClock
from tests.loopback import ip

pytestmark = pytest.mark.shared_data

ADDRESS = ip(162, 1)
VERSIONS = ("v25_11", "v26_04")
NOT_SERVED = {"miner_errors", "network"}  # pyasic 0.79's BOSer backend calls neither
# Keys the simulator leaves out, each explained in simulators/braiins.py's docstring.
ALLOWED_MISSING = {
    # The recorded API (1.3) wraps the tuner state in a ``mode_state`` oneof; pyasic 0.79's
    # proto, which the simulator serves, has the older top-level power_target_mode_state.
    "performance_tuner_state.mode_state",
    # The recordings' JSON nests a oneof under its group's name (``strategy.quota``);
    # betterproto flattens it (``quota``). Same field on the wire.
    "pools[0].strategy",
    # Fields newer than pyasic 0.79's proto: pyasic cannot send or read them.
    "pools[0].uid",
    "miner_stats.miner_stats.best_share_str",
    "miner_stats.pool_stats.best_share_str",
    "miner_hw_hashboards.hashboards[0].stats.best_share_str",
    "pools[0].pools[0].stats.best_share_str",
}
ALLOWED_EXTRA = {
    "performance_tuner_state.power_target_mode_state",
    "performance_tuner_state.hashrate_target_mode_state",
    "pools[0].quota",
    "pools[0].fixed_share_ratio",
    # Unset messages and empty strings shown only because defaults are included here; the
    # simulator sends nothing for them on the wire, as the recorded firmware did.
    "configuration_miner.dps",
    "configuration_miner.hashboard_config",
    "configuration_miner.temperature",
    "version.build",
    "version.pre",
}


@pytest.fixture
def recordings(shared_data: Path) -> dict[str, dict[str, Any]]:
    base = shared_data / "fixtures" / "miners" / "asic-rs" / "braiins"
    if not base.is_dir():
        pytest.skip(f"Braiins recordings missing in {base}")
    return {
        v: {p.stem: json.loads(p.read_text()) for p in sorted((base / v).glob("*.json"))}
        for v in VERSIONS
    }


@pytest.fixture
async def fleet() -> AsyncIterator[BraiinsFleet]:
    async with BraiinsFleet(fleet_specs(1, ADDRESS, ["s21"]), clock=ManualClock()) as f:
        yield f


# betterproto names proto fields like ``last_5s`` as ``last_5_s``; the wire carries numbers.
_WINDOW = re.compile(r"_(\d+)_([smh])$")


def plain(value: Any) -> Any:
    """A betterproto reply as the recordings' JSON: snake_case proto names, defaults included
    (proto3 cannot tell a default from an absent scalar on the wire), enums as numbers."""
    if isinstance(value, betterproto.Message):
        return plain(
            value.to_pydict(casing=betterproto.Casing.SNAKE, include_default_values=True)  # type: ignore[arg-type]
        )
    if isinstance(value, dict):
        return {_WINDOW.sub(r"_\1\2", k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, datetime):
        seconds = value.timestamp()
        return {"seconds": int(seconds), "nanos": int((seconds % 1) * 1e9)}
    return value


def kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def diff(where: str, recorded: Any, simulated: Any) -> list[str]:
    if recorded is None:
        return []  # an unset optional: the simulator may leave it out or set it
    if kind(recorded) != kind(simulated):
        return [f"{where}: {kind(simulated)} {simulated!r}, recorded {kind(recorded)}"]
    if isinstance(recorded, dict):
        out = []
        for key in sorted(set(recorded) | set(simulated)):
            path = f"{where}.{key}"
            if key not in simulated:
                if recorded[key] is not None and path not in ALLOWED_MISSING:
                    out.append(f"{path}: missing in the simulator")
            elif key not in recorded:
                if path not in ALLOWED_EXTRA:
                    out.append(f"{path}: not in the recording")
            else:
                out += diff(path, recorded[key], simulated[key])
        return out
    if isinstance(recorded, list) and recorded and simulated:
        return diff(f"{where}[0]", recorded[0], simulated[0])
    return []


async def replies(address: str) -> dict[str, Any]:
    """The simulator's answer to each recorded call, logged in as pyasic does."""
    async with Channel(address, GRPC_PORT) as channel:
        async with channel.request(
            "/braiins.bos.v1.AuthenticationService/Login",
            Cardinality.UNARY_UNARY,
            LoginRequest,
            LoginResponse,
        ) as stream:
            await stream.send_message(LoginRequest(username="root", password="root"), end=True)
            await stream.recv_initial_metadata()
            assert stream.initial_metadata is not None
            token = stream.initial_metadata["authorization"]
            await stream.recv_message()
        auth = [("authorization", token)]
        miner = MinerServiceStub(channel)
        pools = await PoolServiceStub(channel).get_pool_groups(
            GetPoolGroupsRequest(), metadata=auth
        )
        locate = await ActionsServiceStub(channel).get_locate_device_status(
            GetLocateDeviceStatusRequest(), metadata=auth
        )
        return {
            "miner_details": plain(
                await miner.get_miner_details(GetMinerDetailsRequest(), metadata=auth)
            ),
            "miner_stats": plain(
                await miner.get_miner_stats(GetMinerStatsRequest(), metadata=auth)
            ),
            "miner_hw_hashboards": plain(
                await miner.get_hashboards(GetHashboardsRequest(), metadata=auth)
            ),
            "performance_tuner_state": plain(
                await PerformanceServiceStub(channel).get_tuner_state(
                    GetTunerStateRequest(), metadata=auth
                )
            ),
            "cooling_state": plain(
                await CoolingServiceStub(channel).get_cooling_state(
                    GetCoolingStateRequest(), metadata=auth
                )
            ),
            "configuration_miner": plain(
                await ConfigurationServiceStub(channel).get_miner_configuration(
                    GetMinerConfigurationRequest(), metadata=auth
                )
            ),
            # The recording keeps only the list of groups, and only the locate flag.
            "pools": plain(pools)["pool_groups"],
            "actions_locate": locate.enabled,
            "version": plain(
                await ApiVersionServiceStub(channel).get_api_version(ApiVersionRequest())
            ),
        }


@pytest.mark.parametrize("version", VERSIONS)
async def test_every_served_call_matches_the_recording(
    recordings: dict[str, dict[str, Any]], fleet: BraiinsFleet, version: str
) -> None:
    recorded = recordings[version]
    simulated = await replies(ADDRESS)
    assert set(recorded) == set(simulated) | NOT_SERVED, "recordings changed: update the test"
    problems: list[str] = []
    for name, reply in simulated.items():
        problems += diff(name, recorded[name], reply)
    assert problems == [], "\n".join(problems)


async def test_units_and_values_move_with_the_physics(fleet: BraiinsFleet) -> None:
    simulated = await replies(ADDRESS)
    stats = simulated["miner_stats"]
    watts = stats["power_stats"]["approximated_consumption"]["watt"]
    ghs = stats["miner_stats"]["real_hashrate"]["last_5s"]["gigahash_per_second"]
    state = fleet.miners[ADDRESS]
    assert watts == round(state.power_w())
    assert ghs == pytest.approx(state.hashrate_ths() * 1000)
    assert stats["power_stats"]["efficiency"]["joule_per_terahash"] == pytest.approx(
        watts / (ghs / 1000)
    )
    boards = simulated["miner_hw_hashboards"]["hashboards"]
    assert sum(b["stats"]["real_hashrate"]["last_5s"]["gigahash_per_second"] for b in boards) == (
        pytest.approx(ghs)
    )
    assert all(b["current_frequency"]["hertz"] > 1e8 for b in boards)  # Hz, not MHz
    tuner = simulated["performance_tuner_state"]["power_target_mode_state"]
    assert (
        tuner["current_target"]["watt"]
        == simulated["configuration_miner"]["tuner"]["power_target"]["watt"]
    )
    assert simulated["miner_details"]["bos_version"]["current"].endswith("-plus")
    version = simulated["version"]
    assert (version["major"], version["minor"], version["patch"]) == (1, 3, 0)
