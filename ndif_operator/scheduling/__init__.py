"""Calendar scheduling, pure: Google Calendar events → bookings → the planner's dedicated set.

An event on the shared calendar means "this model is dedicated (Hot, never evicted) during this
time". `events` reads the Calendar v3 JSON of one event, `bookings` resolves what it names against
the ModelDeployments and builds a `Schedule` for a moment `now`, and `model_status` says what a
ModelDeployment's status shows of it. The planner takes the schedule as one more input
(`ndif_operator.planning.schedule`). No I/O, no clock: every function takes `now`, so the tests
give times as inputs.
"""

from ndif_operator.scheduling.bookings import (
    Booking,
    DeploymentRef,
    Schedule,
    ScheduleProblem,
    build_schedule,
)
from ndif_operator.scheduling.events import CalendarEvent, EventProblem, parse_event

__all__ = [
    "Booking",
    "CalendarEvent",
    "DeploymentRef",
    "EventProblem",
    "Schedule",
    "ScheduleProblem",
    "build_schedule",
    "parse_event",
]
