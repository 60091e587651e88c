"""Structured logging: JSON off a terminal, text on one, the cycle line, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from agent.control.config import parse_config
from agent.control.redaction import secrets_in
from agent.outputs.logs import bound, log_cycle, setup_logging
from tests.sample_state import sample_config, sample_plan, sample_snapshot

log = logging.getLogger("agent.test")


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """setup_logging owns the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    log.info("miner %s faulted", "m-004", extra={"device_id": "m-004", "power_w": 3068.0})
    [line] = lines(out)
    assert line["level"] == "info"
    assert line["logger"] == "agent.test"
    assert line["msg"] == "miner m-004 faulted"
    assert line["device_id"] == "m-004"
    assert line["power_w"] == 3068.0
    assert line["ts"].endswith("Z")


def test_readable_text_on_a_terminal() -> None:
    out = Tty()
    setup_logging(stream=out)
    log.warning("price stale", extra={"age_s": 1900})
    text = out.getvalue()
    assert "WARNING" in text
    assert "agent.test: price stale" in text
    assert "age_s=1900" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_json_to_stdout_under_capsys(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()  # stdout is a pipe here, as under systemd: JSON
    log.info("hello")
    out = capsys.readouterr().out
    assert json.loads(out)["msg"] == "hello"


def test_level_filters_and_bound_context() -> None:
    out = io.StringIO()
    setup_logging("WARNING", stream=out)
    log.info("dropped")
    with bound(cycle=7, source="price:realtime"):
        log.warning("kept")
    log.warning("after")
    first, second = lines(out)
    assert first["msg"] == "kept"
    assert first["cycle"] == 7
    assert first["source"] == "price:realtime"
    assert "cycle" not in second


def test_cycle_line_carries_the_decision_summary() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    log_cycle(
        logging.getLogger("agent.runtime.loop"),
        sample_plan(),
        cycle=241,
        duration_s=0.12345,
        snapshot=sample_snapshot(),
        mode="auto",
    )
    [line] = lines(out)
    assert line["msg"] == "cycle 241: shed 1 miner for event ev-1"
    assert line["event"] == "cycle"
    assert line["cycle"] == 241
    assert line["duration_s"] == 0.1235
    assert line["planned_power_w"] == 13_800.0
    assert line["limit_w"] == 14_000.0
    assert line["site_power_w"] == 18_898.0
    assert line["action_kinds"] == {"sleep": 1}
    assert line["binding"] == ["event:ev-1"]
    assert line["events_active"] == 1
    assert line["faulted"] == 1
    assert line["mode"] == "auto"


def test_secrets_from_config_finds_every_secret() -> None:
    cfg = parse_config(
        {
            "site": {"id": "s", "interconnect_limit_kw": 1},
            "prices": {"realtime": {"type": "constant", "value": 1}},
            "miner_models": {"M": {"profiles": [{"name": "p", "power_w": 1, "hashrate_ths": 1}]}},
            "miners": [
                {
                    "id": "m",
                    "address": "10.0.0.1",
                    "model": "M",
                    "credentials": {"username": "root", "password": "miner-pass-9"},
                }
            ],
            "mqtt": {"password": "broker-pass-7", "command_tokens": {"op": "tok-abc-123"}},
        }
    )
    assert set(secrets_in(cfg)) == {"miner-pass-9", "broker-pass-7", "tok-abc-123"}
    assert list(secrets_in(sample_config())) == ["op-token-123"]


def test_secrets_never_printed(caplog: pytest.LogCaptureFixture) -> None:
    secret = "op-token-123"
    out = io.StringIO()
    setup_logging(stream=out, secrets=secrets_in(sample_config()))
    logging.getLogger().addHandler(caplog.handler)  # after ours: it sees the redacted record
    log.info("token is %s", secret)
    log.info("in a field", extra={"auth": {"token": secret}, "tokens": [secret]})
    try:
        raise ValueError(f"bad token {secret}")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert secret not in text
    assert text.count("***") >= 4
    first, second, third = lines(out)
    assert first["msg"] == "token is ***"
    assert second["auth"] == {"token": "***"}
    assert "bad token ***" in third["exc"]
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert caplog.records[0].getMessage() == "token is ***"


def test_short_secrets_are_not_redacted_everywhere() -> None:
    out = io.StringIO()
    setup_logging(stream=out, secrets=["ab", ""])  # would mangle ordinary text
    log.info("table and cab")
    assert lines(out)[0]["msg"] == "table and cab"
