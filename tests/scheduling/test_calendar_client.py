"""The real google-api-python-client against the local Calendar fake, over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ndif_operator.api.calendar import SyncReason
from ndif_operator.operator.calendar_client import CalendarClient, CalendarError, credentials_from_json
from ndif_operator.scheduling import DeploymentRef, build_schedule, parse_event
from scheduling.fake_calendar import FakeGoogleCalendar

CAL = "research@group.calendar.google.com"
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def client_for(google: FakeGoogleCalendar, key: dict[str, str]) -> CalendarClient:
    return CalendarClient(credentials_from_json(json.dumps(key)), endpoint=google.url, timeout_seconds=5)


def test_lists_every_page_expands_recurrences_and_keeps_the_calendar_time_zone(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL, time_zone="America/New_York")
    google.add_event(CAL, "once", "<p>ndif/llama-70b</p>", T0, T0 + timedelta(hours=2))
    google.add_event(CAL, "weekly", "ndif/gpt2", T0 + timedelta(hours=3), T0 + timedelta(hours=4),
                     recurrence=["RRULE:FREQ=DAILY;COUNT=3"])
    google.add_event(CAL, "allday", "ndif/llama-8b", "2026-12-09", "2026-12-10")
    google.add_event(CAL, "past", "ndif/gpt2", T0 - timedelta(days=2), T0 - timedelta(days=1))
    page = client_for(google, google.service_account()).list_events(CAL, T0, T0 + timedelta(days=7))
    ids = [item["id"] for item in page.items]
    assert ids == ["once", "weekly_20261207T120000Z", "weekly_20261208T120000Z", "allday", "weekly_20261209T120000Z"]
    assert page.time_zone == "America/New_York"
    assert sum(1 for m, p in google.requests if m == "GET") == 3  # 5 items in pages of 2

    events = [e for e in (parse_event(i, page.time_zone) for i in page.items) if e is not None]
    schedule = build_schedule(events, [DeploymentRef("ndif/llama-70b"), DeploymentRef("ndif/gpt2"),
                                       DeploymentRef("ndif/llama-8b")])
    allday = next(b for b in schedule.bookings if b.key == "ndif/llama-8b")
    assert allday.start == datetime(2026, 12, 9, 5, tzinfo=UTC)  # midnight in New York


def test_colours_one_event(google: FakeGoogleCalendar) -> None:
    google.calendar(CAL)
    google.add_event(CAL, "e1", "ndif/unknown", T0, T0 + timedelta(hours=1))
    client_for(google, google.service_account()).set_color(CAL, "e1", "11")
    assert google.color_of(CAL, "e1") == "11"


@pytest.mark.parametrize(
    ("setup", "reason", "words"),
    [
        ("unknown_key", SyncReason.CREDENTIALS_INVALID, "refused the service-account key"),
        ("not_shared", SyncReason.FORBIDDEN, "share the calendar"),
        ("no_calendar", SyncReason.CALENDAR_NOT_FOUND, "does not exist"),
        ("outage", SyncReason.CALENDAR_UNAVAILABLE, "503"),
    ],
)
def test_failures_become_reasons_an_admin_can_act_on(
    google: FakeGoogleCalendar, setup: str, reason: SyncReason, words: str
) -> None:
    google.calendar(CAL, shared_with="someone-else@x.iam.gserviceaccount.com" if setup == "not_shared"
                    else "ndif@project.iam.gserviceaccount.com")
    key = google.service_account(known=setup != "unknown_key")
    if setup == "outage":
        google.inject("GET", "/events$", 503)
    with pytest.raises(CalendarError) as caught:
        client_for(google, key).list_events("other@x" if setup == "no_calendar" else CAL, T0, T0 + timedelta(days=1))
    assert caught.value.reason == reason
    assert words in str(caught.value)
    assert caught.value.retryable == (reason == SyncReason.CALENDAR_UNAVAILABLE)


@pytest.mark.parametrize(
    "raw", ["{not json", json.dumps({"type": "authorized_user"}), json.dumps({"type": "service_account"})]
)
def test_a_key_that_is_not_a_service_account_key_is_refused_before_any_call(raw: str) -> None:
    with pytest.raises(CalendarError) as caught:
        credentials_from_json(raw)
    assert caught.value.reason == SyncReason.CREDENTIALS_INVALID
