"""Hostile input, parser by parser: random and adversarial data gets only clean, documented errors.

Every parser of an outside input (JSON, YAML configs, price CSVs, MQTT curtailment messages and
operator commands, OpenADR events, numbers after unit conversion, CLI times) is fed random bytes
and the known attack shapes (huge, deep, non-UTF-8, NaN, booleans, duplicates, aliases, numbers
that overflow after conversion). Each must either accept or refuse with
:class:`~drivers.inputs.InputRejected` (or the channel's own documented error) carrying one of
the documented reasons and a one-line message; never a traceback, never a silent acceptance.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.config import ConfigError, load_config
from agent.outputs.mqtt import Rejected, parse_command
from agent.runtime.events import parse_until
from agent.runtime.wiring import build_price_source
from drivers.grid.base import ProgramKind
from drivers.grid.mqtt_curtail import MqttCurtailSettings, MqttCurtailSource
from drivers.grid.openadr import OpenAdrProgram, _Reject, grid_events_from_openadr
from drivers.inputs import (
    REASONS,
    InputRejected,
    RejectionCounter,
    finite_in_range,
    load_json,
    load_yaml,
    parse_number_text,
    process_rejections,
    record,
)
from drivers.prices.csv_replay import BadRow, load_price_csv, load_series_csv
from drivers.prices.http_json import HttpJsonSettings, HttpJsonSource, value_range
from drivers.prices.system_load import load_system_load_csv

pytestmark = pytest.mark.hostile

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def attempt(fn: Callable[[], Any], *errors: type[Exception]) -> tuple[Any, Any]:
    """(result, None) or (None, the refusal): assertions then run outside ``except``."""
    try:
        return fn(), None
    except errors as exc:
        return None, exc


def assert_clean(exc: InputRejected, source: str) -> None:
    """A documented reason and one line that names the source."""
    assert exc.reason in REASONS
    text = str(exc)
    assert "\n" not in text
    assert text.startswith(f"{source}: ")
    assert len(text) < 400


# --- JSON ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_are_json_or_a_clean_refusal(data: bytes) -> None:
    _, exc = attempt(lambda: load_json(data, "feed"), InputRejected)
    if exc is not None:
        assert_clean(exc, "feed")


@FAST
@given(json_values)
def test_valid_json_round_trips_when_shallow(value: Any) -> None:
    text = json.dumps(value)
    assert load_json(text.encode(), "feed") == json.loads(text)


@FAST
@given(st.integers(min_value=33, max_value=200_000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_too_deep(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + closer * depth).encode()
    with pytest.raises(InputRejected) as info:
        load_json(body, "feed", max_bytes=10 << 20)
    assert info.value.reason == "too_deep"
    assert_clean(info.value, "feed")


@pytest.mark.parametrize(
    ("body", "reason", "words"),
    [
        (b'{"price": 1, "price": 2}', "duplicate_key", "duplicate key 'price'"),
        (b'{"data": [{"price": NaN}]}', "not_finite", "data.0.price: expected a finite number"),
        (b'{"price": Infinity}', "not_finite", "price: expected a finite number, got Infinity"),
        (b'{"price": -Infinity}', "not_finite", "got -Infinity"),
        (b'{"price": 1e400}', "not_finite", "overflows a float"),
        (b'{"price": 1' + b"0" * 5000 + b"}", "out_of_range", "an integer of 5001 digits"),
        (b'{"price": "\xff"}', "not_utf8", "is not UTF-8"),
        (b'{"price": 4', "bad_syntax", "malformed JSON"),
        (b"x" * (2 << 20), "too_large", "larger than the 1,048,576-byte limit"),
    ],
)
def test_each_json_attack_has_its_reason(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(InputRejected) as info:
        load_json(body, "feed")
    assert info.value.reason == reason
    assert words in str(info.value)
    assert_clean(info.value, "feed")


# --- numbers after conversion ----------------------------------------------------------------

anything = (
    st.floats()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.booleans()
    | st.text(max_size=10)
    | st.none()
    | st.lists(st.integers(), max_size=2)
)


@FAST
@given(anything, st.sampled_from([1.0, 10.0, 1000.0, 1e-3]))
def test_finite_in_range_only_returns_finite_numbers_in_range(value: Any, scale: float) -> None:
    lo, hi = -100_000.0, 100_000.0
    out, exc = attempt(
        lambda: finite_in_range(value, lo, hi, "price", source="feed", scale=scale), InputRejected
    )
    if exc is not None:
        assert_clean(exc, "feed")
        if isinstance(value, bool):
            assert exc.reason == "bool_as_number"
        elif not isinstance(value, int | float):
            assert exc.reason == "bad_type"
        return
    assert not isinstance(value, bool)
    assert math.isfinite(out)
    assert lo <= out <= hi
    assert out == pytest.approx(float(value) * scale)


def test_finite_before_conversion_infinite_after_is_refused() -> None:
    with pytest.raises(InputRejected) as info:
        finite_in_range(1e306, -1e300, 1e300, "price", source="feed", scale=1000.0)
    assert info.value.reason == "not_finite"
    assert "(×1000 is inf)" in str(info.value)


@FAST
@given(st.text(max_size=80))
def test_number_text_parses_or_refuses(text: str) -> None:
    value, exc = attempt(
        lambda: parse_number_text(text, 0.0, 1e7, "--target-kw", source="argument"),
        InputRejected,
    )
    if exc is not None:
        assert_clean(exc, "argument")
        return
    assert math.isfinite(value)
    assert 0.0 <= value <= 1e7


def test_rejection_counter_counts_by_source_and_reason() -> None:
    counter = RejectionCounter()
    for body in (b"[NaN]", b'{"a":1,"a":1}', b"[NaN]"):
        try:
            load_json(body, "feed")
        except InputRejected as exc:
            record(counter, "feed", exc)
    assert counter.counts() == {("feed", "not_finite"): 2, ("feed", "duplicate_key"): 1}


# --- YAML ----------------------------------------------------------------------------------


@FAST
@given(st.text(max_size=300))
def test_random_yaml_text_loads_or_refuses_cleanly(text: str) -> None:
    _, exc = attempt(
        lambda: load_yaml(text.encode("utf-8", "surrogatepass"), "site.yaml"), InputRejected
    )
    if exc is not None:
        assert_clean(exc, "site.yaml")


BILLION_LAUGHS = b"""
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]
"""


@pytest.mark.parametrize(
    ("text", "reason", "words"),
    [
        (BILLION_LAUGHS, "alias", "line 2, column 4: anchor &a is not allowed"),
        (b"base: &x {port: 1}\nother:\n  <<: *x\n", "alias", "anchor &x"),
        (b"site:\n  id: a\n  id: b\n", "duplicate_key", "line 3, column 3: duplicate key 'id'"),
        (b"a: " + b"[" * 40 + b"]" * 40, "too_deep", "nested deeper than 32 levels"),
        (b"a: 1\n\xff\n", "not_utf8", "is not UTF-8"),
        (b"a: [1, 2\n", "bad_syntax", "invalid YAML"),
    ],
)
def test_each_yaml_attack_has_its_reason(text: bytes, reason: str, words: str) -> None:
    with pytest.raises(InputRejected) as info:
        load_yaml(text, "site.yaml")
    assert info.value.reason == reason
    assert words in str(info.value)
    assert_clean(info.value, "site.yaml")


# --- config files --------------------------------------------------------------------------

MINIMAL = """\
site: {id: s1, interconnect_limit_kw: 100}
prices:
  realtime: {type: constant, value: 40}
