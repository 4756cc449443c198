"""The schedule as planner input, and what the plan did with it.

During a booking the model is planned dedicated Hot: placed before any other model and never
evicted. The user's spec is not touched: the overlay changes only the `PlacementRequest` the
planner sees. A booking the planner still cannot place (overlapping bookings that do not fit
together, a model too large for the cluster) is a conflict the admin and the booker must see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from ndif_operator.api import Level
from ndif_operator.planning.types import Decision, PlacementRequest
from ndif_operator.scheduling.bookings import ProblemKind, Schedule, ScheduleProblem


def apply_schedule(
    requests: Sequence[PlacementRequest], schedule: Schedule | None, now: datetime
) -> list[PlacementRequest]:
    """Requests with every model booked at `now` turned into a dedicated Hot request.

    A booked model asked for 0 replicas gets one: a booking means "serve it". Models not booked
    are returned unchanged (the same objects), so a plan without a calendar is the same plan.
    """
    if schedule is None:
        return list(requests)
    active = schedule.active(now)
    out: list[PlacementRequest] = []
    for req in requests:
        if req.key in active:
            req = replace(req, level=Level.HOT, dedicated=True, replicas=max(1, req.replicas))
        out.append(req)
    return out


def unplaced_bookings(
    schedule: Schedule | None, decisions: Mapping[str, Decision], now: datetime
) -> list[ScheduleProblem]:
    """Bookings current at `now` whose model the plan (its decisions by key) did not make Hot, with
    the planner's reason."""
    if schedule is None:
        return []
    problems: list[ScheduleProblem] = []
    for key, booking in sorted(schedule.active(now).items()):
        decision = decisions.get(key)
        if decision is None or decision.level == Level.HOT:
            continue
        problems.append(ScheduleProblem(
            booking.event_ids[0], booking.summary, ProblemKind.NOT_PLACED,
            f"booked dedicated until {booking.end.isoformat()} but could not be placed Hot: {decision.message}",
            booking.start, booking.end, key,
        ))
    return problems
