"""Inputs of the backtest: validated time series from CSV files, and the seeded AI job trace.

:func:`load_series` reads one value column of a time-indexed CSV (real-time prices, day-ahead
prices, system load, hashprice) and validates every row: a missing, empty, NaN, infinite or
unparseable value, or a timestamp that is unparseable, zone-less or not strictly increasing,
raises :class:`drivers.errors.BadInput` naming the file, the line and the column. Nothing is
skipped silently: a backtest over a year with a hole in it would score a different year.

:func:`job_trace` draws a reproducible trace of AI jobs (arrivals, durations, GPU counts and
classes, and deferrable training with its work and deadline) from a seed, and places them on the GPU
nodes with a simple best-fit scheduler that does not depend on the strategy being scored: jobs are
rentals that occupy their GPUs from start to end whatever the policy does (suspending one loses its
revenue and work, it does not extend it). So every strategy faces the same occupancy and the oracle
stays an upper bound. A deferrable job holds its GPUs from its arrival to its deadline, and each
strategy chooses in which of those intervals it runs its work.

:func:`load_events` reads demand-response events (one per row) for the backtest.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from agent.control.planner import deadline_reserve_s
from drivers.errors import BadInput, SourceError
from drivers.grid.base import GridEvent, ProgramKind
from drivers.jobs.base import JobClass


@dataclass(frozen=True, slots=True)
class Series:
    """A validated series: ``times_s`` (epoch seconds, strictly increasing) and ``values``."""

    path: Path
    column: str
    times_s: tuple[float, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.times_s)


def _bad(path: Path, line: int, column: str, message: str) -> BadInput:
    return BadInput(path.name, f"{path}:{line}: column {column!r}: {message}")


def parse_time_s(text: str) -> float:
    """Epoch seconds of an ISO-8601 instant that names its zone (``Z`` or an offset), or of a
    plain date (``2023-01-01``: a UTC day, as daily series such as hashprice are kept)."""
    text = text.strip()
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None and len(text) == 10:
        stamp = stamp.replace(tzinfo=UTC)
    if stamp.tzinfo is None:
        raise ValueError("no time zone (expected e.g. 2023-01-01T06:00:00Z)")
    return stamp.timestamp()


def load_series(path: Path | str, column: str, time_column: str | None = None) -> Series:
    """Load one value column; the time column defaults to the header's first column."""
    p = Path(path)
    try:
        handle = p.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise SourceError(p.name, f"cannot open {p}: {exc.strerror or exc}") from None
    times: list[float] = []
    values: list[float] = []
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise _bad(p, 1, column, "the file is empty (expected a header row)")
        tcol = time_column or header[0]
        for needed in (tcol, column):
            if needed not in header:
                raise _bad(p, 1, needed, f"not in the header (columns: {', '.join(header)})")
        ti, vi = header.index(tcol), header.index(column)
        last = -math.inf
        for line, row in enumerate(reader, start=2):
            if not row:
                continue  # a blank line (e.g. at the end) carries no row
            if len(row) <= max(ti, vi):
                raise _bad(p, line, column, f"row has {len(row)} fields, expected {len(header)}")
            try:
                t = parse_time_s(row[ti])
            except ValueError as exc:
                raise _bad(p, line, tcol, f"bad timestamp {row[ti]!r}: {exc}") from None
            if t <= last:
                raise _bad(p, line, tcol, f"timestamp {row[ti]} is not after the previous row's")
            text = row[vi].strip()
            try:
                v = float(text)
            except ValueError:
                raise _bad(p, line, column, f"expected a number, got {text!r}") from None
            if not math.isfinite(v):
                raise _bad(p, line, column, f"expected a finite number, got {text!r}")
            last = t
            times.append(t)
            values.append(v)
    if not times:
        raise _bad(p, 2, column, "no data rows")
    return Series(p, column, tuple(times), tuple(values))


def sample_at(series: Series, times_s: Sequence[float], *, hold_s: float) -> list[float | None]:
    """For each instant, the value of the last row at or before it if at most ``hold_s`` old."""
    out: list[float | None] = []
    j = 0
    n = len(series.times_s)
    st, sv = series.times_s, series.values
    for t in times_s:  # times ascending: one merge pass instead of a bisect per interval
        while j + 1 < n and st[j + 1] <= t:
            j += 1
        out.append(sv[j] if st[j] <= t and t - st[j] < hold_s else None)
    return out


