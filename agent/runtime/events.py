"""Grid events in force: gathered from every source, journaled, settled, and handed to the policy.

Sources are the grid drivers (OpenADR VEN, MQTT curtailment topic: anything with
``events() -> tuple[GridEvent, ...]``) and the journal itself, where ``site-agent curtail``
writes operator overrides. Every cycle :meth:`EventBook.sync` merges them:

* a new event is checked (a window already over is rejected with an audit row and never
  acted on), gets its baseline (the site load measured when it was first seen, for "shed Y kW"
  targets), is journaled, audited, and triggers an immediate control cycle (the fast path);
* an event that ended, or that its source withdrew, is closed in the journal and audited;
* for each event in force, the measured site load is averaged per settlement interval and
  journaled against its target (``site-agent events report`` settles it).

Conflicting events all stay in force; the policy obeys the strictest target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from agent.control.domain import ActiveEvent
from agent.control.limits import CommandLimits, LimitError, check_event
from agent.control.settlement import event_target_w
from agent.journal.store import EventStatus, Store
from drivers.errors import AgentError
from drivers.grid.base import GridEvent, ProgramKind

log = logging.getLogger(__name__)

SETTLEMENT_S = 900.0  # compliance is averaged over 15-minute intervals (ERCOT settlement)


class EventSource(Protocol):
    @property
    def name(self) -> str: ...

    def events(self) -> tuple[GridEvent, ...]: ...


@dataclass(slots=True)
class _Interval:
    start: datetime
    energy_wh: float = 0.0  # measured power integrated over the seconds observed
    seconds: float = 0.0
    last_at: datetime | None = None


class EventBook:
    """Keeps ``events`` (id → ActiveEvent) in step with the sources and the journal."""

    def __init__(
        self,
        sources: list[EventSource],
        store: Store | None,
        events: dict[str, ActiveEvent],
        *,
        on_change: Callable[[], None] = lambda: None,
        count_rejected: Callable[[str, str], None] = lambda _source, _reason: None,
        limits: CommandLimits | None = None,
    ) -> None:
        self.sources = sources
        self.rejected_seen: dict[str, int] = {}  # per source, how many rejections were audited
        self.count_rejected = count_rejected
        self.store = store
        self.events = events  # shared with the coordinator: it builds snapshots from it
        self.on_change = on_change
        self.rejected: set[str] = set()  # ids rejected once, so they are audited once
        # Ids some source has offered in this process. Only those can be withdrawn by a source
        # going quiet about them: an event resumed from the journal after a restart stays in
        # force until its end, even before its source has reconnected and offered it again.
        self.offered_ever: set[str] = set()
        # Operator overrides given to this process (MQTT); also journaled when there is a store.
        self.overrides: dict[str, GridEvent] = {}
        self._intervals: dict[str, _Interval] = {}
        # The limits every channel shares (agent.control.limits); None: no limits (tests).
        self.limits = limits
        self.refused_updates: set[tuple[str, str]] = set()  # audited once each

    def _violation(self, event: GridEvent, now: datetime) -> str | None:
        """Why ``event`` may not be put in force (the shared limits), or None."""
        if self.limits is None:
            return None
        try:
            check_event(event, now, self.limits)
        except LimitError as exc:
            return str(exc)
        return None

    async def quarantine(self, event_id: str, reason: str) -> None:
        """A journaled event that fails the limits: set aside with an audit row, never in force."""
        log.error("journal: event %s quarantined: %s", event_id, reason)
        if self.store is None:
            return
        try:
            await self.store.quarantine_event(event_id, reason)
        except AgentError as exc:
            log.error("cannot quarantine grid event %s: %s", event_id, exc)

    async def sync(self, now: datetime, site_w: float | None) -> None:
        """Merge sources and journal into ``events``; close what ended; journal compliance."""
        offered: dict[str, GridEvent] = {}
        await self._audit_rejections()
        for source in self.sources:
            try:
                for event in source.events():
                    offered[event.event_id] = event
            except AgentError as exc:
                log.warning("grid source %s failed: %s", source.name, exc)
        journal: dict[str, tuple[GridEvent, float]] = {}
        if self.store is not None:
            try:
                for stored in await self.store.active_events():
                    journal[stored.event.event_id] = (stored.event, stored.baseline_w)
            except AgentError as exc:
                log.error("cannot read grid events from the journal: %s", exc)
                journal = {eid: (a.event, a.baseline_w) for eid, a in self.events.items()}

        for eid, event in self.overrides.items():
            if event.end > now:
                offered[eid] = event
        self.offered_ever.update(offered)
        # Operator overrides live only in the journal; source events are journaled on arrival.
        for eid, (event, _baseline) in journal.items():
            if eid not in offered and event.source.startswith("operator"):
                offered[eid] = event
                self.offered_ever.add(eid)

        changed = False
        for eid, event in offered.items():
            if eid in self.events:
                if self.events[eid].event != event:  # a source updated it (target, end)
                    violation = self._violation(event, now)
                    if violation is not None:  # the update is refused; the event stays as it was
                        if (eid, violation) not in self.refused_updates:
                            self.refused_updates.add((eid, violation))
                            self.count_rejected(f"grid:{event.source}", "limits")
                            await self._audit(event, "rejected", f"update refused: {violation}")
                        continue
                    self.events[eid] = ActiveEvent(event, self.events[eid].baseline_w)
                    await self._journal(event, self.events[eid].baseline_w)
                    changed = True
                continue
            if eid in self.rejected:
                continue
            if event.end <= now:
                self.rejected.add(eid)
                await self._audit(event, "rejected", f"window already over (ended {event.end})")
                continue
            violation = self._violation(event, now)
            if violation is not None:
                self.rejected.add(eid)
                self.count_rejected(f"grid:{event.source}", "limits")
                if eid in journal:  # journaled (an override, or an older version's entry)
                    await self.quarantine(eid, violation)
                else:
                    await self._audit(event, "rejected", violation)
                log.warning("grid event %s refused: %s", eid, violation)
                continue
            baseline = journal[eid][1] if eid in journal else (site_w or 0.0)
            self.events[eid] = ActiveEvent(event, baseline)
            if eid not in journal:
                await self._journal(event, baseline)
            await self._audit(event, "accepted", describe(event, baseline))
            log.info("grid event %s in force: %s", eid, describe(event, baseline))
            changed = True

        for eid in list(self.events):
            active = self.events[eid]
            gone = eid not in offered and eid in self.offered_ever
            if active.event.end > now and not gone:
                continue
            del self.events[eid]
            self._intervals.pop(eid, None)
            status = EventStatus.ENDED if active.event.end <= now else EventStatus.CANCELLED
            await self._close(eid, status)
            await self._audit(active.event, str(status), "window over" if not gone else "withdrawn")
            log.info("grid event %s %s", eid, status)
            changed = True

        if site_w is not None:
            await self._compliance(now, site_w)
        if changed:
            self.on_change()

    async def _audit_rejections(self) -> None:
        """Audit what each source rejected (malformed messages, unknown kinds, stale windows)."""
        for source in self.sources:
            rejected = getattr(source, "rejected", None)
            if not isinstance(rejected, list):
                continue
            seen = self.rejected_seen.get(source.name, 0)
            for r in rejected[seen:]:
                reason = str(getattr(r, "reason", r))
                self.count_rejected(f"grid:{source.name}", reason.split(":")[0][:60])
                if self.store is not None:
                    try:
                        await self.store.audit(
                            source=f"grid:{source.name}",
                            action="grid_input",
                            result="rejected",
                            reason=reason,
                            detail={"payload": str(getattr(r, "payload", ""))[:200]},
                        )
                    except AgentError as exc:
                        log.error("cannot audit a rejected grid input: %s", exc)
            self.rejected_seen[source.name] = len(rejected)

    async def add_override(self, event: GridEvent, operator: str, reason: str) -> None:
        """An operator's curtailment: journaled first, then in force from the next sync."""
        if self.store is not None:
            await self.store.upsert_event(event, baseline_w=0.0)
            await self.store.audit(
                source=f"operator:{operator}",
                action="curtail",
                result="accepted",
                reason=f"{event.event_id}: {describe(event, 0.0)}; {reason}",
            )
        self.overrides[event.event_id] = event
        self.on_change()

    async def release_overrides(self, operator: str) -> list[str]:
        """End every operator override in force; returns their ids.

        The journal is written first: an override still journaled as active would be put back
        in force at the next sync, so a failed write raises (and releases nothing) rather than
        report a release that did not happen.
        """
        ids = {eid for eid, a in self.events.items() if a.event.kind is ProgramKind.OVERRIDE}
        ids |= set(self.overrides)
        if self.store is not None:
            journaled = {
                s.event.event_id
                for s in await self.store.active_events()
                if s.event.kind is ProgramKind.OVERRIDE
            }
            ids |= journaled
            for eid in sorted(ids & journaled):
                await self.store.set_event_status(eid, EventStatus.ENDED)
        # Offered (and now withdrawn): the next sync takes them out of force, even one resumed
        # from the journal that no sync has offered yet.
        self.offered_ever.update(ids)
        for eid in sorted(ids):
            self.overrides.pop(eid, None)
            if self.store is not None:
                try:
                    await self.store.audit(
                        source=f"operator:{operator}",
                        action="release",
                        result="accepted",
                        reason=f"{eid} released",
                    )
                except AgentError as exc:  # released all the same: the journal says ended
                    log.error("cannot audit the release of %s: %s", eid, exc)
        if ids:
            self.on_change()
        return sorted(ids)

    async def _compliance(self, now: datetime, site_w: float) -> None:
        for eid, active in self.events.items():
            if not active.event.active_at(now):
                continue
            target_w = event_target_w(active.event, active.baseline_w)
            if target_w is None:
                continue
            epoch = now.timestamp()
            start = datetime.fromtimestamp(epoch - epoch % SETTLEMENT_S, tz=now.tzinfo)
            iv = self._intervals.get(eid)
            if iv is None or iv.start != start:
                iv = self._intervals[eid] = _Interval(start)
            dt = 1.0 if iv.last_at is None else max((now - iv.last_at).total_seconds(), 0.0)
            iv.energy_wh += site_w * dt
            iv.seconds += dt
            iv.last_at = now
            if self.store is None:
                continue
            try:
                await self.store.record_compliance(
                    eid, start, target_w, iv.energy_wh / iv.seconds, interval_s=SETTLEMENT_S
                )
            except (AgentError, KeyError, ValueError) as exc:  # never ends the control cycle
                log.error("cannot journal compliance of %s: %s", eid, exc)

    async def _journal(self, event: GridEvent, baseline_w: float) -> None:
        if self.store is None:
            return
        try:
            await self.store.upsert_event(event, baseline_w=baseline_w)
        except AgentError as exc:
            log.error("cannot journal grid event %s: %s", event.event_id, exc)

    async def _close(self, event_id: str, status: EventStatus) -> None:
        if self.store is None:
            return
        try:
            await self.store.set_event_status(event_id, status)
        except (AgentError, KeyError) as exc:
            log.error("cannot close grid event %s in the journal: %s", event_id, exc)

    async def _audit(self, event: GridEvent, result: str, reason: str) -> None:
        if self.store is None:
            return
        try:
            await self.store.audit(
                source=f"grid:{event.source}",
                action=f"event:{event.kind.value}",
                result=result,
                device_id=None,
                reason=f"{event.event_id} ({event.program}): {reason}",
            )
        except AgentError as exc:
            log.error("cannot audit grid event %s: %s", event.event_id, exc)


def describe(event: GridEvent, baseline_w: float) -> str:
    target = []
    if event.max_site_kw is not None:
        target.append(f"site load at most {event.max_site_kw:,.0f} kW")
    if event.shed_kw is not None:
        target.append(f"shed {event.shed_kw:,.0f} kW below {baseline_w / 1000:,.0f} kW")
    window = f"{event.start:%Y-%m-%d %H:%M:%S} to {event.end:%H:%M:%S} UTC"
    return f"{event.kind.value} {', '.join(target) or 'no target'}, {window}"


def parse_until(text: str, now: datetime) -> datetime:
    """``+30m``, ``+2h``, ``+90s`` or an ISO-8601 time (UTC if no zone)."""
    if len(text) > 64:
        raise ValueError("too long")
    if (
        text.startswith("+")
        and text[-1:] in ("s", "m", "h")
        and text[1:-1].replace(".", "", 1).isdigit()
    ):
        seconds = float(text[1:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]
        try:
            return now + timedelta(seconds=seconds)
        except OverflowError:  # +1e20h: a ValueError like any other bad time
            raise ValueError(f"{text} is past the year 9999") from None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=now.tzinfo)
    return value
