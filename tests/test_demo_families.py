"""The demo's miners: all four firmware families, each model one its family's simulator serves,
and the stock Antminers left out (with one line saying why) where port 80 cannot be bound."""

from __future__ import annotations

import socket

import pytest

import agent.cli.demo_site as demo_site
from agent.cli.demo import DEFAULT_CONFIG
from agent.cli.demo_site import miners_on_net, model_key, without_unservable_antminers
from agent.control.config import load_config
from simulators.luxos_model import MODELS as LUXOS_MODELS
from simulators.whatsminer_replies import WHATSMINER_MODELS
from tests.loopback import NET

SERVED = {
    "luxos": LUXOS_MODELS,
    "braiins": LUXOS_MODELS,
    "antminer": LUXOS_MODELS,  # the stock simulator serves the same models
    "whatsminer": WHATSMINER_MODELS,
}


def test_the_demo_runs_every_family_on_models_their_simulators_serve() -> None:
    config = load_config(DEFAULT_CONFIG)
    families = {line.firmware for line in config.miners}
    assert families == set(SERVED)
    for line in config.miners:
        assert model_key(line.model) in SERVED[line.firmware], line
        assert line.model in config.miner_models  # in the site's ladder


class _NoPort80(socket.socket):
    def bind(self, address: object) -> None:
        raise PermissionError(13, "Permission denied")


def test_without_port_80_the_demo_drops_its_stock_antminers_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(DEFAULT_CONFIG)
    monkeypatch.setattr(demo_site.socket, "socket", _NoPort80)
    kept, line = without_unservable_antminers(config)
    assert line == (
        "demo: runs without its 10 stock Antminers: their web API needs port 80, "
        "which only root may bind"
    )
    assert [m.id for m in kept.miners] == [m.id for m in config.miners if m.firmware != "antminer"]
    assert len(list(kept.expanded_miners())) == 50


def test_where_port_80_binds_nothing_is_dropped() -> None:
    config = miners_on_net(load_config(DEFAULT_CONFIG), NET)
    stock = next(m for m in config.miners if m.firmware == "antminer")
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((stock.address, 80))
    except PermissionError:
        pytest.skip("not root: port 80 cannot be bound here")
    except OSError:
        pytest.skip("port 80 on the demo's address is in use")
    kept, line = without_unservable_antminers(config)
    assert line == ""
    assert kept.miners == config.miners