miner_models:
  s19: {profiles: [{name: default, power_w: 3250, hashrate_ths: 104}]}
miners:
  - {id: m, address: 10.0.0.1, model: s19, count: 2}
"""


def config_problems(tmp_path: Path, content: bytes) -> list[str]:
    f = tmp_path / "site.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    for line in info.value.problems:
        assert line.startswith(f"{f}: ")
        assert "\n" not in line
        assert "Traceback" not in line
    return [p.removeprefix(f"{f}: ") for p in info.value.problems]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "interconnect_limit_kw: 100",
            "interconnect_limit_kw: true",
            "site.interconnect_limit_kw: expected a number, got a boolean (true)",
        ),
        (
            "interconnect_limit_kw: 100",
            "interconnect_limit_kw: 1e308",  # YAML 1.1 reads this as text
            "site.interconnect_limit_kw: expected a number, got text '1e308'",
        ),
        (
            "interconnect_limit_kw: 100",
            "interconnect_limit_kw: 1.0e+308",
            "site.interconnect_limit_kw: Input should be less than or equal to 10000000",
        ),
        (
            "value: 40",
            "value: 1.0e+300",
            "prices.realtime.constant.value: Input should be less than or equal to 100000",
        ),
        (
            "power_w: 3250",
            "power_w: .inf",
            "miner_models.s19.profiles.0.power_w: Input should be a finite number (got inf)",
        ),
        ("count: 2", "count: true", "miners.0.count: expected a number, got a boolean (true)"),
        (
            "address: 10.0.0.1, model: s19, count: 2",
            "address: 255.255.255.250, model: s19, count: 10",
            "miners.0: 10 addresses from 255.255.255.250 run past 255.255.255.255",
        ),
    ],
)
def test_config_numbers_and_ranges_name_the_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in MINIMAL
    problems = config_problems(tmp_path, MINIMAL.replace(old, new).encode())
    assert any(p.startswith(expected) for p in problems), problems


def test_config_durations_past_year_9999_are_refused(tmp_path: Path) -> None:
    text = MINIMAL + "control: {min_on_s: 1.0e+300, fault_retry_s: 1.0e+12}\n"
    problems = config_problems(tmp_path, text.encode())
    assert any(
        p.startswith("control.min_on_s: Input should be less than or equal") for p in problems
    )
    assert any(p.startswith("control.fault_retry_s:") for p in problems)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (MINIMAL.encode() + b"# caf\xe9\n", "the file is not UTF-8 (byte b'\\xe9'"),
        (MINIMAL.encode() + BILLION_LAUGHS, "anchor &a is not allowed"),
        (MINIMAL.replace("id: s1", "id: s1, id: s2").encode(), "duplicate key 'id'"),
        (b"# pad\n" * 1_000_000, "larger than the 4,194,304-byte limit"),
        (b"site: " + b"{a: " * 100 + b"1" + b"}" * 100, "nested deeper than 32 levels"),
    ],
)
def test_hostile_config_files_are_one_line_errors(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    problems = config_problems(tmp_path, content)
    assert len(problems) == 1
    assert expected in problems[0]


@FAST
@given(
    st.sampled_from(["interconnect_limit_kw: 100", "value: 40", "power_w: 3250", "count: 2"]),
    st.one_of(
        st.floats().map(repr),
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.sampled_from(["true", "no", "~", ".nan", "-.inf", "'7'", "[]", "{}", "0x10", "1e5"]),
    ),
)
def test_any_value_in_a_number_slot_is_valid_or_a_named_error(
    tmp_path_factory: pytest.TempPathFactory, slot: str, value: str
) -> None:
    key = slot.split(":")[0]
    f = tmp_path_factory.mktemp("cfg") / "site.yaml"
    f.write_text(MINIMAL.replace(slot, f"{key}: {value}"))
    cfg, exc = attempt(lambda: load_config(f), ConfigError)
    if exc is not None:
        assert all(line.startswith(f"{f}: ") and "\n" not in line for line in exc.problems)
        return
    numbers = [
        cfg.site.interconnect_limit_kw,
        cfg.miner_models["s19"].profiles[0].power_w,
        float(cfg.miners[0].count),
    ]
    assert all(math.isfinite(n) and not isinstance(n, bool) for n in numbers)


# --- price and system-load CSVs ------------------------------------------------------------


def test_huge_csv_field_is_refused_without_a_traceback(tmp_path: Path) -> None:
    f = tmp_path / "prices.csv"
    with f.open("w") as out:
        out.write("interval_start_utc,HB_WEST\n2023-01-01T00:00:00Z,")
        out.write('"' + "9" * (50 << 20) + '"\n')  # one 50 MB quoted field
    with pytest.raises(InputRejected) as info:
        load_price_csv(f, "HB_WEST", collect_errors=True)
    assert info.value.reason == "too_large"
    assert "field larger than field limit" in str(info.value)
    assert_clean(info.value, "prices.csv")


def test_long_unquoted_field_rejects_its_row_only(tmp_path: Path) -> None:
    f = tmp_path / "prices.csv"
    f.write_text(
        "interval_start_utc,HB_WEST\n"
        "2023-01-01T00:00:00Z,20\n"
        f"2023-01-01T00:15:00Z,{'1' * 5000}\n"
        "2023-01-01T00:30:00Z,30\n"
    )
    series = load_price_csv(f, "HB_WEST", collect_errors=True)
    assert series.values == (20.0, 30.0)
    assert len(series.rejected) == 1
    assert "a field of 5,000 characters (limit 4,096)" in str(series.rejected[0])


def test_csv_file_over_the_cap_and_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "prices.csv"
    f.write_bytes(b"interval_start_utc,HB_WEST\n2023-01-01T00:00:00Z,2\xff0\n")
    with pytest.raises(InputRejected) as info:
        load_price_csv(f, "HB_WEST")
    assert info.value.reason == "not_utf8"
    with pytest.raises(InputRejected) as info:
        load_series_csv(f, time_column="t", value_column="v", unit="x", max_bytes=10)
    assert info.value.reason == "too_large"
    assert "(limit 10)" in str(info.value)


def test_system_load_finite_as_written_but_infinite_after_scaling_is_rejected(
    tmp_path: Path,
) -> None:
    f = tmp_path / "load.csv"
    rows = ["interval_end_utc,total_mwh"]
    start = datetime(2023, 8, 1, tzinfo=UTC)
    for k, value in enumerate(["10000", "1.7e308", "10100"]):
        at = start + timedelta(minutes=15 * (k + 1))
        rows.append(f"{at.isoformat().replace('+00:00', 'Z')},{value}")
    f.write_text("\n".join(rows) + "\n")
    try:
        series = load_system_load_csv(f, collect_errors=True)
    except BadRow as exc:  # a file layout this test does not match: say so
        pytest.fail(f"unexpected layout: {exc}")
    assert all(math.isfinite(v) for v in series.values)
    assert len(series.rejected) == 1


# --- MQTT curtailment messages and operator commands -----------------------------------------


def curtail_source() -> MqttCurtailSource:
    settings_ = MqttCurtailSettings.model_validate(
        {"programs": {"ers": {"kind": "emergency"}}, "default_program": "ers"}
    )
    return MqttCurtailSource(settings_)


@FAST
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_curtail_messages_never_raise_and_bad_ones_change_nothing(payload: bytes) -> None:
    source = curtail_source()
    source.handle("grid/curtail", payload)
    if source.rejected:
        assert source.events() == ()
        assert "\n" not in source.rejected[-1].reason


@pytest.mark.parametrize(
    ("payload", "start"),
    [
        (b"[" * 50_000, "too_deep:"),
        (b'{"event_id": "a", "event_id": "b"}', "duplicate_key:"),
        (b"\xff\xfe{}", "not_utf8:"),
        (b"{" + b" " * 70_000 + b"}", "too_large:"),
        (
            json.dumps(
                {"event_id": "x", "state": "on", "max_site_kw": True, "until": "2099-01-01T00:00Z"}
            ).encode(),
            "invalid curtailment message: max_site_kw",
        ),
        (
            json.dumps(
                {"event_id": "x", "state": "on", "shed_kw": 1e300, "until": "2099-01-01T00:00Z"}
            ).encode(),
            "invalid curtailment message: shed_kw",
        ),
    ],
)
def test_each_curtail_attack_is_rejected_with_its_reason(payload: bytes, start: str) -> None:
    source = curtail_source()
    source.handle("grid/curtail", payload)
    assert source.events() == ()
    assert len(source.rejected) == 1
    assert source.rejected[0].reason.startswith(start), source.rejected[0].reason


TOKENS = {"alice": "alice-token-1"}
NOW = datetime(2026, 7, 1, 12, tzinfo=UTC)
COMMAND_CODES = {
    *REASONS,
    "malformed",
    "unauthorized",
    "unknown_command",
    "invalid",
    "expired",
}


@FAST
@given(
    st.sampled_from(["curtail", "release", "set_mode", "refresh", "x"]),
    st.binary(max_size=300)
    | st.dictionaries(
        st.sampled_from(["id", "operator", "token", "target_kw", "until"]), json_values
    )
    .map(lambda d: {**d, "operator": "alice", "token": "alice-token-1"})
    .map(lambda d: json.dumps(d).encode()),
)
def test_commands_parse_or_are_rejected_with_a_bounded_code(name: str, payload: bytes) -> None:
    _, exc = attempt(lambda: parse_command(name, payload, TOKENS, NOW), Rejected)
    if exc is not None:
        assert exc.code in COMMAND_CODES
        assert "\n" not in exc.reason
        assert len(exc.reason) <= 400
        assert "alice-token-1" not in exc.reason


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[" * 10_000, "too_deep"),
        (b'{"operator": "alice", "operator": "mallory", "token": "x"}', "duplicate_key"),
        (b'{"id": "x", "token": NaN}', "not_finite"),
        (
            json.dumps(
                {
                    "id": "c1",
                    "operator": "alice",
                    "token": "alice-token-1",
                    "target_kw": True,
                    "until": "2099-01-01T00:00:00Z",
                }
            ).encode(),
            "invalid",
        ),
        (
            json.dumps(
                {
                    "id": "c1",
                    "operator": "alice",
                    "token": "alice-token-1",
                    "target_kw": 1e308,
                    "until": "2099-01-01T00:00:00Z",
                }
            ).encode(),
            "invalid",
        ),
    ],
)
def test_each_command_attack_is_rejected(payload: bytes, code: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_command("curtail", payload, TOKENS, NOW)
    assert info.value.code == code


# --- OpenADR events ------------------------------------------------------------------------

PROGRAMS = {"ctx": OpenAdrProgram(name="dr", kind=ProgramKind.EMERGENCY)}


def oadr_event(value: Any, duration: Any, scale: str = "k") -> dict[str, Any]:
    return {
        "event_descriptor": {"event_id": "e1", "market_context": "ctx"},
        "active_period": {"dtstart": NOW},
        "event_signals": [
            {
                "signal_name": "LOAD_DISPATCH",
                "signal_type": "setpoint",
                "measurement": {"scale": scale},
                "intervals": [{"dtstart": NOW, "duration": duration, "signal_payload": value}],
            }
        ],
    }


@FAST
@given(
    st.floats() | st.integers(min_value=-(10**30), max_value=10**30) | st.booleans() | st.none(),
    st.timedeltas(min_value=timedelta(seconds=-10), max_value=timedelta(days=10**6)),
    st.sampled_from(["none", "k", "M"]),
)
def test_openadr_targets_are_finite_and_in_range_or_rejected(
    value: Any, duration: timedelta, scale: str
) -> None:
    events, exc = attempt(
        lambda: grid_events_from_openadr(
            oadr_event(value, duration, scale),
            source="oadr",
            programs=PROGRAMS,
            simple_level_max_site_kw={},
            now=NOW - timedelta(minutes=1),
        ),
        _Reject,
    )
    if exc is not None:
        assert "\n" not in str(exc)
        return
    for event in events:
        assert event.max_site_kw is not None
        assert math.isfinite(event.max_site_kw)
        assert 0 <= event.max_site_kw <= 10_000_000
        assert event.end - event.start <= timedelta(days=31)


def test_openadr_value_that_overflows_after_mw_conversion_is_rejected() -> None:
    with pytest.raises(_Reject, match="not_finite: interval 0"):
        grid_events_from_openadr(
            oadr_event(1.7e308, timedelta(hours=1), "M"),
            source="oadr",
            programs=PROGRAMS,
            simple_level_max_site_kw={},
            now=NOW - timedelta(minutes=1),
        )


# --- CLI times -----------------------------------------------------------------------------


@FAST
@given(st.text(max_size=70) | st.from_regex(r"\+[0-9]{1,40}(\.[0-9]{0,5})?[smh]", fullmatch=True))
def test_until_parses_or_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):  # the documented refusal; anything else fails
        parse_until(text, NOW)


def test_yaml_config_loader_is_the_bounded_one() -> None:
    # The safe loader alone would accept these; load_config must not.
    assert yaml.safe_load("a: &x 1\nb: *x\n") == {"a": 1, "b": 1}
    with pytest.raises(InputRejected):
        load_yaml(b"a: &x 1\nb: *x\n", "f")


def test_a_config_naming_millions_of_miners_is_refused_fast(tmp_path: Path) -> None:
    lines = [
        f"  - {{id: r{k}, address: 10.{k // 250}.{k % 250}.0, model: s19, count: 100000}}"
        for k in range(2000)
    ]
    text = MINIMAL.split("miners:")[0] + "miners:\n" + "\n".join(lines) + "\n"
    started = time.monotonic()
    problems = config_problems(tmp_path, text.encode())
    assert time.monotonic() - started < 30  # sets of 2e8 addresses used to exhaust memory
    assert len(problems) == 1
    assert problems[0].startswith("(top level): miners: 200,000,000 miners in all (at most 100,000")
    assert "overlaps another miner's address" in problems[0]
    assert "; and 1990 more" in problems[0]


def test_secret_file_not_utf8_is_named_not_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(b"hunter2\xff")
    text = MINIMAL + f"mqtt: {{password: 'file:{secret}'}}\n"
    problems = config_problems(tmp_path, text.encode())
    assert problems == [f"mqtt.password: cannot resolve the secret: {secret}: not utf8"]


# --- HTTP JSON answers, decoded ------------------------------------------------------------


@FAST
@given(
    json_values | st.floats() | st.integers(min_value=-(10**60), max_value=10**60),
    st.sampled_from(["USD/MWh", "USD/kWh", "cents/kWh", "USD/PH/day", "USD/TH/day"]),
)
def test_any_value_in_a_feed_gives_a_bounded_reading_or_a_refusal(value: Any, unit: str) -> None:
    settings_ = HttpJsonSettings(url="http://127.0.0.1:9/p", value_path="data.0.price", unit=unit)
    source = HttpJsonSource(settings_, name="feed")
    reading, exc = attempt(
        lambda: source.reading_from({"data": [{"price": value}]}, NOW), InputRejected
    )
    if exc is not None:
        assert_clean(exc, "feed")
        return
    lo, hi, _ = value_range(unit)
    assert math.isfinite(reading.value)
    assert lo <= reading.value <= hi
    assert not isinstance(value, bool)


def test_rejected_price_rows_are_counted_by_reason_when_the_agent_loads_them(
    tmp_path: Path,
) -> None:
    f = tmp_path / "rows.csv"
    f.write_text(
        "interval_start_utc,HB_WEST\n"
        "2023-01-01T00:00:00Z,20\n"
        "2023-01-01T00:15:00Z,NaN\n"
        "2023-01-01T00:30:00Z,\n"
        "2023-01-01T00:45:00Z,1e999\n"
        "2023-01-01T00:45:00Z,5\n"
        "2023-01-01T01:00:00Z,30\n"
    )
    text = MINIMAL.replace(
        "realtime: {type: constant, value: 40}",
        f"realtime: {{type: csv_replay, path: {f}, column: HB_WEST}}",
    )
    cfg_file = tmp_path / "site.yaml"
    cfg_file.write_text(text)
    counter = process_rejections()
    before = counter.counts()
    build_price_source(load_config(cfg_file))
    after = counter.counts()

    def added(reason: str) -> int:
        key = ("csv:rows.csv", reason)
        return after.get(key, 0) - before.get(key, 0)

    assert (added("not_finite"), added("missing"), added("duplicate_key")) == (2, 1, 1)
