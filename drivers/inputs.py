"""Bounded parsing of everything that comes from outside: one place for the limits.

Every input channel (config files, price CSVs and feeds, MQTT and OpenADR messages, device
replies, simulator control ports, CLI arguments) goes through these helpers, so that each has a
size cap, a nesting-depth cap, strict UTF-8, numbers that are finite *after* unit conversion
and inside a physical range, no booleans where a number belongs, and no duplicate keys.

A refusal is one :class:`InputRejected` (a :class:`~drivers.errors.BadInput`) that carries the
``source``, a short machine-readable ``reason`` (one of :data:`REASONS`) and a one-line message
naming the source and what was wrong. A missed deadline on a network read is
:class:`SourceTimeout` (reason ``timeout``).

Rejections are counted through a :class:`RejectionRecorder` passed to each driver at
construction; :class:`RejectionCounter` is the in-memory one the Prometheus collector reads as
``site_agent_rejected_inputs_total{source,reason}``. Drivers given none count into the
process-wide counter (:func:`process_rejections`), which the collector reads by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, Literal, Protocol, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from drivers.errors import BadInput, SourceError

Reason = Literal[
    "too_large",
    "not_utf8",
    "too_deep",
    "duplicate_key",
    "not_finite",
    "out_of_range",
    "bool_as_number",
    "bad_type",
    "bad_syntax",
    "alias",
    "missing",
    "timeout",
]
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))

# Defaults sized for the inputs this project reads: a site config is a few kB, a price answer
# well under a kB, an MQTT command a few hundred bytes. A cap a hundred times the real size
# still stops a hostile peer from filling memory.
MAX_JSON_BYTES: Final = 1 << 20
MAX_DEPTH: Final = 32
MAX_CONFIG_BYTES: Final = 4 << 20
MAX_CSV_BYTES: Final = 512 << 20  # a year of 5-minute prices for every hub is ~100 MB
MAX_CSV_FIELD_BYTES: Final = 4096


def one_line(text: str, limit: int = 300) -> str:
    """Whitespace (newlines included) collapsed, cut at ``limit``: safe for one log line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def validation_problems(exc: ValidationError, root: str = "message") -> str:
    """A pydantic error as one line of ``key.path: problem`` items (keys from hostile input
    included, so it is flattened)."""
    items = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        if err["type"] == NUMBER_ERROR:
            loc.append(str(ctx["field"]))
            msg = str(ctx["problem"])
        items.append(f"{'.'.join(loc) or root}: {msg}")
    return one_line("; ".join(items))


def shown(value: object, limit: int = 40) -> str:
    """A short, single-line ``repr`` of a hostile value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class InputRejected(BadInput):
    """An input was refused without effect. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, source: str, reason: Reason, message: str) -> None:
        super().__init__(source, one_line(message))
        self.reason: Reason = reason


class SourceTimeout(SourceError):
    """A network read missed its total deadline (connect, headers and body together)."""

    reason: Final = "timeout"

    def __init__(self, source: str, message: str) -> None:
        super().__init__(source, one_line(message))


# --- counting ------------------------------------------------------------------------------


class RejectionRecorder(Protocol):
    """Called once per refused input with its source and reason."""

    def __call__(self, source: str, reason: str) -> None: ...


class RejectionCounter:
    """Thread-safe in-memory counts of rejected inputs by (source, reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, source: str, reason: str) -> None:
        # Label values come from hostile input at times: keep them short and bounded.
        with self._lock:
            self._counts[(source[:80], reason[:40])] += 1

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def get(self, source: str, reason: str) -> int:
        with self._lock:
            return self._counts.get((source[:80], reason[:40]), 0)


_PROCESS_REJECTIONS = RejectionCounter()


def process_rejections() -> RejectionCounter:
    """The process-wide counter that drivers built without a recorder count into."""
    return _PROCESS_REJECTIONS


def reason_of(exc: BaseException) -> str:
    """The machine-readable reason of a refusal (``bad_input`` for older BadInput errors)."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else "bad_input"


# --- size, text, numbers -------------------------------------------------------------------


def check_size(size: int, max_bytes: int, source: str, what: str = "input") -> None:
    if size > max_bytes:
        raise InputRejected(
            source, "too_large", f"{what} is larger than the {max_bytes:,}-byte limit"
        )


