"""Read each CalendarSchedule's calendar on its own clock, keep the last known schedule in force.

The planner pass of a RayService calls `CalendarSync.refresh` for the schedules that govern it;
a calendar is read only when its poll (or, after a failure, its backoff) is due. A failed read
keeps the bookings already known until their events end, and the schedule's `Synced` condition
says what failed; a restarted operator starts from the bookings in the object's status, so a
booking in progress does not flap. Google's blocking client runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from ndif_operator.api import ConditionStatus
from ndif_operator.api.calendar import (
    BookingStatus,
    CalendarScheduleSpec,
    CalendarScheduleStatus,
    ScheduleProblemStatus,
    SyncReason,
)
from ndif_operator.api.v1alpha1 import Condition
from ndif_operator.operator.calendar_client import CalendarClient, CalendarError, EventPage, credentials_from_json
from ndif_operator.scheduling import (
    CalendarEvent,
    DeploymentRef,
    Schedule,
    ScheduleProblem,
    build_schedule,
    parse_event,
)
from ndif_operator.scheduling.bookings import Booking

log = logging.getLogger(__name__)

SYNCED = "Synced"
MAX_RETRY = timedelta(minutes=15)
MAX_SHOWN = 200  # bookings/problems kept in the object's status (a week of a busy calendar)


class EventCalendar(Protocol):
    def list_events(self, calendar_id: str, time_min: datetime, time_max: datetime) -> EventPage: ...
    def set_color(self, calendar_id: str, event_id: str, color_id: str) -> None: ...


ClientFactory = Callable[[bytes, str | None], EventCalendar]
SecretReader = Callable[[str, str, str], Awaitable[bytes | None]]  # namespace, name, key → value


def google_client(key_json: bytes, endpoint: str | None) -> EventCalendar:
    return CalendarClient(credentials_from_json(key_json), endpoint=endpoint)


def retry_delay(failures: int, poll_seconds: int) -> timedelta:
    """Exponential from 10 s, capped at the larger of the poll interval and 15 minutes."""
    cap = max(timedelta(seconds=poll_seconds), MAX_RETRY)
    return min(timedelta(seconds=10 * 2 ** max(0, failures - 1)), cap)


@dataclass(frozen=True, slots=True)
class CalendarState:
    """What the operator knows of one CalendarSchedule."""

    key: str  # namespace/name of the CalendarSchedule
    spec: CalendarScheduleSpec
    generation: int = 0
    schedule: Schedule = field(default_factory=Schedule)
    # The events of the last successful read, resolved again against the ModelDeployments of each
    # pass (a model created after the read is bookable at once); None until a read succeeds, when
    # `schedule` holds the bookings a previous process wrote to status.
    events: tuple[CalendarEvent, ...] | None = None
    reason: SyncReason | None = None  # None: never read in this process
    message: str = "waiting for the first read of the calendar"
    last_sync: datetime | None = None
    failures: int = 0
    next_attempt: datetime | None = None  # None: now
    marked: frozenset[str] = frozenset()  # events already coloured as conflicts

    @property
    def namespace(self) -> str:
        return self.key.split("/", 1)[0]

    def resolved(self, deployments: Iterable[DeploymentRef], now: datetime) -> CalendarState:
        """The schedule resolved against `deployments` (known bookings only, while never read)."""
        if self.events is None:
            return replace(self, schedule=self.schedule.in_force(now))
        return replace(self, schedule=build_schedule(self.events, deployments))


def schedule_from_status(status: Mapping[str, Any] | None) -> Schedule:
    """The bookings a previous operator process wrote to status: in force until they end."""
    parsed = CalendarScheduleStatus.model_validate(dict(status or {}))
    bookings = tuple(
        Booking(b.model, b.start, b.end, tuple(b.event_ids), b.summary) for b in parsed.bookings
    )
    return Schedule(tuple(sorted(bookings, key=lambda b: (b.start, b.key))))


def state_from_object(obj: Mapping[str, Any], previous: CalendarState | None) -> CalendarState:
    """A CalendarSchedule (as watched) → its state, keeping what this process already learned."""
    meta = obj.get("metadata") or {}
    key = f"{meta.get('namespace')}/{meta.get('name')}"
    spec = CalendarScheduleSpec.model_validate(obj.get("spec") or {})
    generation = int(meta.get("generation") or 0)
    if previous is None:
        status = obj.get("status") or {}
        last = status.get("lastSyncTime")
        return CalendarState(key, spec, generation, schedule_from_status(status),
                             last_sync=datetime.fromisoformat(last) if last else None)
    if previous.generation != generation:
        return replace(previous, spec=spec, generation=generation, next_attempt=None, failures=0)
    return previous


async def refresh(
    state: CalendarState,
    now: datetime,
    deployments: Iterable[DeploymentRef],
    *,
    read_secret: SecretReader,
    client_factory: ClientFactory = google_client,
) -> CalendarState:
    """Read the calendar when due; on failure keep the bookings in force and back off."""
    if state.next_attempt is not None and now < state.next_attempt:
        return state
    spec = state.spec
    try:
        raw = await read_secret(state.namespace, spec.credentials_secret.name, spec.credentials_secret.key)
        if raw is None:
            raise CalendarError(
                SyncReason.CREDENTIALS_MISSING,
                f"Secret {state.namespace}/{spec.credentials_secret.name} has no key "
                f"{spec.credentials_secret.key!r} (or does not exist)",
            )
        client = client_factory(raw, spec.endpoint)
        window_end = now + timedelta(days=spec.lookahead_days)
        page = await asyncio.to_thread(client.list_events, spec.calendar_id, now, window_end)
    except CalendarError as exc:
        failures = state.failures + 1
        delay = retry_delay(failures, spec.poll_seconds)
        if state.reason != exc.reason:
            log.warning("calendar %s: %s (%s); retrying in %ds, bookings known so far stay in force",
                        state.key, exc, exc.reason.value, delay.total_seconds())
        # The bookings already known stay in force until their events end.
        kept = None if state.events is None else tuple(e for e in state.events if e.end > now)
        return replace(state, schedule=state.schedule.in_force(now), events=kept,
                       reason=exc.reason, message=str(exc), failures=failures, next_attempt=now + delay)
    events = tuple(e for e in (parse_event(item, page.time_zone) for item in page.items) if e is not None)
    schedule = build_schedule(events, deployments)
    if state.reason != SyncReason.CALENDAR_READ:
        log.info("calendar %s: read %d events, %d bookings", state.key, len(events), len(schedule.bookings))
    return replace(state, schedule=schedule, events=events, reason=SyncReason.CALENDAR_READ,
                   message=f"{len(schedule.bookings)} bookings, {len(schedule.problems)} events not honoured",
                   last_sync=now, failures=0, next_attempt=now + timedelta(seconds=spec.poll_seconds))


async def mark_conflicts(
    state: CalendarState,
    problems: Iterable[ScheduleProblem],
    *,
    read_secret: SecretReader,
    client_factory: ClientFactory = google_client,
) -> CalendarState:
    """Colour each event that cannot be honoured, once. Failures are retried on a later pass."""
    todo = sorted({p.event_id for p in problems if p.event_id} - state.marked)
    if not todo or not state.spec.mark_conflicts or state.reason != SyncReason.CALENDAR_READ:
        return state
    spec = state.spec
    raw = await read_secret(state.namespace, spec.credentials_secret.name, spec.credentials_secret.key)
    if raw is None:
        return state
    marked = set(state.marked)
    try:
        client = client_factory(raw, spec.endpoint)
        for event_id in todo:
            await asyncio.to_thread(client.set_color, spec.calendar_id, event_id, spec.conflict_color_id)
            marked.add(event_id)
    except CalendarError as exc:
        log.warning("calendar %s: could not mark conflicting events: %s", state.key, exc)
    return replace(state, marked=frozenset(marked))


def schedule_status(state: CalendarState, problems: Iterable[ScheduleProblem], old: Mapping[str, Any] | None,
                    now: datetime) -> dict[str, Any]:
    """The CalendarSchedule's whole status (wire form)."""
    old_conditions = {str(c.get("type")): c for c in (old or {}).get("conditions") or []}
    if state.reason is None:
        status, reason = ConditionStatus.UNKNOWN, "Pending"
    else:
        status = ConditionStatus.TRUE if state.reason == SyncReason.CALENDAR_READ else ConditionStatus.FALSE
        reason = state.reason.value
    previous = old_conditions.get(SYNCED)
    since = now
    if previous is not None and previous.get("status") == status.value and previous.get("lastTransitionTime"):
        since = datetime.fromisoformat(str(previous["lastTransitionTime"]))
    condition = Condition(type=SYNCED, status=status, reason=reason, message=state.message[:1024],
                          last_transition_time=since, observed_generation=state.generation)
    horizon = now + timedelta(days=state.spec.lookahead_days)
    bookings = [
        BookingStatus(model=b.key, start=b.start, end=b.end, summary=b.summary[:200], event_ids=list(b.event_ids))
        for b in state.schedule.bookings if b.end > now and b.start < horizon
    ][:MAX_SHOWN]
    shown_problems = [
        ScheduleProblemStatus(event_id=p.event_id, summary=p.summary[:200], reason=p.kind.value,
                              message=p.message[:512], start=p.start, end=p.end, model=p.key)
        for p in problems if p.end > now
    ][:MAX_SHOWN]
    problem_note = f"; {len(shown_problems)} events not honoured" if shown_problems else ""
    body = CalendarScheduleStatus(
        observed_generation=state.generation, conditions=[condition], last_sync_time=state.last_sync,
        bookings=bookings, problems=shown_problems,
        message=(state.message if status != ConditionStatus.TRUE else f"{len(bookings)} bookings{problem_note}"),
    )
    result: dict[str, Any] = body.model_dump(mode="json", by_alias=True, exclude_none=True)
    return result
