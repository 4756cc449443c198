"""What one ModelDeployment's status says about its calendar bookings. Pure.

`status.schedule` shows the booking in force and the week ahead; the `Scheduled` condition is
True (`ScheduledDedicated`) during a booking the plan honours, False (`ScheduleConflict`) during
one it cannot, and False (`ScheduleEnded`) once the last booking is over. A model that was never
booked carries neither, so calendars add nothing to `kubectl describe` of models they never name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ndif_operator.api import ConditionStatus, Reason
from ndif_operator.api.v1alpha1 import ModelSchedule, ScheduledBooking
from ndif_operator.scheduling.bookings import Booking, Schedule

LOOKAHEAD = timedelta(days=7)
MAX_UPCOMING = 10


@dataclass(frozen=True, slots=True)
class ScheduledState:
    """The `Scheduled` condition's status, reason and message."""

    status: ConditionStatus
    reason: Reason
    message: str


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _shown(booking: Booking, schedule_name: str) -> ScheduledBooking:
    return ScheduledBooking(start=booking.start, end=booking.end, summary=booking.summary[:200],
                            schedule=schedule_name)


def model_schedule(
    key: str,
    schedule: Schedule | None,
    now: datetime,
    *,
    schedule_name: str = "",
    conflict: str = "",
    was_scheduled: bool = False,
    lookahead: timedelta = LOOKAHEAD,
) -> tuple[ModelSchedule | None, ScheduledState | None]:
    """`status.schedule` and the `Scheduled` condition for `key` at `now`.

    `conflict` is why the booking in force could not be honoured (from the plan), `was_scheduled`
    whether the object already carries a `Scheduled` condition (so an ended booking says so).
    """
    current = schedule.current(key, now) if schedule is not None else None
    upcoming = schedule.upcoming(key, now, lookahead)[:MAX_UPCOMING] if schedule is not None else ()
    if current is None and not upcoming and not was_scheduled:
        return None, None
    shown = ModelSchedule(
        booked_until=_rfc3339(current.end) if current is not None else "",
        current=_shown(current, schedule_name) if current is not None else None,
        upcoming=[_shown(b, schedule_name) for b in upcoming],
        conflict=conflict if current is not None else "",
    )
    if current is not None and conflict:
        state = ScheduledState(ConditionStatus.FALSE, Reason.SCHEDULE_CONFLICT, conflict)
    elif current is not None:
        what = f" ({current.summary})" if current.summary else ""
        state = ScheduledState(
            ConditionStatus.TRUE, Reason.SCHEDULED_DEDICATED,
            f"booked on the calendar{what}: dedicated Hot until {_rfc3339(current.end)}",
        )
    elif was_scheduled:
        following = f"; next booking starts {_rfc3339(upcoming[0].start)}" if upcoming else ""
        state = ScheduledState(ConditionStatus.FALSE, Reason.SCHEDULE_ENDED,
                               f"no booking in force: planned from the spec{following}")
    else:
        state = None  # booked later this week, never before: status.schedule shows it, no condition yet
    return shown, state
