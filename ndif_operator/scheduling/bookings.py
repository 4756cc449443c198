"""Calendar events → a `Schedule`: which ModelDeployment is booked when, and what could not be read.

A reference (see `events`) resolves to a ModelDeployment of the governed RayService by its
`namespace/name` first, then by its model repo id when exactly one deployment serves that repo.
Bookings of the same model that touch or overlap (the next starts at most `merge_gap` after the
previous ends) merge into one, so back-to-back events never let the model drop to Warm between
them. Everything is a function of its inputs; `now` decides what is current.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from ndif_operator.scheduling.events import CalendarEvent

MERGE_GAP = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class DeploymentRef:
    """A ModelDeployment as the scheduler sees it."""

    key: str  # namespace/name
    repo_id: str | None = None


@dataclass(frozen=True, slots=True)
class Booking:
    """One model dedicated from `start` to `end` (exclusive); merged from one or more events."""

    key: str
    start: datetime
    end: datetime
    event_ids: tuple[str, ...]
    summary: str = ""

    def covers(self, now: datetime) -> bool:
        return self.start <= now < self.end


class ProblemKind(StrEnum):
    UNKNOWN_MODEL = "UnknownModel"
    AMBIGUOUS_MODEL = "AmbiguousModel"
    UNREADABLE = "Unreadable"
    NOT_PLACED = "DoesNotFit"  # set after planning (overlay.unplaced_bookings)


@dataclass(frozen=True, slots=True)
class ScheduleProblem:
    """An event that books nothing (or a booking the planner could not honour), and why."""

    event_id: str
    summary: str
    kind: ProblemKind
    message: str
    start: datetime
    end: datetime
    key: str | None = None  # the deployment concerned, when one is known


@dataclass(frozen=True, slots=True)
class Schedule:
    """Bookings sorted by (start, key) and the events that could not become bookings."""

    bookings: tuple[Booking, ...] = ()
    problems: tuple[ScheduleProblem, ...] = ()
    _by_key: dict[str, tuple[Booking, ...]] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        grouped: dict[str, list[Booking]] = defaultdict(list)
        for booking in self.bookings:
            grouped[booking.key].append(booking)
        object.__setattr__(self, "_by_key", {k: tuple(v) for k, v in grouped.items()})

    def current(self, key: str, now: datetime) -> Booking | None:
        return next((b for b in self._by_key.get(key, ()) if b.covers(now)), None)

    def active(self, now: datetime) -> dict[str, Booking]:
        """Every model booked at `now`."""
        return {b.key: b for b in self.bookings if b.covers(now)}

    def upcoming(self, key: str, now: datetime, horizon: timedelta) -> tuple[Booking, ...]:
        """The model's bookings that start after `now` and before `now + horizon`."""
        return tuple(b for b in self._by_key.get(key, ()) if now < b.start < now + horizon)

    def next_change(self, now: datetime) -> datetime | None:
        """The first start or end after `now`: when the planner must run again."""
        edges = [t for b in self.bookings for t in (b.start, b.end) if t > now]
        return min(edges, default=None)

    def in_force(self, now: datetime) -> Schedule:
        """The schedule without bookings that are over: what stays in force when the calendar is
        unreachable (a booking already known keeps its model until its end)."""
        return Schedule(tuple(b for b in self.bookings if b.end > now), self.problems)


def _resolve(
    reference: str, by_key: dict[str, DeploymentRef], by_repo: dict[str, list[DeploymentRef]]
) -> tuple[str | None, ProblemKind | None, str]:
    if reference in by_key:
        return reference, None, ""
    matches = by_repo.get(reference, [])
    if len(matches) == 1:
        return matches[0].key, None, ""
    if matches:
        names = ", ".join(sorted(m.key for m in matches))
        return None, ProblemKind.AMBIGUOUS_MODEL, (
            f"{reference} is served by several ModelDeployments ({names}): write namespace/name instead"
        )
    return None, ProblemKind.UNKNOWN_MODEL, (
        f"no ModelDeployment {reference!r} (namespace/name or model repo id) uses this calendar's RayService"
    )


def _merge(key: str, events: Sequence[CalendarEvent], merge_gap: timedelta) -> list[Booking]:
    merged: list[Booking] = []
    for event in sorted(events, key=lambda e: (e.start, e.end, e.event_id)):
        last = merged[-1] if merged else None
        if last is not None and event.start <= last.end + merge_gap:
            merged[-1] = Booking(
                key, last.start, max(last.end, event.end), (*last.event_ids, event.event_id), last.summary
            )
        else:
            merged.append(Booking(key, event.start, event.end, (event.event_id,), event.summary))
    return merged


def build_schedule(
    events: Iterable[CalendarEvent],
    deployments: Iterable[DeploymentRef],
    *,
    merge_gap: timedelta = MERGE_GAP,
) -> Schedule:
    """Resolve every event; merge each model's bookings; collect the events that book nothing."""
    refs = list(deployments)
    by_key = {d.key: d for d in refs}
    by_repo: dict[str, list[DeploymentRef]] = defaultdict(list)
    for d in refs:
        if d.repo_id:
            by_repo[d.repo_id].append(d)
    per_key: dict[str, list[CalendarEvent]] = defaultdict(list)
    problems: list[ScheduleProblem] = []
    for event in events:
        if event.problem is not None or event.reference is None:
            problems.append(ScheduleProblem(
                event.event_id, event.summary, ProblemKind.UNREADABLE, event.detail, event.start, event.end
            ))
            continue
        key, kind, message = _resolve(event.reference, by_key, by_repo)
        if key is None:
            assert kind is not None
            problems.append(ScheduleProblem(event.event_id, event.summary, kind, message, event.start, event.end))
            continue
        per_key[key].append(event)
    bookings = [b for key, evs in per_key.items() for b in _merge(key, evs, merge_gap)]
    bookings.sort(key=lambda b: (b.start, b.key))
    problems.sort(key=lambda p: (p.start, p.event_id))
    return Schedule(tuple(bookings), tuple(problems))
