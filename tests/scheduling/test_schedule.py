"""The calendar → schedule → plan path, pure, with times as inputs (no clock, no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ndif_operator.api import Level
from ndif_operator.planning import plan
from ndif_operator.planning.schedule import apply_schedule, unplaced_bookings
from ndif_operator.planning.types import Inventory, PlacementRequest, WorkerGroup
from ndif_operator.scheduling import DeploymentRef, build_schedule, parse_event
from ndif_operator.scheduling.bookings import ProblemKind
from ndif_operator.scheduling.events import EventProblem, clean_description

GIB = 1024**3
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
DEPLOYMENTS = [
    DeploymentRef("ndif/llama-70b", "meta-llama/Llama-3.1-70B"),
    DeploymentRef("ndif/llama-8b", "meta-llama/Llama-3.1-8B"),
    DeploymentRef("ndif/gpt2", "openai-community/gpt2"),
    DeploymentRef("lab/gpt2", "openai-community/gpt2"),
]


def event(eid: str, description: str, start: datetime, end: datetime, **extra: object) -> dict[str, object]:
    return {
        "id": eid, "status": "confirmed", "summary": f"booking {eid}", "description": description,
        "start": {"dateTime": start.isoformat()}, "end": {"dateTime": end.isoformat()}, **extra,
    }


def schedule_of(*items: dict[str, object], zone: str | None = None):  # type: ignore[no-untyped-def]
    events = [e for e in (parse_event(i, zone) for i in items) if e is not None]
    return build_schedule(events, DEPLOYMENTS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ndif/llama-70b", "ndif/llama-70b"),
        ("  <p>ndif/llama-70b</p>\n", "ndif/llama-70b"),
        ("<b>model:</b>&nbsp;meta-llama/Llama-3.1-70B<br>for the probing group", "meta-llama/Llama-3.1-70B"),
        ("&quot;ndif/gpt2&quot;", "ndif/gpt2"),
        ("<div><br></div><div>ndif/llama-8b</div><div>thanks!</div>", "ndif/llama-8b"),
        ("<html-blob><span style='x'>Model: ndif/gpt2 </span>", "ndif/gpt2"),
        ("", ""),
    ],
)
def test_descriptions_tolerate_calendar_html(raw: str, expected: str) -> None:
    assert clean_description(raw) == expected


def test_reference_by_key_repo_id_or_extended_property() -> None:
    s = schedule_of(
        event("a", "ndif/llama-70b", T0, T0 + timedelta(hours=2)),
        event("b", "meta-llama/Llama-3.1-8B", T0, T0 + timedelta(hours=1)),
        event("c", "ignored text", T0, T0 + timedelta(hours=1),
              extendedProperties={"shared": {"ndifModel": "lab/gpt2"}}),
    )
    assert set(s.active(T0)) == {"ndif/llama-70b", "ndif/llama-8b", "lab/gpt2"}
    assert s.problems == ()


def test_unknown_ambiguous_and_unreadable_events_are_problems_not_bookings() -> None:
    s = schedule_of(
        event("u", "ndif/mixtral", T0, T0 + timedelta(hours=1)),
        event("amb", "openai-community/gpt2", T0, T0 + timedelta(hours=1)),
        event("txt", "please give us the big llama", T0, T0 + timedelta(hours=1)),
        event("empty", "<p> </p>", T0, T0 + timedelta(hours=1)),
        {"id": "times", "description": "ndif/gpt2", "start": {"dateTime": "soon"}, "end": {}},
    )
    assert s.bookings == ()
    kinds = {p.event_id: p.kind for p in s.problems}
    assert kinds == {
        "u": ProblemKind.UNKNOWN_MODEL, "amb": ProblemKind.AMBIGUOUS_MODEL, "txt": ProblemKind.UNREADABLE,
        "empty": ProblemKind.UNREADABLE, "times": ProblemKind.UNREADABLE,
    }
    amb = next(p for p in s.problems if p.event_id == "amb")
    assert "lab/gpt2" in amb.message and "ndif/gpt2" in amb.message


def test_booking_starts_and_ends_exactly_at_its_times() -> None:
    s = schedule_of(event("a", "ndif/llama-70b", T0, T0 + timedelta(hours=2)))
    assert s.current("ndif/llama-70b", T0 - timedelta(seconds=1)) is None
    assert s.current("ndif/llama-70b", T0) is not None
    assert s.current("ndif/llama-70b", T0 + timedelta(hours=2) - timedelta(microseconds=1)) is not None
    assert s.current("ndif/llama-70b", T0 + timedelta(hours=2)) is None
    assert s.next_change(T0 - timedelta(minutes=5)) == T0
    assert s.next_change(T0) == T0 + timedelta(hours=2)
    assert s.next_change(T0 + timedelta(hours=3)) is None


def test_back_to_back_and_overlapping_events_of_one_model_merge() -> None:
    s = schedule_of(
        event("a", "ndif/llama-70b", T0, T0 + timedelta(hours=1)),
        event("b", "ndif/llama-70b", T0 + timedelta(hours=1), T0 + timedelta(hours=2)),
        event("c", "ndif/llama-70b", T0 + timedelta(hours=2, seconds=30), T0 + timedelta(hours=3)),
        event("d", "ndif/llama-70b", T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=2, minutes=45)),
        event("e", "ndif/llama-70b", T0 + timedelta(hours=5), T0 + timedelta(hours=6)),
    )
    assert [(b.start, b.end, b.event_ids) for b in s.bookings] == [
        (T0, T0 + timedelta(hours=3), ("a", "b", "c", "d")),
        (T0 + timedelta(hours=5), T0 + timedelta(hours=6), ("e",)),
    ]
    # No instant between the merged events where the model is not booked: no flap to Warm.
    for minutes in range(0, 180, 5):
        assert s.current("ndif/llama-70b", T0 + timedelta(minutes=minutes)) is not None


def test_all_day_events_use_the_calendar_time_zone_and_exclusive_end() -> None:
    item = {"id": "day", "description": "ndif/llama-8b", "start": {"date": "2026-12-08"}, "end": {"date": "2026-12-09"}}
    s = schedule_of(item, zone="America/New_York")
    (booking,) = s.bookings
    assert booking.start == datetime(2026, 12, 8, 5, 0, tzinfo=UTC)  # midnight EST
    assert booking.end == datetime(2026, 12, 9, 5, 0, tzinfo=UTC)


def test_time_zones_on_timed_events() -> None:
    item = {
        "id": "tz", "description": "ndif/gpt2",
        "start": {"dateTime": "2026-12-07T13:00:00+01:00"},
        "end": {"dateTime": "2026-12-07T14:00:00", "timeZone": "Europe/Berlin"},
    }
    (booking,) = schedule_of(item).bookings
    assert booking.start == datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert booking.end == datetime(2026, 12, 7, 13, tzinfo=UTC)


def test_cancelled_instances_book_nothing() -> None:
    s = schedule_of(event("x", "ndif/gpt2", T0, T0 + timedelta(hours=1), status="cancelled"))
    assert s.bookings == () and s.problems == ()


def test_upcoming_is_the_week_ahead() -> None:
    s = schedule_of(
        event("a", "ndif/gpt2", T0 + timedelta(days=1), T0 + timedelta(days=1, hours=1)),
        event("b", "ndif/gpt2", T0 + timedelta(days=8), T0 + timedelta(days=8, hours=1)),
    )
    assert [b.event_ids for b in s.upcoming("ndif/gpt2", T0, timedelta(days=7))] == [("a",)]


def test_in_force_keeps_only_bookings_not_over() -> None:
    s = schedule_of(
        event("a", "ndif/gpt2", T0, T0 + timedelta(hours=1)),
        event("b", "ndif/llama-8b", T0, T0 + timedelta(hours=3)),
    )
    assert [b.key for b in s.in_force(T0 + timedelta(hours=2)).bookings] == ["ndif/llama-8b"]


# --- the overlay on the real planner --------------------------------------------------------------

INVENTORY = Inventory(
    (WorkerGroup("gpu", pods=1, gpus_per_pod=2, gpu_memory_bytes=80 * GIB, cpu_memory_bytes=1024 * GIB),)
)


def requests() -> list[PlacementRequest]:
    return [
        PlacementRequest("ndif/llama-70b", 150 * GIB, 140 * GIB, level=Level.WARM, tensor_parallel_size="auto"),
        PlacementRequest("ndif/llama-8b", 60 * GIB, 16 * GIB, priority=10),
        PlacementRequest("ndif/gpt2", 2 * GIB, 1 * GIB, level=Level.COLD, replicas=0),
    ]


def test_booked_model_is_dedicated_hot_and_evicts_others_then_returns_to_spec() -> None:
    s = schedule_of(event("a", "ndif/llama-70b", T0, T0 + timedelta(hours=2)))
    before = plan(INVENTORY, apply_schedule(requests(), s, T0 - timedelta(minutes=1)), now=T0)
    assert before.decision("ndif/llama-70b").level == Level.WARM
    assert before.decision("ndif/llama-8b").level == Level.HOT

    during = plan(INVENTORY, requests(), now=T0, schedule=s)
    assert during.decision("ndif/llama-70b").level == Level.HOT
    assert during.decision("ndif/llama-8b").level != Level.HOT  # higher priority, still evicted
    assert unplaced_bookings(s, during.by_key, T0) == []

    after = plan(INVENTORY, apply_schedule(requests(), s, T0 + timedelta(hours=2)), now=T0 + timedelta(hours=2))
    assert after.decision("ndif/llama-70b").level == Level.WARM


def test_overlay_does_not_touch_unbooked_requests() -> None:
    reqs = requests()
    s = schedule_of(event("a", "ndif/gpt2", T0, T0 + timedelta(hours=1)))
    out = apply_schedule(reqs, s, T0)
    assert out[0] is reqs[0] and out[1] is reqs[1]
    assert (out[2].level, out[2].dedicated, out[2].replicas) == (Level.HOT, True, 1)
    assert apply_schedule(reqs, None, T0) == reqs


def test_overlapping_bookings_that_do_not_fit_are_conflicts() -> None:
    s = schedule_of(
        event("a", "ndif/llama-70b", T0, T0 + timedelta(hours=2)),
        event("b", "ndif/llama-8b", T0 + timedelta(hours=1), T0 + timedelta(hours=3)),
    )
    now = T0 + timedelta(hours=1, minutes=30)
    p = plan(INVENTORY, requests(), now=now, schedule=s)
    hot = {d.key for d in p.decisions if d.level == Level.HOT}
    conflicts = unplaced_bookings(s, p.by_key, now)
    assert len(hot & {"ndif/llama-70b", "ndif/llama-8b"}) == 1
    assert [c.kind for c in conflicts] == [ProblemKind.NOT_PLACED]
    assert conflicts[0].key in {"ndif/llama-70b", "ndif/llama-8b"} - hot
    assert "could not be placed Hot" in conflicts[0].message


def test_event_problem_vocabulary_is_camel_case() -> None:
    for problem in (*EventProblem, *ProblemKind):
        assert problem.value[0].isupper() and " " not in problem.value


# --- what a ModelDeployment's status says ------------------------------------------------------

def test_model_status_during_after_and_before_bookings() -> None:
    from ndif_operator.api import ConditionStatus, Reason
    from ndif_operator.scheduling.model_status import model_schedule

    s = schedule_of(
        event("a", "ndif/gpt2", T0, T0 + timedelta(hours=1)),
        event("b", "ndif/gpt2", T0 + timedelta(days=1), T0 + timedelta(days=1, hours=1)),
    )
    before, state = model_schedule("ndif/gpt2", s, T0 - timedelta(hours=1), schedule_name="ndif/cal")
    assert state is None and before is not None and before.booked_until == ""
    assert [b.start for b in before.upcoming] == [T0, T0 + timedelta(days=1)]

    during, state = model_schedule("ndif/gpt2", s, T0, schedule_name="ndif/cal")
    assert during is not None and during.booked_until == "2026-12-07T10:00:00Z"
    assert state is not None and (state.status, state.reason) == (ConditionStatus.TRUE, Reason.SCHEDULED_DEDICATED)

    _, state = model_schedule("ndif/gpt2", s, T0, conflict="does not fit")
    assert state is not None and (state.status, state.reason) == (ConditionStatus.FALSE, Reason.SCHEDULE_CONFLICT)

    after, state = model_schedule("ndif/gpt2", s, T0 + timedelta(hours=2), was_scheduled=True)
    assert after is not None and after.current is None
    assert state is not None and state.reason == Reason.SCHEDULE_ENDED
    assert "next booking starts 2026-12-08T09:00:00Z" in state.message

    assert model_schedule("ndif/llama-8b", s, T0) == (None, None)
    none_left, state = model_schedule("ndif/llama-8b", None, T0, was_scheduled=True)
    assert state is not None and state.reason == Reason.SCHEDULE_ENDED and none_left is not None