# --- the AI job trace ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassMix:
    """Arrival rate and duration of one job class in the synthetic trace."""

    arrivals_per_h: float
    mean_duration_h: float


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """Shape of the trace for a 256-GPU pod (rates scale with the site's GPU count): about 45%
    SLA and 30% preemptible GPU-hours, and enough filler to soak up the rest (filler that
    waits too long is dropped)."""

    sla: ClassMix = ClassMix(arrivals_per_h=0.95, mean_duration_h=24.0)
    preemptible: ClassMix = ClassMix(arrivals_per_h=2.0, mean_duration_h=8.0)
    filler: ClassMix = ClassMix(arrivals_per_h=5.0, mean_duration_h=4.0)
    gpus_choices: tuple[int, ...] = (1, 2, 4, 8)
    gpus_weights: tuple[float, ...] = (0.15, 0.2, 0.3, 0.35)
    filler_max_wait_h: float = 6.0
    duration_sigma: float = 0.8  # lognormal spread of durations
    # Deferrable training (preemptible contract): ``mean_duration_h`` is its work; its deadline
    # is ``deferrable_slack`` times that after it arrives. None by default.
    deferrable: ClassMix = ClassMix(arrivals_per_h=0.0, mean_duration_h=8.0)
    deferrable_slack: float = 3.0
    # The site's lowest GPU throughput share (at the minimum cap): every deadline leaves at
    # least the policy's reserve (agent.control.planner.deadline_reserve_s), so that a job is
    # never given a deadline the agent could not promise to keep whatever the prices.
    deferrable_min_fraction: float = 1.0
    deferrable_gpus: int = 0  # GPUs per deferrable job; 0: drawn from gpus_choices


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of the trace, placed: it occupies ``gpus`` on node ``node`` over [start, end).

    A deferrable job (``work_i`` > 0) holds its GPUs over the same window but needs to run only
    ``work_i`` intervals of it: ``end_i`` is its deadline, and each strategy picks when."""

    job_id: str
    job_class: JobClass
    gpus: int
    node: int  # index into the expanded GPU node list
    start_i: int  # first interval it occupies
    end_i: int  # first interval it no longer occupies (a deferrable job's deadline)
    work_i: int = 0  # deferrable: intervals of running it needs before end_i; 0: not deferrable

    @property
    def deferrable(self) -> bool:
        return self.work_i > 0


def job_trace(
    seed: int,
    n_intervals: int,
    interval_s: float,
    node_gpus: Sequence[int],
    spec: TraceSpec = TraceSpec(),
) -> list[TraceJob]:
    """Draw arrivals per class, then place them interval by interval (SLA first, then
    preemptible, then filler; FIFO within a class; best fit on nodes)."""
    dt_h = interval_s / 3600.0
    # The spec's rates are for a 256-GPU pod; scale them to this site's GPUs.
    scale = sum(node_gpus) / 256.0
    horizon_h = n_intervals * dt_h
    # (t_h, prio, class, gpus, intervals of work, and for deferrable work its window and the
    # least of it that keeps the reserve, in intervals; 0 for the other classes)
    arrivals: list[tuple[float, int, JobClass, int, int, int, int]] = []
    mixes = (
        (JobClass.SLA, spec.sla, "sla"),
        (JobClass.PREEMPTIBLE, spec.preemptible, "preemptible"),
        (JobClass.PREEMPTIBLE, spec.deferrable, "deferrable"),
        (JobClass.FILLER, spec.filler, "filler"),
    )
    max_gpus = max(node_gpus, default=0)
    for prio, (cls, mix, stream) in enumerate(mixes):
        # One stream per class, so a shorter period gets a prefix of a longer one's trace.
        rng = random.Random(f"site-agent-trace:{seed}:{stream}")
        rate_per_h = mix.arrivals_per_h * scale
        if rate_per_h <= 0:
            continue
        t = 0.0
        mu = math.log(mix.mean_duration_h) - spec.duration_sigma**2 / 2
        while True:
            t += rng.expovariate(rate_per_h)
            if t >= horizon_h:
                break
            gpus = rng.choices(spec.gpus_choices, spec.gpus_weights)[0]
            if stream == "deferrable" and spec.deferrable_gpus:
                gpus = spec.deferrable_gpus
            hours = rng.lognormvariate(mu, spec.duration_sigma)
            if gpus <= max_gpus:
                length = max(1, round(hours / dt_h))
                window = lead = 0
                if stream == "deferrable":
                    reserve_s = deadline_reserve_s(
                        gpus * length * dt_h, gpus, spec.deferrable_min_fraction
                    )
                    lead = length + math.ceil(reserve_s / interval_s)
                    window = max(math.ceil(length * spec.deferrable_slack), lead)
                arrivals.append((t, prio, cls, gpus, length, window, lead))
    arrivals.sort(key=lambda a: (a[0], a[1]))

    free = list(node_gpus)
    ending: dict[int, list[tuple[int, int]]] = {}  # interval -> [(node, gpus)]
    # (arrival_i, class, gpus, length, window, lead), one queue per priority
    queues: list[list[tuple[int, JobClass, int, int, int, int]]] = [[] for _ in mixes]
    filler = len(mixes) - 1
    placed: list[TraceJob] = []
    k = 0
    max_wait_i = spec.filler_max_wait_h / dt_h
    for i in range(n_intervals):
        for node, gpus in ending.pop(i, []):
            free[node] += gpus
        while k < len(arrivals) and arrivals[k][0] < (i + 1) * dt_h:
            _, prio, cls, gpus, length, window, lead = arrivals[k]
            queues[prio].append((i, cls, gpus, length, window, lead))
            k += 1
        most_free = max(free, default=0)
        for prio, queue in enumerate(queues):
            waiting: list[tuple[int, JobClass, int, int, int, int]] = []
            for arrived_i, cls, gpus, length, window, lead in queue:
                if window and i + lead > arrived_i + window:
                    continue  # deferrable, its deadline no longer keeps the reserve: dropped
                fits = [n for n, f in enumerate(free) if f >= gpus] if gpus <= most_free else []
                if not fits:
                    if prio < filler or i - arrived_i < max_wait_i:
                        waiting.append((arrived_i, cls, gpus, length, window, lead))
                    continue
                node = min(fits, key=lambda n: (free[n], n))
                free[node] -= gpus
                most_free = max(free)
                # A deferrable job holds its GPUs until its deadline, running or not.
                end = arrived_i + window if window else i + length
                ending.setdefault(end, []).append((node, gpus))
                placed.append(
                    TraceJob(
                        f"job-{len(placed) + 1:06d}",
                        cls,
                        gpus,
                        node,
                        i,
                        min(end, n_intervals),
                        length if window else 0,
                    )
                )
            queue[:] = waiting
    # A deferrable job cut by the end of the period keeps only the work that fits in it.
    return [
        replace(j, work_i=min(j.work_i, j.end_i - j.start_i)) if j.work_i else j for j in placed
    ]


# --- grid events ---------------------------------------------------------------------------

EVENT_COLUMNS = (
    "event_id",
    "program",
    "kind",
    "start_utc",
    "end_utc",
    "max_site_kw",
    "shed_kw",
    "payment_usd_per_mwh",
    "penalty_usd_per_mwh",
)


def load_events(path: Path | str) -> tuple[GridEvent, ...]:
    """Demand-response events from a CSV with the header :data:`EVENT_COLUMNS` (``max_site_kw``
    or ``shed_kw`` may be empty, not both). Every problem names the file, line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(p.name, f"cannot open {p}: {exc.strerror or exc}") from None
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in EVENT_COLUMNS if c not in header]
    if missing:
        raise _bad(p, 1, missing[0], f"not in the header (expected {', '.join(EVENT_COLUMNS)})")
    events: list[GridEvent] = []
    ids: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise _bad(p, line, header[-1], f"row has {len(row)} fields, expected {len(header)}")
        cell = {h: v.strip() for h, v in zip(header, row, strict=True)}

        eid = cell["event_id"]
        if not eid or eid in ids:
            raise _bad(p, line, "event_id", f"expected a unique, non-empty id, got {eid!r}")
        ids.add(eid)
        try:
            kind = ProgramKind(cell["kind"])
        except ValueError:
            known = ", ".join(k.value for k in ProgramKind)
            raise _bad(p, line, "kind", f"expected one of {known}, got {cell['kind']!r}") from None
        start = _event_instant(p, line, "start_utc", cell["start_utc"])
        end = _event_instant(p, line, "end_utc", cell["end_utc"])
        if end <= start:
            raise _bad(p, line, "end_utc", f"the event ends ({end}) before it starts ({start})")
        max_kw = _event_number(p, line, "max_site_kw", cell["max_site_kw"], True)
        shed_kw = _event_number(p, line, "shed_kw", cell["shed_kw"], True)
        if max_kw is None and shed_kw is None:
            raise _bad(p, line, "max_site_kw", "give max_site_kw or shed_kw")
        events.append(
            GridEvent(
                event_id=eid,
                source=p.name,
                program=cell["program"],
                kind=kind,
                start=start,
                end=end,
                max_site_kw=max_kw,
                shed_kw=shed_kw,
                payment_usd_per_mwh=_event_number(
                    p, line, "payment_usd_per_mwh", cell["payment_usd_per_mwh"], True
                )
                or 0.0,
                penalty_usd_per_mwh=_event_number(
                    p, line, "penalty_usd_per_mwh", cell["penalty_usd_per_mwh"], True
                )
                or 0.0,
            )
        )
    return tuple(events)


def _event_number(p: Path, line: int, col: str, raw: str, optional: bool) -> float | None:
    if raw == "" and optional:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise _bad(p, line, col, f"expected a number, got {raw!r}") from None
    if not math.isfinite(v) or v < 0:
        raise _bad(p, line, col, f"expected a finite number ≥ 0, got {raw!r}")
    return v


def _event_instant(p: Path, line: int, col: str, raw: str) -> datetime:
    try:
        return datetime.fromtimestamp(parse_time_s(raw), tz=UTC)
    except ValueError as exc:
        raise _bad(p, line, col, f"bad timestamp {raw!r}: {exc}") from None
