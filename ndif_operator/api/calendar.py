"""`CalendarSchedule` (ndif.dev/v1alpha1): a shared Google Calendar that books models dedicated.

CalendarSchedules live in the operator's own namespace, next to the Secret with the calendar's
credentials, so only those who administer the operator can point it at a calendar; each names
the namespace and RayService whose models its events may book. The operator reads the events
(recurring ones expanded), and during an event the ModelDeployment it names is planned dedicated
Hot; the user's spec is never edited. The object's status says whether the calendar could be read
and keeps the bookings of the week ahead, so that the schedule stays in force through calendar
outages and operator restarts until its events end. The CRD is generated from these models.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, Field

from ndif_operator.api.v1alpha1 import GROUP, VERSION, Condition, _Model

KIND = "CalendarSchedule"
PLURAL = "calendarschedules"
SINGULAR = "calendarschedule"
SHORT_NAMES = ("calsched",)
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"

# Google Calendar's event colours: "11" is Tomato (red), what NDIF's bookers know as "error".
CONFLICT_COLOR_ID = "11"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar.events"


class SyncReason(StrEnum):
    """Reasons of the schedule's `Synced` condition."""

    CALENDAR_READ = "CalendarRead"
    CREDENTIALS_MISSING = "CredentialsMissing"  # the Secret or its key is absent
    CREDENTIALS_INVALID = "CredentialsInvalid"  # not a service-account JSON, or Google refused it
    FORBIDDEN = "Forbidden"  # 401/403: the service account has no access to this calendar
    CALENDAR_NOT_FOUND = "CalendarNotFound"
    CALENDAR_UNAVAILABLE = "CalendarUnavailable"  # 5xx, 429, timeouts, network


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, max_length=253, description="Secret in the CalendarSchedule's namespace "
                                                                "(the operator's).")
    key: str = Field(default="service-account.json", min_length=1, description="Key holding the JSON.")


class CalendarScheduleSpec(_Model):
    calendar_id: str = Field(
        min_length=1, max_length=512, description="Google Calendar id, e.g. `abc123@group.calendar.google.com`."
    )
    credentials_secret: SecretKeyRef = Field(
        description="Secret with a Google service-account JSON key that can read (and colour) the calendar's events."
    )
    namespace: str | None = Field(
        default=None,
        max_length=63,
        description="Namespace of the governed RayService and its ModelDeployments; default: this object's.",
    )
    ray_service: str | None = Field(
        default=None,
        max_length=63,
        description="RayService whose ModelDeployments events may book; default: the operator's setting.",
    )
    poll_seconds: int = Field(default=60, ge=10, le=3600, description="How often the calendar is read.")
    lookahead_days: int = Field(default=7, ge=1, le=31, description="How far ahead bookings are read and shown.")
    mark_conflicts: bool = Field(
        default=True, description="Colour events that cannot be honoured, so their bookers see it in the calendar."
    )
    conflict_color_id: str = Field(default=CONFLICT_COLOR_ID, pattern=r"^[0-9]{1,2}$")
    endpoint: str | None = Field(
        default=None, description="Calendar API base URL (a proxy or a test server); default: Google's."
    )


class BookingStatus(_Model):
    """One booking as shown in status: a model dedicated from `start` to `end`."""

    model: str = Field(description="The ModelDeployment, namespace/name.")
    start: datetime
    end: datetime
    summary: str = ""
    event_ids: list[str] = Field(default_factory=list)


class ScheduleProblemStatus(_Model):
    """An event that books nothing, or a booking that could not be honoured."""

    event_id: str
    summary: str = ""
    reason: str
    message: str
    start: datetime | None = None
    end: datetime | None = None
    model: str | None = None


class CalendarScheduleStatus(_Model):
    observed_generation: int | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    last_sync_time: datetime | None = Field(default=None, description="When the calendar was last read.")
    bookings: list[BookingStatus] = Field(
        default_factory=list, description="Bookings in force and in the week ahead (kept through outages)."
    )
    problems: list[ScheduleProblemStatus] = Field(default_factory=list)
    message: str = ""


class CalendarSchedule(_Model):
    model_config = ConfigDict(extra="ignore")

    api_version: Literal["ndif.dev/v1alpha1"] = API_VERSION  # type: ignore[assignment]
    kind: Literal["CalendarSchedule"] = KIND  # type: ignore[assignment]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: CalendarScheduleSpec
    status: CalendarScheduleStatus | None = None


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Calendar", "type": "string", "jsonPath": ".spec.calendarId"},
    {"name": "Synced", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Synced")].status'},
    {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Synced")].reason'},
    {"name": "Last-Sync", "type": "date", "jsonPath": ".status.lastSyncTime"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]
