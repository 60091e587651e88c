"""Structured logging: JSON lines for journald, readable lines on a terminal, secrets redacted.

Only the entry point calls :func:`setup_logging` (style.md); modules just use
``logging.getLogger(__name__)`` and pass structured fields with ``extra={...}``. The runtime
calls :func:`log_cycle` once per control cycle: that is the canonical line of the cycle (its
decision summary); polls are not logged, state changes are.

JSON line fields: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, then every ``extra``
field and every field bound with :func:`bound`, then ``exc`` for a traceback.

Every configured secret (MQTT password, command tokens, miner passwords; see
:func:`agent.control.redaction.secrets_in`) is replaced by ``***`` wherever it would appear:
message, arguments, extra fields and tracebacks (one redaction module for logs and journal).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from agent.control.domain import Plan, Snapshot
from agent.control.redaction import Redactor
from agent.runtime.state import AgentState

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "site_agent_log_context", default=MappingProxyType({})
)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this task (and tasks it starts) inside the block."""
    token = _context.set(MappingProxyType({**_context.get(), **fields}))
    try:
        yield
    finally:
        _context.reset(token)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts secrets in the message, its arguments and extra fields.

    It rewrites the record in place (message formatted once, arguments dropped), so every
    handler after it sees the redacted text too.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor.secrets:
            record.msg = self.redactor.text(record.getMessage())
            record.args = None
            for key, value in list(record.__dict__.items()):
                if key not in _STANDARD:
                    setattr(record, key, self.redactor.value(value))
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(_context.get())
    fields.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
    return fields


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _timestamp(record: logging.LogRecord) -> str:
    at = datetime.fromtimestamp(record.created, UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (for journald and log shippers)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, _jsonable(value))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return self.redactor.text(json.dumps(line, ensure_ascii=False, allow_nan=False))


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO agent.runtime.loop: msg key=value ...`` for a terminal."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        for key, value in _fields(record).items():
            shown = json.dumps(_jsonable(value), ensure_ascii=False)
            parts.append(f"{key}={shown}")
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self.redactor.text(text)


def setup_logging(
    level: int | str = logging.INFO,
    *,
    stream: TextIO | None = None,
    json_lines: bool | None = None,
    secrets: Iterable[str] = (),
) -> logging.Handler:
    """Configure the root logger; call once, from the entry point.

    ``json_lines=None`` picks JSON when ``stream`` is not a terminal. Handlers set up before
    (pyasic calls ``logging.basicConfig`` at import) are removed. Returns the handler.
    """
    stream = stream if stream is not None else sys.stdout
    if json_lines is None:
        json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor) if json_lines else TextFormatter(redactor))
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries that chat at INFO about every packet or poll: keep them to warnings.
    for noisy in ("pyasic", "aiomqtt", "paho", "asyncio", "openleadr", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pymodbus logs every failed request at ERROR with a hex dump; the meter watch already says
    # once, in one line, when the meter fails and when it answers again.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    return handler


def cycle_fields(
    plan: Plan,
    *,
    cycle: int,
    duration_s: float,
    snapshot: Snapshot | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """The structured fields of one control cycle's canonical line."""
    kinds: dict[str, int] = {}
    for a in plan.actions:
        kinds[a.kind.value] = kinds.get(a.kind.value, 0) + 1
    fields: dict[str, Any] = {
        "event": "cycle",
        "cycle": cycle,
        "duration_s": round(duration_s, 4),
        "limit_w": plan.limit_w,
        "planned_power_w": plan.planned_power_w,
        "price_usd_per_mwh": plan.effective_price_usd_per_mwh,
        "value_usd_per_h": round(plan.value_usd_per_h, 4),
        "cost_usd_per_h": round(plan.cost_usd_per_h, 4),
        "actions": len(plan.actions),
        "action_kinds": kinds,
        "binding": list(plan.binding),
    }
    if mode is not None:
        fields["mode"] = mode
    if snapshot is not None:
        fields["site_power_w"] = snapshot.measured_site_power_w
        fields["events_active"] = len(snapshot.events)
        fields["faulted"] = sum(1 for m in snapshot.miners if m.fault is not None) + sum(
            1 for n in snapshot.gpu_nodes if n.fault is not None
        )
    return fields


def log_cycle(
    logger: logging.Logger,
    plan: Plan,
    *,
    cycle: int,
    duration_s: float,
    snapshot: Snapshot | None = None,
    mode: str | None = None,
) -> None:
    """Log the canonical INFO line of one control cycle: its decision summary and figures.

    One line per cycle, whatever happened; polls and per-device chatter are not logged here.
    """
    fields = cycle_fields(plan, cycle=cycle, duration_s=duration_s, snapshot=snapshot, mode=mode)
    summary = plan.summary or ("no change" if not plan.actions else f"{len(plan.actions)} actions")
    logger.info("cycle %d: %s", cycle, summary, extra=fields)


def cycle_logger(
    state: AgentState, logger: logging.Logger | None = None
) -> Callable[[Snapshot, Plan, Sequence[object]], None]:
    """A cycle observer for the runtime: the canonical line of each cycle, read from ``state``."""
    out = logger or logging.getLogger("agent.runtime.loop")

    def observe(snapshot: Snapshot, plan: Plan, _results: Sequence[object]) -> None:
        log_cycle(
            out,
            plan,
            cycle=state.cycles,
            duration_s=state.last_cycle_duration_s,
            snapshot=snapshot,
            mode=state.mode,
        )

    return observe
