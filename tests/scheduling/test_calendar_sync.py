"""Reading a CalendarSchedule's calendar: due times, outages, backoff, restarts, marking conflicts.

Real client, local Calendar fake over HTTP; times are inputs (no sleeping).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from ndif_operator.api.calendar import SyncReason
from ndif_operator.operator.calendar_sync import (
    mark_conflicts,
    refresh,
    retry_delay,
    schedule_status,
    state_from_object,
)
from ndif_operator.scheduling import DeploymentRef
from scheduling.fake_calendar import FakeGoogleCalendar

CAL = "research@group.calendar.google.com"
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
DEPLOYMENTS = [DeploymentRef("ndif/llama-70b", "meta-llama/Llama-3.1-70B"), DeploymentRef("ndif/gpt2")]


def schedule_object(google: FakeGoogleCalendar, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "ndif.dev/v1alpha1", "kind": "CalendarSchedule",
        "metadata": {"namespace": "ndif", "name": "bookings", "generation": 1},
        "spec": {"calendarId": CAL, "credentialsSecret": {"name": "gcal"}, "endpoint": google.url,
                 "pollSeconds": 60},
        "status": status or {},
    }


class Secrets:
    def __init__(self, value: bytes | None) -> None:
        self.value = value
        self.reads: list[tuple[str, str, str]] = []

    async def __call__(self, namespace: str, name: str, key: str) -> bytes | None:
        self.reads.append((namespace, name, key))
        return self.value


async def test_reads_when_due_and_keeps_bookings_through_an_outage(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL)
    google.add_event(CAL, "a", "meta-llama/Llama-3.1-70B", T0, T0 + timedelta(hours=2))
    google.add_event(CAL, "b", "ndif/gpt2", T0 + timedelta(hours=3), T0 + timedelta(hours=4))
    secrets = Secrets(json.dumps(google.service_account()).encode())
    state = state_from_object(schedule_object(google), None)

    state = await refresh(state, T0, DEPLOYMENTS, read_secret=secrets)
    assert state.reason == SyncReason.CALENDAR_READ
    assert set(state.schedule.active(T0)) == {"ndif/llama-70b"}
    assert secrets.reads == [("ndif", "gcal", "service-account.json")]

    # Not due yet: no call at all.
    calls = len(google.requests)
    assert await refresh(state, T0 + timedelta(seconds=30), DEPLOYMENTS, read_secret=secrets) is state
    assert len(google.requests) == calls

    # A 5xx storm: the known bookings stay in force, the retries back off.
    google.inject("GET", "/events$", 503, times=100)
    t = T0 + timedelta(minutes=1)
    delays = []
    for _ in range(5):
        state = await refresh(state, t, DEPLOYMENTS, read_secret=secrets)
        assert state.reason == SyncReason.CALENDAR_UNAVAILABLE
        assert "ndif/llama-70b" in state.schedule.active(t)
        assert state.next_attempt is not None
        delays.append(state.next_attempt - t)
        t = state.next_attempt
    assert delays == sorted(delays) and delays[-1] > delays[0]
    # Past the booking's end it is no longer in force, even though the calendar is still down.
    state = await refresh(state, T0 + timedelta(hours=2, minutes=5), DEPLOYMENTS, read_secret=secrets)
    assert state.schedule.active(T0 + timedelta(hours=2, minutes=5)) == {}
    assert [b.key for b in state.schedule.bookings] == ["ndif/gpt2"]


async def test_credentials_missing_or_wrong_are_a_condition_not_a_crash(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL)
    state = state_from_object(schedule_object(google), None)
    missing = await refresh(state, T0, DEPLOYMENTS, read_secret=Secrets(None))
    assert missing.reason == SyncReason.CREDENTIALS_MISSING and "ndif/gcal" in missing.message
    wrong = await refresh(state, T0, DEPLOYMENTS,
                          read_secret=Secrets(json.dumps(google.service_account(known=False)).encode()))
    assert wrong.reason == SyncReason.CREDENTIALS_INVALID
    status = schedule_status(wrong, [], None, T0)
    assert status["conditions"][0]["type"] == "Synced"
    assert (status["conditions"][0]["status"], status["conditions"][0]["reason"]) == ("False", "CredentialsInvalid")


async def test_a_restarted_operator_starts_from_the_bookings_in_status(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL)
    google.add_event(CAL, "a", "ndif/llama-70b", T0, T0 + timedelta(hours=2))
    secrets = Secrets(json.dumps(google.service_account()).encode())
    first = await refresh(state_from_object(schedule_object(google), None), T0, DEPLOYMENTS, read_secret=secrets)
    written = schedule_status(first, first.schedule.problems, None, T0)

    google.inject("GET", "/events$", 503, times=10)  # Google is down when the new process starts
    restarted = state_from_object(schedule_object(google, written), None)
    assert "ndif/llama-70b" in restarted.schedule.active(T0 + timedelta(minutes=30))
    after = await refresh(restarted, T0 + timedelta(minutes=30), DEPLOYMENTS, read_secret=secrets)
    assert "ndif/llama-70b" in after.schedule.active(T0 + timedelta(minutes=30))
    assert written["lastSyncTime"].startswith("2026-12-07T09:00:00")


async def test_conflicting_events_are_coloured_once(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL)
    google.add_event(CAL, "good", "ndif/gpt2", T0, T0 + timedelta(hours=1))
    google.add_event(CAL, "typo", "ndif/gtp2", T0, T0 + timedelta(hours=1))
    secrets = Secrets(json.dumps(google.service_account()).encode())
    state = await refresh(state_from_object(schedule_object(google), None), T0, DEPLOYMENTS, read_secret=secrets)
    assert [p.event_id for p in state.schedule.problems] == ["typo"]
    state = await mark_conflicts(state, state.schedule.problems, read_secret=secrets)
    state = await mark_conflicts(state, state.schedule.problems, read_secret=secrets)
    assert google.patches == [(CAL, "typo", {"colorId": "11"})]
    assert google.color_of(CAL, "good") is None


def test_retry_delay_is_capped() -> None:
    assert retry_delay(1, 60) == timedelta(seconds=10)
    assert retry_delay(3, 60) == timedelta(seconds=40)
    assert retry_delay(30, 60) == timedelta(minutes=15)
    assert retry_delay(30, 3600) == timedelta(hours=1)
