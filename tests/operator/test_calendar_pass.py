"""Calendar bookings through the planner pass: the real Reconciler with a fake Kubernetes client,
the real Google client against the local Calendar fake over HTTP, and the clock as an input."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fake_kube import READS, WRITES, FakeKubeApi
from operator_harness import NAMESPACE, model_deployment, ray_service, size_estimator
from scheduling.fake_calendar import BOOKINGS as CAL
from scheduling.fake_calendar import FakeGoogleCalendar

from ndif_operator.operator.loop import Wake
from ndif_operator.operator.reconciler import Reconciler
from ndif_operator.operator.settings import OperatorSettings
from ndif_operator.planning.activation import Demand

OPERATOR_NS = "ndif-system"
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(metrics_port=0, read_nodes=False, operator_namespace=OPERATOR_NS)


class NoGateway:
    async def demands(self, namespace: str, ray_service: str) -> dict[str, Demand]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def calendar_schedule(google: FakeGoogleCalendar, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "ndif.dev/v1alpha1", "kind": "CalendarSchedule",
            "metadata": {"name": "bookings", "namespace": OPERATOR_NS, "generation": 1},
            "spec": {"calendarId": CAL, "credentialsSecret": {"name": "gcal"}, "namespace": NAMESPACE,
                     "endpoint": google.url, "pollSeconds": 60, **spec}}


def setup(google: FakeGoogleCalendar, *, secret: bool = True,
          status: dict[str, Any] | None = None) -> tuple[FakeKubeApi, Reconciler, Clock]:
    api = FakeKubeApi()
    api.add(ray_service(groups=(("gpu", 1, 1, "80Gi"),)))  # one GPU: big and mid never fit together
    api.add(model_deployment("big", "org/big-70g", level="Warm"))
    api.add(model_deployment("mid", "org/mid-60g", priority=10))
    if secret:
        api.add_secret(OPERATOR_NS, "gcal", {"service-account.json": json.dumps(google.service_account())})
    obj = api.add(calendar_schedule(google))
    if status is not None:
        obj["status"] = status
    return api, *reconciler_for(api)


def reconciler_for(api: FakeKubeApi, clock: Clock | None = None) -> tuple[Reconciler, Clock]:
    clock = clock or Clock()
    reconciler = Reconciler(api, SETTINGS, estimator=size_estimator, clock=clock,  # type: ignore[arg-type]
                            gateway=NoGateway())  # type: ignore[arg-type]
    reconciler.calendars.observe("ADDED", api.calendar_schedules[(OPERATOR_NS, "bookings")])
    return reconciler, clock


def status(api: FakeKubeApi, name: str) -> dict[str, Any]:
    return dict(api.model_deployments[(NAMESPACE, name)].get("status") or {})


def condition(api: FakeKubeApi, name: str, kind: str) -> dict[str, Any] | None:
    return next((c for c in status(api, name).get("conditions", []) if c["type"] == kind), None)


def schedule_status(api: FakeKubeApi) -> dict[str, Any]:
    return dict(api.calendar_schedules[(OPERATOR_NS, "bookings")].get("status") or {})


async def test_a_booking_makes_the_model_dedicated_hot_for_its_time_then_back_to_spec(
    google: FakeGoogleCalendar,
) -> None:
    google.add_event(CAL, "b1", "<p>ml/big</p>", T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    api, reconciler, clock = setup(google)

    outcome = await reconciler.reconcile_once()
    assert not outcome.retry, outcome.errors
    assert status(api, "big")["level"] == "Warm" and status(api, "mid")["level"] == "Hot"
    assert [b["start"] for b in status(api, "big")["schedule"]["upcoming"]] == ["2026-12-07T10:00:00Z"]
    assert condition(api, "big", "Scheduled") is None  # booked later, not yet
    assert outcome.timers[Wake.BOOKING_EDGE] == 3600  # planned again exactly when the booking starts
    assert outcome.timers[Wake.CALENDAR_POLL] == 60
    synced = schedule_status(api)["conditions"][0]
    assert (synced["status"], synced["reason"]) == ("True", "CalendarRead")
    assert [b["model"] for b in schedule_status(api)["bookings"]] == ["ml/big"]

    clock.now = T0 + timedelta(hours=1)
    outcome = await reconciler.reconcile_once()
    big = status(api, "big")
    assert big["level"] == "Hot" and big["schedule"]["bookedUntil"] == "2026-12-07T11:00:00Z"
    assert status(api, "mid")["level"] != "Hot"  # higher priority, but the booking is dedicated
    scheduled = condition(api, "big", "Scheduled")
    assert scheduled is not None and (scheduled["status"], scheduled["reason"]) == ("True", "ScheduledDedicated")
    placed = condition(api, "big", "Placed")
    assert placed is not None and placed["status"] == "True"  # the booking asked for Hot and got it
    assert "ScheduledDedicated" in api.reasons()
    assert api.model_deployments[(NAMESPACE, "big")]["spec"]["level"] == "Warm"  # the spec is never edited
    assert outcome.timers[Wake.BOOKING_EDGE] == 3600

    clock.now = T0 + timedelta(hours=2)
    await reconciler.reconcile_once()
    assert status(api, "big")["level"] == "Warm" and status(api, "mid")["level"] == "Hot"
    ended = condition(api, "big", "Scheduled")
    assert ended is not None and (ended["status"], ended["reason"]) == ("False", "ScheduleEnded")
    assert "ScheduleEnded" in api.reasons()


async def test_back_to_back_bookings_do_not_flap(google: FakeGoogleCalendar) -> None:
    google.add_event(CAL, "b1", "ml/big", T0, T0 + timedelta(hours=1))
    google.add_event(CAL, "b2", "ml/big", T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    api, reconciler, clock = setup(google)
    await reconciler.reconcile_once()
    patches = api.count("patch_serve_config")
    for minutes in (30, 59, 60, 61, 90):
        clock.now = T0 + timedelta(minutes=minutes)
        await reconciler.reconcile_once()
        assert status(api, "big")["level"] == "Hot"
    assert api.count("patch_serve_config") == patches
    assert api.reasons().count("ScheduledDedicated") == 1


async def test_conflicts_are_shown_coloured_and_everything_else_keeps_working(google: FakeGoogleCalendar) -> None:
    google.add_event(CAL, "big", "ml/big", T0, T0 + timedelta(hours=2))
    google.add_event(CAL, "mid", "ml/mid", T0, T0 + timedelta(hours=2))  # both do not fit on one 80 GiB GPU
    google.add_event(CAL, "typo", "ml/bgi", T0, T0 + timedelta(hours=1))
    google.add_event(CAL, "text", "<b>the big one please</b>", T0, T0 + timedelta(hours=1))
    api, reconciler, _ = setup(google)
    outcome = await reconciler.reconcile_once()
    assert not outcome.retry, outcome.errors
    levels = {name: status(api, name)["level"] for name in ("big", "mid")}
    assert sorted(levels.values()) == ["Hot", "Warm"]
    loser = next(name for name, level in levels.items() if level != "Hot")
    conflict = condition(api, loser, "Scheduled")
    assert conflict is not None and (conflict["status"], conflict["reason"]) == ("False", "ScheduleConflict")
    assert "could not be placed Hot" in status(api, loser)["schedule"]["conflict"]
    assert "ScheduleConflict" in api.reasons()
    problems = {p["eventId"]: p["reason"] for p in schedule_status(api)["problems"]}
    assert problems == {"typo": "UnknownModel", "text": "Unreadable", loser: "DoesNotFit"}
    assert {e for _, e, _ in google.patches} == {"typo", "text", loser}
    assert all(body == {"colorId": "11"} for _, _, body in google.patches)
    await reconciler.reconcile_once()
    assert len(google.patches) == 3  # coloured once


async def test_missing_or_refused_credentials_are_a_condition_and_planning_goes_on(
    google: FakeGoogleCalendar,
) -> None:
    google.add_event(CAL, "b1", "ml/big", T0, T0 + timedelta(hours=1))
    api, reconciler, clock = setup(google, secret=False)
    outcome = await reconciler.reconcile_once()
    assert not outcome.retry
    synced = schedule_status(api)["conditions"][0]
    assert (synced["status"], synced["reason"]) == ("False", "CredentialsMissing")
    assert status(api, "mid")["level"] == "Hot" and status(api, "big")["level"] == "Warm"
    assert outcome.timers[Wake.CALENDAR_POLL] == 10  # retried with backoff

    api.add_secret(OPERATOR_NS, "gcal", {"service-account.json": json.dumps(google.service_account(known=False))})
    clock.now += timedelta(seconds=10)
    outcome = await reconciler.reconcile_once()
    assert schedule_status(api)["conditions"][0]["reason"] == "CredentialsInvalid"
    assert outcome.timers[Wake.CALENDAR_POLL] == 20


async def test_a_5xx_storm_and_an_operator_restart_mid_booking_change_nothing(google: FakeGoogleCalendar) -> None:
    google.add_event(CAL, "b1", "ml/big", T0, T0 + timedelta(hours=3))
    api, reconciler, clock = setup(google)
    await reconciler.reconcile_once()
    assert status(api, "big")["level"] == "Hot"
    patches, config = api.count("patch_serve_config"), api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"]

    google.inject("GET", "/events$", 503, times=1000)
    for minutes in (1, 2, 5, 30):
        clock.now = T0 + timedelta(minutes=minutes)
        await reconciler.reconcile_once()
        assert status(api, "big")["level"] == "Hot"
    assert schedule_status(api)["conditions"][0]["reason"] == "CalendarUnavailable"

    # A new operator process starts while Google is still down: the bookings in status hold.
    restarted, _ = reconciler_for(api, clock)
    clock.now = T0 + timedelta(hours=1)
    await restarted.reconcile_once()
    assert status(api, "big")["level"] == "Hot"
    assert api.count("patch_serve_config") == patches
    assert api.ray_services[(NAMESPACE, "ndif")]["spec"]["serveConfigV2"] == config
    # ...until the booking's end, even without a calendar.
    clock.now = T0 + timedelta(hours=3)
    await restarted.reconcile_once()
    assert status(api, "big")["level"] == "Warm"


async def test_calendar_polls_between_passes_read_google_only(google: FakeGoogleCalendar) -> None:
    google.add_event(CAL, "b1", "ml/big", T0 + timedelta(days=1), T0 + timedelta(days=1, hours=1))
    api, reconciler, clock = setup(google)
    await reconciler.reconcile_once()
    await reconciler.reconcile_once()
    reads, writes = api.count(*READS), api.count(*WRITES, "replace_calendar_schedule_status")
    clock.now += timedelta(minutes=1)
    assert await reconciler.calendars.poll(clock.now) is False  # nothing new: no pass needed
    assert api.count(*READS) - reads == 1  # the key Secret, read afresh (it may be rotated)
    assert api.count(*WRITES, "replace_calendar_schedule_status") == writes
    google.add_event(CAL, "b2", "ml/mid", T0 + timedelta(days=2), T0 + timedelta(days=2, hours=1))
    clock.now += timedelta(minutes=1)
    assert await reconciler.calendars.poll(clock.now) is True
