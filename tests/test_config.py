"""Config loading: shipped configs load; bad ones name the file, the key and the expectation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cli.main import main
from agent.control.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

MINIMAL = """
site: {id: s1, interconnect_limit_kw: 100}
prices: {realtime: {type: constant, value: 40}}
miner_models:
  S19: {profiles: [{name: default, power_w: 3068, hashrate_ths: 104}]}
miners:
  - {id: m, address: 10.0.0.1, model: S19, count: 3}
"""


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(
    path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "miner-password").write_text("s3cret\n")
    (creds / "mqtt-password").write_text("broker-pass\n")
    (creds / "node-mqtt-password").write_text("node-pass\n")  # example-node.yaml
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(path)
    assert cfg.site.interconnect_limit_kw > 0
    for _id, _addr, line in cfg.expanded_miners():
        assert line.model in cfg.miner_models


def test_count_expands_to_consecutive_addresses(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(MINIMAL)
    cfg = load_config(f)
    assert cfg.expanded_miners() == [
        ("m-001", "10.0.0.1", cfg.miners[0]),
        ("m-002", "10.0.0.2", cfg.miners[0]),
        ("m-003", "10.0.0.3", cfg.miners[0]),
    ]


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            "site: {id: s1, interconnect_limit_kw: -5}",
            "site.interconnect_limit_kw: Input should be greater than 0 (got -5)",
        ),
        (
            "site: {id: s1, interconnect_limit_kw: 100, interconect: 3}",
            "site.interconect: Extra inputs are not permitted (got 3)",
        ),
        (
            "site: {id: s1, interconnect_limit_kw: .nan}",
            "site.interconnect_limit_kw: Input should be a finite number (got nan)",
        ),
    ],
)
def test_bad_site_values_name_the_key(tmp_path: Path, mutation: str, expected: str) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(MINIMAL.replace("site: {id: s1, interconnect_limit_kw: 100}", mutation))
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert f"{f}: {expected}" in err.value.problems


def test_unknown_model_duplicate_id_and_overlap_are_all_reported() -> None:
    data = {
        "site": {"id": "s", "interconnect_limit_kw": 10},
        "prices": {"realtime": {"type": "constant", "value": 1}},
        "miner_models": {"A": {"profiles": [{"name": "p", "power_w": 1, "hashrate_ths": 1}]}},
        "miners": [
            {"id": "x", "address": "10.0.0.1", "model": "A", "count": 4},
            {"id": "x", "address": "10.0.0.3", "model": "B"},
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data, "site.yaml")
    text = str(err.value)
    assert "miners.1.model: unknown model 'B' (known: ['A'])" in text
    assert "miners.1.id: duplicate id 'x'" in text
    assert "miners.1.address: 10.0.0.3 overlaps another miner's address" in text


def test_bad_address_and_price_type(tmp_path: Path) -> None:
    text = MINIMAL.replace("10.0.0.1", "10.0.0.300").replace("type: constant", "type: magic")
    f = tmp_path / "site.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    joined = "\n".join(err.value.problems)
    assert "miners.0.address" in joined
    assert "'10.0.0.300'" in joined
    assert "prices.realtime: Input tag 'magic' found using 'type' does not match" in joined


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("site:\n  id: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert err.value.problems[0].startswith(f"{f}: line 3, column 1: invalid YAML")


def test_secret_is_never_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINER_PW", "hunter2")
    text = MINIMAL.replace(
        "count: 3}", "count: 3, credentials: {username: root, password: 'env:MINER_PW', pin: 1}}"
    )
    f = tmp_path / "site.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "miners.0.credentials.pin: Extra inputs are not permitted" in str(err.value)
    assert "hunter2" not in str(err.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        MINIMAL.replace("count: 3}", "count: 3, credentials: {password: 'env:MINER_PW'}}")
    )
    cfg = load_config(ok)
    creds = cfg.miners[0].credentials
    assert creds is not None
    assert creds.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(cfg)


def test_check_config_cli_prints_every_error_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("power_w: 3068", "power_w: -1").replace("count: 3", "count: 0"))
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    code = main(["check-config", str(good), str(bad)])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{good}: ok (site s1, 3 miners, 0 GPUs)" in out
    assert (
        f"{bad}: miner_models.S19.profiles.0.power_w: Input should be greater than 0 (got -1)"
        in err
    )
    assert f"{bad}: miners.0.count: Input should be greater than or equal to 1 (got 0)" in err
    assert main(["check-config", str(good)]) == 0


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    f = sub / "site.yaml"
    f.write_text(
        MINIMAL.replace("{type: constant, value: 40}", "{type: csv_replay, path: p.csv, column: X}")
    )
    cfg = load_config(f)
    assert os.fspath(cfg.prices.realtime.path) == os.fspath(sub / "p.csv")  # type: ignore[union-attr]