def decode_utf8(data: bytes, source: str, *, max_bytes: int, what: str = "input") -> str:
    """Strict UTF-8 of at most ``max_bytes`` bytes (a leading BOM is dropped)."""
    check_size(len(data), max_bytes, source, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRejected(
            source,
            "not_utf8",
            f"{what} is not UTF-8 (byte {data[exc.start : exc.start + 1]!r} at offset {exc.start})",
        ) from None
    if "\x00" in text:
        raise InputRejected(source, "bad_type", f"{what} contains a NUL character")
    return text.removeprefix("\ufeff")


def read_text_file(path: Path, source: str, *, max_bytes: int) -> str:
    """Read a whole text file strictly: size cap before reading, then strict UTF-8."""
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    return decode_utf8(data, source, max_bytes=max_bytes, what=str(path))


def finite_in_range(
    value: object,
    lo: float,
    hi: float,
    what: str,
    *,
    source: str = "input",
    scale: float = 1.0,
    unit: str = "",
) -> float:
    """``value × scale`` as a float, refused unless a real number, finite, and in [lo, hi].

    Finiteness is checked *after* the conversion: a price finite in USD/kWh can overflow to
    ``inf`` in USD/MWh.
    """
    if isinstance(value, bool):
        raise InputRejected(source, "bool_as_number", f"{what}: expected a number, got {value}")
    if not isinstance(value, int | float):
        raise InputRejected(source, "bad_type", f"{what}: expected a number, got {shown(value)}")
    try:
        converted = float(value) * scale
    except OverflowError:
        raise InputRejected(source, "not_finite", f"{what}: {shown(value)} overflows") from None
    if not math.isfinite(converted):
        raise InputRejected(
            source,
            "not_finite",
            f"{what}: expected a finite number, got {shown(value)}"
            + ("" if scale == 1.0 else f" (×{scale:g} is {converted})"),
        )
    if not lo <= converted <= hi:
        suffix = f" {unit}" if unit else ""
        raise InputRejected(
            source,
            "out_of_range",
            f"{what}: expected {lo:g} to {hi:g}{suffix}, got {converted:g}{suffix}",
        )
    return converted


def parse_number_text(
    text: str, lo: float, hi: float, what: str, *, source: str = "input", scale: float = 1.0
) -> float:
    """A number written as text (CLI argument, CSV field, query parameter), then bounded."""
    stripped = text.strip()
    if len(stripped) > 64:
        raise InputRejected(source, "too_large", f"{what}: a number of {len(stripped)} characters")
    try:
        value = float(stripped)
    except ValueError:
        raise InputRejected(
            source, "bad_syntax", f"{what}: expected a number, got {shown(stripped)}"
        ) from None
    return finite_in_range(value, lo, hi, what, source=source, scale=scale)


# --- JSON ----------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused("duplicate_key", f"duplicate key {shown(key)}")
        out[key] = value
    return out


class _NonFinite:
    """Stands in for NaN/Infinity while decoding, so the refusal can name its key."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _constant(name: str) -> Any:
    return _NonFinite(name)


def _first_non_finite(document: Any) -> tuple[str, str] | None:
    """(key path, literal) of the first NaN/Infinity stand-in, without recursion."""
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _NonFinite):
            return path or "(top level)", node.text
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}".lstrip(".")) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}".lstrip(".")) for i, v in enumerate(node))
    return None


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("not_finite", f"{shown(text)} overflows a float")
    return value


def _int(text: str) -> int:
    # Python refuses ints over 4300 digits with ValueError; refuse far earlier, as a number
    # that long is no measurement.
    if len(text) > 40:
        raise _Refused("out_of_range", f"an integer of {len(text)} digits")
    return int(text)


def depth_of(document: Any) -> int:
    """Nesting depth of decoded JSON/YAML data (scalars are 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            depth += 1
            stack.extend((v, depth) for v in node.values())
        elif isinstance(node, list):
            depth += 1
            stack.extend((v, depth) for v in node)
        deepest = max(deepest, depth)
    return deepest


def load_json(
    data: bytes | str,
    source: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_DEPTH,
    what: str = "JSON",
) -> Any:
    """Decode bounded, strict JSON: size cap, UTF-8, depth cap, no duplicate keys, no NaN."""
    if isinstance(data, str):
        check_size(len(data.encode("utf-8", "surrogatepass")), max_bytes, source, what)
        text = data
    else:
        text = decode_utf8(data, source, max_bytes=max_bytes, what=what)
    try:
        document = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except _Refused as exc:
        raise InputRejected(source, exc.reason, f"{what}: {exc}") from None
    except RecursionError:
        raise InputRejected(
            source, "too_deep", f"{what} is nested deeper than {max_depth} levels"
        ) from None
    except ValueError as exc:
        raise InputRejected(source, "bad_syntax", f"{what}: malformed JSON: {exc}") from None
    if depth_of(document) > max_depth:
        raise InputRejected(source, "too_deep", f"{what} is nested deeper than {max_depth} levels")
    bad = _first_non_finite(document)
    if bad is not None:
        raise InputRejected(
            source, "not_finite", f"{what}: {bad[0]}: expected a finite number, got {bad[1]}"
        )
    return document


# --- YAML ----------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases (no billion laughs), duplicate keys or depth."""

    max_depth = MAX_DEPTH

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _YamlRefused("alias", event.start_mark, f"alias *{event.anchor} is not allowed")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _YamlRefused("alias", event.start_mark, f"anchor &{anchor} is not allowed")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise _YamlRefused(
                    "too_deep", event.start_mark, f"nested deeper than {self.max_depth} levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise _YamlRefused(
                    "bad_type", key_node.start_mark, "a mapping key must be a scalar"
                ) from None
            if duplicate:
                raise _YamlRefused("duplicate_key", key_node.start_mark, f"duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _YamlRefused(Exception):
    def __init__(self, reason: Reason, mark: Any, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.mark = mark


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def load_yaml(
    data: bytes, source: str, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH
) -> Any:
    """Decode bounded YAML: size cap, strict UTF-8, no anchors/aliases, no duplicate keys."""
    text = decode_utf8(data, source, max_bytes=max_bytes, what="the file")
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters here already
        loader.max_depth = max_depth
        return loader.get_single_data()
    except _YamlRefused as exc:
        raise InputRejected(source, exc.reason, f"{_where(exc.mark)}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputRejected(
            source, "bad_syntax", f"{_where(mark)}: invalid YAML: {problem}"
        ) from None
    except RecursionError:
        raise InputRejected(source, "too_deep", f"nested deeper than {max_depth} levels") from None
    finally:
        if loader is not None:
            loader.dispose()


# --- settings models -----------------------------------------------------------------------


def _is_number_annotation(annotation: Any) -> bool:
    """True for ``int``/``float`` fields (optionally ``| None``), never ``bool``."""
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin is Union or type(annotation).__name__ == "UnionType":
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


class StrictSettings(BaseModel):
    """Base of settings models read from files: unknown keys, bools and text for numbers,
    and non-finite numbers are refused (pydantic's lax mode would take ``true`` as 1 and
    ``"1e308"`` as a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not _is_number_annotation(field.annotation):
                continue
            if isinstance(value, bool):
                problem = f"expected a number, got a boolean ({str(value).lower()})"
            elif isinstance(value, str):
                problem = f"expected a number, got text {shown(value)}"
            elif isinstance(value, float) and not math.isfinite(value):
                problem = f"Input should be a finite number (got {value})"
            else:
                continue
            # The field's name travels in ``ctx`` so that error reports can add it to the key
            # path (a model-level check has no per-field location of its own).
            raise PydanticCustomError(
                NUMBER_ERROR, "{field}: {problem}", {"field": name, "problem": problem}
            )
        return data


NUMBER_ERROR: Final = "strict_number"


# --- deadlines -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def deadline(seconds: float, source: str, what: str) -> AsyncIterator[None]:
    """A total deadline on a network read: :class:`SourceTimeout` when it runs out."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise SourceTimeout(
            source, f"no complete answer from {what} within {seconds:g} s"
        ) from None


def record(recorder: Callable[[str, str], None] | None, source: str, exc: BaseException) -> None:
    """Count one refusal into ``recorder`` (the process-wide counter when None)."""
    (recorder or _PROCESS_REJECTIONS)(source, reason_of(exc))


# --- command-line arguments ----------------------------------------------------------------


def arg_number(lo: float, hi: float, what: str, *, integer: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a finite number in [lo, hi]; argparse prints the one-line error.

    (``float`` alone takes ``nan``, ``inf`` and ``1e400``; ``int`` alone takes any size.)
    """
    import argparse  # only the CLI needs it

    def parse(text: str) -> float:
        try:
            value = parse_number_text(text, lo, hi, what, source="argument")
        except InputRejected as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        if integer:
            if value != int(value):
                raise argparse.ArgumentTypeError(f"{what}: expected a whole number, got {text!r}")
            return int(value)
        return value

    parse.__name__ = what  # argparse names the type in "invalid <name> value" messages
    return parse
