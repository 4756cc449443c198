"""One Google Calendar v3 event → a `CalendarEvent` (who is booked, from when to when).

How an event names the model it books (docs/calendar.md):
- a private or shared extended property `ndifModel` (set by tools that create bookings), else
- the event's description: the first non-empty line after removing the HTML, entities and
  whitespace that Google Calendar's editor puts around text, optionally prefixed `model:`.
The reference is either `namespace/name` of a ModelDeployment or a model repo id
(`meta-llama/Llama-3.1-70B`); `bookings` decides which.

Times: timed events carry an RFC 3339 `dateTime` with an offset (or a `timeZone`); all-day
events carry a `date` and last whole days in the calendar's time zone, the end date exclusive.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MODEL_PROPERTY = "ndifModel"

_TAG = re.compile(r"<[^>]*>")
_BREAK_TAG = re.compile(r"<\s*(br|/p|/div|/li)\s*/?\s*>", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*model\s*:\s*", re.IGNORECASE)
# A ModelDeployment key (DNS-1123 namespace/name) or a Hub-style repo id (org/name, no spaces).
_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class EventProblem(StrEnum):
    """Why an event cannot become a booking (the reason an admin sees)."""

    NO_REFERENCE = "NoModelNamed"  # no property and an empty description
    UNREADABLE = "UnreadableDescription"  # text that is not `namespace/name` or a repo id
    BAD_TIMES = "UnreadableTimes"  # missing or malformed start/end, or end before start


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    """The parts of an event the scheduler uses. `reference` is None when `problem` is set."""

    event_id: str
    summary: str
    start: datetime  # aware, UTC
    end: datetime  # aware, UTC, exclusive
    reference: str | None
    problem: EventProblem | None = None
    detail: str = ""
    color_id: str | None = None


def clean_description(raw: str) -> str:
    """The first non-empty line of a description, without HTML, entities or stray whitespace."""
    text = _BREAK_TAG.sub("\n", raw)
    text = html.unescape(_TAG.sub("", text)).replace("\u00a0", " ")
    for line in text.splitlines():
        line = _PREFIX.sub("", line).strip().strip("\"'`").strip()
        if line:
            return line
    return ""


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _instant(value: dict[str, Any] | None, calendar_zone: ZoneInfo) -> datetime | None:
    """An event's `start`/`end` object as an aware UTC datetime (all-day: midnight, local)."""
    if not isinstance(value, dict):
        return None
    try:
        if value.get("dateTime"):
            moment = datetime.fromisoformat(str(value["dateTime"]).replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_zone(value.get("timeZone")) if value.get("timeZone") else calendar_zone)
            return moment.astimezone(UTC)
        if value.get("date"):
            day = date.fromisoformat(str(value["date"]))
            zone = _zone(value.get("timeZone")) if value.get("timeZone") else calendar_zone
            return datetime.combine(day, time.min, tzinfo=zone).astimezone(UTC)
    except ValueError:
        return None
    return None


def _reference(item: dict[str, Any]) -> tuple[str | None, EventProblem | None, str]:
    props = item.get("extendedProperties") or {}
    for scope in ("shared", "private"):
        value = (props.get(scope) or {}).get(MODEL_PROPERTY)
        if isinstance(value, str) and value.strip():
            ref = value.strip()
            if _REFERENCE.match(ref):
                return ref, None, ""
            return None, EventProblem.UNREADABLE, f"property {MODEL_PROPERTY}={ref[:80]!r} is not namespace/name"
    text = clean_description(str(item.get("description") or ""))
    if not text:
        return None, EventProblem.NO_REFERENCE, (
            "the description is empty: write the ModelDeployment as namespace/name (or the model's repo id)"
        )
    if not _REFERENCE.match(text):
        return None, EventProblem.UNREADABLE, (
            f"the description {text[:80]!r} is not namespace/name of a ModelDeployment nor a model repo id"
        )
    return text, None, ""


def parse_event(item: dict[str, Any], calendar_time_zone: str | None = None) -> CalendarEvent | None:
    """One `events.list` item; None for cancelled instances (they book nothing)."""
    if item.get("status") == "cancelled":
        return None
    zone = _zone(calendar_time_zone)
    start = _instant(item.get("start"), zone)
    end = _instant(item.get("end"), zone)
    event_id = str(item.get("id") or "")
    summary = str(item.get("summary") or "")
    color = item.get("colorId")
    if start is None or end is None or end <= start:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return CalendarEvent(
            event_id, summary, start or epoch, end or (start or epoch) + timedelta(seconds=1), None,
            EventProblem.BAD_TIMES, "the event has no readable start and end", color,
        )
    reference, problem, detail = _reference(item)
    return CalendarEvent(event_id, summary, start, end, reference, problem, detail, color)
